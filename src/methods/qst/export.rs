//! A QST model (the frozen NF4 base and the side network) as a whole: built for training, written as an export
//! (`side.safetensors` and `qst.json`, which names the base model file; the base itself is not copied) and read back
//! for evaluation.
use super::config::{QstConfig, Start, LN_EPS};
use super::side::SideNet;
use crate::methods::lora::{nf4_base, FrozenBase, NF4_BLOCK};
use crate::model::quantized::Source;
use crate::model::{Batch, Keep, Llama, Output, Tok};
use crate::{Error, Result};
use candle_core::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A QST model: the frozen NF4 base and the side network. Training wraps it in [`Qst`]; [`QstModel::load`] reads
/// one back from its export for evaluation.
pub struct QstModel {
    /// The NF4 base: in host memory, or on the GPU the side network lives on.
    pub(super) base: Box<dyn FrozenBase>,
    pub(super) net: SideNet,
}

impl QstModel {
    /// The side network on `dev`, and the base quantized as it is read (moved to `dev` matrix by matrix when that is
    /// a GPU).
    pub(super) fn new(source: Source, cfg: QstConfig, dev: &candle_core::Device) -> Result<Self> {
        // Options are checked before the (slow) quantization.
        let net = SideNet::new(&source.cfg()?, cfg, DType::F32, dev)?;
        let base: Box<dyn FrozenBase> = if dev.is_cpu() {
            Box::new(nf4_base(source)?)
        } else {
            Box::new(crate::methods::gpu_base(source, &mut crate::methods::lora::nf4_quantizer, dev)?)
        };
        Ok(QstModel { base, net })
    }

    /// Whether `dir` holds a QST export (`qst.json`).
    pub fn is_export(dir: &Path) -> bool {
        dir.join("qst.json").is_file()
    }

    /// Reads a QST export back: the side network from `side.safetensors`, the base re-quantized from the model file
    /// `qst.json` names (NF4 quantization is deterministic, so this is the base the side network was trained on).
    /// Returns the model and the base model's path. Errors name the file: a missing or unreadable base, a base whose
    /// configuration is not the one recorded, a missing, extra, misshapen or non-finite side tensor.
    pub fn load(dir: &Path) -> Result<(Self, PathBuf)> {
        let manifest = dir.join("qst.json");
        let bytes = std::fs::read(&manifest).map_err(|e| Error::file(&manifest, format!("cannot read: {e}")))?;
        let j: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::file(&manifest, format!("malformed JSON: {e}")))?;
        let text = |key: &str| {
            j[key].as_str().ok_or_else(|| Error::file(&manifest, format!("`{key}` is missing or not a string")))
        };
        let count = |key: &str| {
            j[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::file(&manifest, format!("`{key}` is missing or not a count")))
        };
        fn value<T: clap::ValueEnum>(v: &str, manifest: &Path) -> Result<T> {
            T::from_str(v, false).map_err(|e| Error::file(manifest, format!("`{v}`: {e}")))
        }
        // `side_heads` is absent from exports written before the option existed: the base's heads.
        let side_heads = if j["side_heads"].is_null() { None } else { Some(count("side_heads")?) };
        let cfg = QstConfig {
            r: count("r")?,
            side_heads,
            downsample: value(text("downsample")?, &manifest)?,
            adapter_rank: count("adapter_rank")?,
            keep: Keep::All,
            seed: 0,
            start: value(text("start")?, &manifest)?,
            alpha_lr_scale: 1.0,
            alpha_clamp: false,
            zero_upsample: false,
        };
        let base_path = PathBuf::from(text("base_model")?);
        let base_cfg = crate::model::load::read_header(&base_path)
            .map_err(|e| {
                Error::file(
                    &manifest,
                    format!(
                        "its base model cannot be read ({e}); paths are relative to the directory the training ran in"
                    ),
                )
            })?
            .cfg;
        // The base's config as the manifest recorded it (the config's own fields; older manifests wrote its
        // config.json form, which has the same names).
        let recorded = serde_json::from_value::<crate::model::LlamaConfig>(j["base_config"].clone()).ok();
        if recorded.as_ref() != Some(&base_cfg) {
            return Err(Error::file(
                &manifest,
                format!("the side network was trained on another base than {}", base_path.display()),
            ));
        }
        let base = Source::File(base_path.clone());
        let mut net =
            SideNet::new(&base_cfg, cfg, DType::F32, &base.device()).map_err(|e| Error::file(&manifest, e))?;
        let side_path = dir.join("side.safetensors");
        let mut tensors = candle_core::safetensors::load(&side_path, &base.device())
            .map_err(|e| Error::file(&side_path, format!("cannot read: {e}")))?;
        for k in net.params.keys().to_vec() {
            let name = k.name();
            let t = tensors.remove(&name).ok_or_else(|| Error::file(&side_path, format!("no tensor `{name}`")))?;
            let want = net.params.get(k).dims().to_vec();
            if t.dims() != want.as_slice() {
                return Err(Error::file(&side_path, format!("`{name}` has shape {:?}, expected {want:?}", t.dims())));
            }
            let t = t.to_dtype(DType::F32)?;
            crate::model::export::check_finite(&t).map_err(|e| Error::file(&side_path, format!("`{name}`: {e}")))?;
            net.params.set(k, t);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::file(&side_path, format!("unexpected tensor `{extra}` for this qst.json")));
        }
        Ok((QstModel { base: Box::new(nf4_base(base)?), net }, base_path))
    }

    /// The inference forward (`model` is the base's decoder): loss and logits at the target positions.
    pub fn forward(&self, model: &Llama, batch: &Batch) -> Result<Output> {
        Ok(self.net.forward(model, self.base.as_ref(), batch, Keep::Nothing)?.0)
    }

    /// Bytes held: the NF4 base and the side network.
    pub fn weight_bytes(&self) -> usize {
        self.base.weight_bytes() + self.net.params.bytes()
    }

    pub fn trainable_params(&self) -> usize {
        self.net.params.numel()
    }

    /// The run's description next to `side.safetensors`: the base model it reads and how, and the wiring.
    fn manifest(&self, base_model: &str) -> serde_json::Value {
        let (q, sc) = (&self.net.cfg, &self.net.side.cfg);
        serde_json::json!({
            "method": "qst",
            "base_model": base_model,
            "base_quantization": {
                "format": "nf4",
                "block": NF4_BLOCK,
                "double_quant": true,
                "double_quant_block": 256,
                "quantized": "every matrix, the embedding included; norm weights f32",
            },
            "base_config": serde_json::to_value(self.base.cfg()).expect("a config is plain data"),
            // The side blocks only (no embeddings or head of their own).
            "side_config": {
                "hidden_size": sc.hidden_size,
                "intermediate_size": sc.intermediate_size,
                "num_hidden_layers": sc.num_hidden_layers,
                "num_attention_heads": sc.num_attention_heads,
                "num_key_value_heads": sc.num_key_value_heads,
                "head_dim": sc.head_dim,
                "rope_theta": sc.rope_theta,
                "rms_norm_eps": sc.rms_norm_eps,
            },
            "r": q.r,
            "side_heads": q.side_heads,
            "downsample": q.downsample,
            "adapter_rank": q.adapter_rank,
            "start": q.start,
            "alpha_clamp": q.alpha_clamp,
            "zero_upsample": q.zero_upsample,
            "layer_norm_eps": LN_EPS,
            "wiring": {
                "downsample.{i}": "i = 0 reads the token embeddings, i = l + 1 the output of base layer l",
                "side input of side.layers.{l}": "(1 - b)*downsample.{l+1}(h_f) + b*h_g, b = sigmoid(gates.{l+1}), h_g the previous side state (downsample.0's output before layer 0)",
                "output": match q.start {
                    Start::Paper => "a*model.norm(h_f) + (1 - a)*upsample(side.norm(h_g)) into the frozen LM head, a = alpha",
                    Start::Code => "a*model.norm(h_f) + (1 - a)*upsample(side.norm(h_g)) into the frozen LM head, a = sigmoid(alpha)",
                },
            },
            "tensors": self.net.params.keys().iter().map(|k| k.name()).collect::<Vec<_>>(),
        })
    }

    /// Writes `dir/{side.safetensors, qst.json, tokenizer.json}`; the base is referenced, not copied.
    pub fn export(&self, dir: &Path, tok: Option<&Tok>, base_model: &str) -> Result<()> {
        let mut tensors = Vec::new();
        for &k in self.net.params.keys() {
            let t = self.net.params.get(k).to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
            crate::model::export::check_finite(&t)?;
            tensors.push((k.name(), t));
        }
        let path = dir.join("side.safetensors");
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::tensor::serialize(tensors, Some(metadata))
            .map_err(|e| Error::file(&path, format!("cannot serialize: {e}")))?;
        crate::io::write_bytes_atomic(&path, &bytes)?;
        let json = serde_json::to_vec_pretty(&self.manifest(base_model)).map_err(|e| Error::Msg(e.to_string()))?;
        crate::io::write_bytes_atomic(&dir.join("qst.json"), &json)?;
        if let Some(tok) = tok {
            crate::io::write_bytes_atomic(&dir.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
        }
        Ok(())
    }
}
