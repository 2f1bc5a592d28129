//! Parameter naming and storage. Every parameter has one [`ParamId`]; its HF and GGUF names, its shape and its
//! position in forward order derive from it, so loaders, optimizers, checkpoints and exporters agree on one list.
use super::config::LlamaConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The parameters of one decoder block, in forward order: nine, or twelve with Qwen2's q/k/v biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockParam {
    AttnNorm,
    Q,
    QBias,
    K,
    KBias,
    V,
    VBias,
    O,
    MlpNorm,
    Gate,
    Up,
    Down,
}

impl BlockParam {
    pub const ALL: [BlockParam; 9] = [
        BlockParam::AttnNorm,
        BlockParam::Q,
        BlockParam::K,
        BlockParam::V,
        BlockParam::O,
        BlockParam::MlpNorm,
        BlockParam::Gate,
        BlockParam::Up,
        BlockParam::Down,
    ];
    /// A block with q/k/v biases ([`LlamaConfig::attention_bias`]), each right after its matrix.
    pub const WITH_BIAS: [BlockParam; 12] = [
        BlockParam::AttnNorm,
        BlockParam::Q,
        BlockParam::QBias,
        BlockParam::K,
        BlockParam::KBias,
        BlockParam::V,
        BlockParam::VBias,
        BlockParam::O,
        BlockParam::MlpNorm,
        BlockParam::Gate,
        BlockParam::Up,
        BlockParam::Down,
    ];

    /// The block's parameters under `cfg`, in forward order.
    pub fn of(cfg: &LlamaConfig) -> &'static [BlockParam] {
        if cfg.attention_bias {
            &Self::WITH_BIAS
        } else {
            &Self::ALL
        }
    }

    /// The bias added after this projection, if the family has one.
    pub fn bias(self) -> Option<BlockParam> {
        match self {
            BlockParam::Q => Some(BlockParam::QBias),
            BlockParam::K => Some(BlockParam::KBias),
            BlockParam::V => Some(BlockParam::VBias),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamId {
    Embed,
    Block(usize, BlockParam),
    FinalNorm,
    /// Only for untied models; a tied model reads its LM head from `Embed`.
    LmHead,
}

impl ParamId {
    /// All parameters in forward order (the order optimizers walk and checkpoints store).
    pub fn all(cfg: &LlamaConfig) -> Vec<ParamId> {
        let mut ids = vec![ParamId::Embed];
        for l in 0..cfg.num_hidden_layers {
            ids.extend(BlockParam::of(cfg).iter().map(|&p| ParamId::Block(l, p)));
        }
        ids.push(ParamId::FinalNorm);
        if !cfg.tie_word_embeddings {
            ids.push(ParamId::LmHead);
        }
        ids
    }

    /// The parameter the LM head reads.
    pub fn head(cfg: &LlamaConfig) -> ParamId {
        if cfg.tie_word_embeddings {
            ParamId::Embed
        } else {
            ParamId::LmHead
        }
    }

    /// Position in [`ParamId::all`].
    pub fn index(self, cfg: &LlamaConfig) -> usize {
        let block = BlockParam::of(cfg);
        let n = block.len();
        match self {
            ParamId::Embed => 0,
            ParamId::Block(l, p) => 1 + l * n + block.iter().position(|&q| q == p).expect("a parameter of this family"),
            ParamId::FinalNorm => 1 + cfg.num_hidden_layers * n,
            ParamId::LmHead => 2 + cfg.num_hidden_layers * n,
        }
    }

    /// Norm weights and biases are vectors; everything else is a matrix `[out, in]` (embeddings: `[vocab, hidden]`).
    pub fn is_matrix(self) -> bool {
        !matches!(
            self,
            ParamId::FinalNorm
                | ParamId::Block(
                    _,
                    BlockParam::AttnNorm
                        | BlockParam::MlpNorm
                        | BlockParam::QBias
                        | BlockParam::KBias
                        | BlockParam::VBias
                )
        )
    }

    /// A projection's bias (initialized around 0, where a norm weight sits around 1).
    pub fn is_bias(self) -> bool {
        matches!(self, ParamId::Block(_, BlockParam::QBias | BlockParam::KBias | BlockParam::VBias))
    }

    pub fn shape(self, cfg: &LlamaConfig) -> Vec<usize> {
        let d = cfg.hidden_size;
        match self {
            ParamId::Embed | ParamId::LmHead => vec![cfg.vocab_size, d],
            ParamId::FinalNorm => vec![d],
            ParamId::Block(_, p) => match p {
                BlockParam::AttnNorm | BlockParam::MlpNorm => vec![d],
                BlockParam::Q => vec![cfg.q_dim(), d],
                BlockParam::QBias => vec![cfg.q_dim()],
                BlockParam::KBias | BlockParam::VBias => vec![cfg.kv_dim()],
                BlockParam::K | BlockParam::V => vec![cfg.kv_dim(), d],
                BlockParam::O => vec![d, cfg.q_dim()],
                BlockParam::Gate | BlockParam::Up => vec![cfg.intermediate_size, d],
                BlockParam::Down => vec![d, cfg.intermediate_size],
            },
        }
    }

    pub fn numel(self, cfg: &LlamaConfig) -> usize {
        self.shape(cfg).iter().product()
    }

    pub fn hf_name(self) -> String {
        match self {
            ParamId::Embed => "model.embed_tokens.weight".into(),
            ParamId::FinalNorm => "model.norm.weight".into(),
            ParamId::LmHead => "lm_head.weight".into(),
            ParamId::Block(l, p) => {
                let (s, kind) = match p {
                    BlockParam::AttnNorm => ("input_layernorm", "weight"),
                    BlockParam::Q => ("self_attn.q_proj", "weight"),
                    BlockParam::QBias => ("self_attn.q_proj", "bias"),
                    BlockParam::K => ("self_attn.k_proj", "weight"),
                    BlockParam::KBias => ("self_attn.k_proj", "bias"),
                    BlockParam::V => ("self_attn.v_proj", "weight"),
                    BlockParam::VBias => ("self_attn.v_proj", "bias"),
                    BlockParam::O => ("self_attn.o_proj", "weight"),
                    BlockParam::MlpNorm => ("post_attention_layernorm", "weight"),
                    BlockParam::Gate => ("mlp.gate_proj", "weight"),
                    BlockParam::Up => ("mlp.up_proj", "weight"),
                    BlockParam::Down => ("mlp.down_proj", "weight"),
                };
                format!("model.layers.{l}.{s}.{kind}")
            }
        }
    }

    pub fn gguf_name(self) -> String {
        match self {
            ParamId::Embed => "token_embd.weight".into(),
            ParamId::FinalNorm => "output_norm.weight".into(),
            ParamId::LmHead => "output.weight".into(),
            ParamId::Block(l, p) => {
                let (s, kind) = match p {
                    BlockParam::AttnNorm => ("attn_norm", "weight"),
                    BlockParam::Q => ("attn_q", "weight"),
                    BlockParam::QBias => ("attn_q", "bias"),
                    BlockParam::K => ("attn_k", "weight"),
                    BlockParam::KBias => ("attn_k", "bias"),
                    BlockParam::V => ("attn_v", "weight"),
                    BlockParam::VBias => ("attn_v", "bias"),
                    BlockParam::O => ("attn_output", "weight"),
                    BlockParam::MlpNorm => ("ffn_norm", "weight"),
                    BlockParam::Gate => ("ffn_gate", "weight"),
                    BlockParam::Up => ("ffn_up", "weight"),
                    BlockParam::Down => ("ffn_down", "weight"),
                };
                format!("blk.{l}.{s}.{kind}")
            }
        }
    }
}

/// All parameters of a model as dense tensors (f32 for training; f64 in gradient tests), indexed by [`ParamId`].
#[derive(Clone)]
pub struct ParamStore {
    pub cfg: LlamaConfig,
    tensors: Vec<Tensor>,
}

impl ParamStore {
    /// Builds a store from tensors keyed by id; every id of the config must be present with its exact shape.
    pub fn from_map(cfg: LlamaConfig, mut map: HashMap<ParamId, Tensor>, source: &Path) -> Result<Self> {
        let mut tensors = Vec::new();
        for id in ParamId::all(&cfg) {
            let t = map.remove(&id).ok_or_else(|| Error::file(source, format!("missing tensor `{}`", id.hf_name())))?;
            let want = id.shape(&cfg);
            if t.dims() != want.as_slice() {
                return Err(Error::file(
                    source,
                    format!("tensor `{}` has shape {:?}, the config implies {:?}", id.hf_name(), t.dims(), want),
                ));
            }
            tensors.push(t);
        }
        Ok(ParamStore { cfg, tensors })
    }

    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.index(&self.cfg)]
    }

    pub fn set(&mut self, id: ParamId, t: Tensor) {
        let i = id.index(&self.cfg);
        self.tensors[i] = t;
    }

    pub fn ids(&self) -> Vec<ParamId> {
        ParamId::all(&self.cfg)
    }

    pub fn dtype(&self) -> DType {
        self.tensors[0].dtype()
    }

    pub fn device(&self) -> &Device {
        self.tensors[0].device()
    }

    /// Bytes held by the parameter tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors = self.tensors.iter().map(|t| t.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ParamStore { cfg: self.cfg.clone(), tensors })
    }

    /// Tensors by their HF names, as `save_pretrained` writes them (a tied model has no `lm_head.weight`).
    pub fn hf_tensors(&self) -> HashMap<String, Tensor> {
        self.ids().into_iter().map(|id| (id.hf_name(), self.get(id).clone())).collect()
    }
}

impl ParamStore {
    /// A randomly initialized model (tests, and the starting point of models built from scratch): matrices
    /// N(0, std²), norm weights 1 + N(0, (std/2)²), drawn from the counter-based RNG so a seed fixes them.
    pub fn random(cfg: &LlamaConfig, seed: u64, std: f32, dtype: DType) -> Result<Self> {
        cfg.validate().map_err(Error::Msg)?;
        let mut map = HashMap::new();
        for id in ParamId::all(cfg) {
            map.insert(id, random_tensor(cfg, id, seed, std)?.to_dtype(dtype)?);
        }
        ParamStore::from_map(cfg.clone(), map, Path::new("<random>"))
    }
}

/// Parameter `id` of [`ParamStore::random`]'s model, alone (f32): so a random model of any size can be written one
/// tensor at a time (`qtune init`).
pub fn random_tensor(cfg: &LlamaConfig, id: ParamId, seed: u64, std: f32) -> Result<Tensor> {
    use qtune_quant::rng::{fill_gaussian, RngKey, STREAM_GAUSS};
    let mut v = vec![0f32; id.numel(cfg)];
    fill_gaussian(&RngKey::new(seed, id.index(cfg) as u32, STREAM_GAUSS), 0, &mut v);
    if id.is_matrix() || id.is_bias() {
        v.iter_mut().for_each(|x| *x *= std);
    } else {
        v.iter_mut().for_each(|x| *x = 1.0 + *x * std / 2.0);
    }
    Ok(Tensor::from_vec(v, id.shape(cfg), &Device::Cpu)?)
}
