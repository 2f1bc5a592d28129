//! A model whose matrices are held in a quantized format (`qtune-quant`'s INT8/INT4, NF4 or dense-and-sparse
//! hybrid) and whose norm weights stay f32. Applying a matrix dequantizes it tile by tile inside the kernel, so no
//! f32 copy of a whole matrix, let alone of the model, is ever made. Loading quantizes tensor by tensor as the
//! file is read.
use super::config::LlamaConfig;
use super::llama::Weights;
use super::load::{stream_model, with_f32_slice};
use super::params::{ParamId, ParamStore};
use super::tokenizer::Tok;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use qtune_quant::{int8, matmul, matmul_xw_int, QuantBytes, QuantWeight};
use std::collections::HashMap;
use std::path::Path;

/// Where a method's starting weights come from: a model file, read tensor by tensor (a quantized method quantizes
/// each matrix as it arrives and never holds an f32 copy of the model), or an f32 model already in memory.
pub enum Source {
    File(std::path::PathBuf),
    Params(ParamStore),
}

impl Source {
    /// The model's configuration (reads only the header of a file).
    pub fn cfg(&self) -> Result<LlamaConfig> {
        match self {
            Source::File(p) => Ok(super::load::read_header(p)?.cfg),
            Source::Params(p) => Ok(p.cfg.clone()),
        }
    }

    /// The device the model's tensors arrive on: a file's loader reads to the CPU; parameters are where they are.
    pub fn device(&self) -> Device {
        match self {
            Source::File(_) => Device::Cpu,
            Source::Params(p) => p.device().clone(),
        }
    }

    /// The model as dense f32 parameters (the f32 methods).
    pub fn params(self) -> Result<ParamStore> {
        match self {
            Source::File(p) => Ok(super::load::load_model(&p)?.params),
            Source::Params(p) => Ok(p),
        }
    }

    /// The model as dense f32 parameters on `dev`. For a GPU each tensor moves there as the file is read, so the
    /// host holds one tensor at a time, never the model.
    pub fn params_on(self, dev: &Device) -> Result<ParamStore> {
        if dev.same_device(&self.device()) {
            return self.params();
        }
        let mut map = HashMap::new();
        let (cfg, path) = match self {
            Source::File(p) => {
                let header = stream_model(&p, &mut |id, t| {
                    map.insert(id, t.to_device(dev)?);
                    Ok(())
                })?;
                (header.cfg, p)
            }
            Source::Params(p) => {
                for id in p.ids() {
                    map.insert(id, p.get(id).to_device(dev)?);
                }
                (p.cfg.clone(), std::path::PathBuf::from("<parameters>"))
            }
        };
        ParamStore::from_map(cfg, map, &path)
    }

    /// The model with its matrices quantized by `quantize` as they are read.
    pub fn quantize<W: QuantWeight>(self, quantize: &mut Quantize<W>) -> Result<QuantStore<W>> {
        match self {
            Source::File(p) => Ok(QuantStore::load(&p, quantize)?.0),
            Source::Params(p) => QuantStore::from_params(&p, quantize),
        }
    }

    /// Each parameter as it is read, to `take`: matrices quantized by `quantize`, norm weights as f32 tensors (at
    /// most one f32 tensor alive at a time). Returns the model's configuration.
    pub fn stream_parts<W>(
        self,
        quantize: &mut Quantize<W>,
        take: &mut dyn FnMut(ParamId, Part<W>) -> Result<()>,
    ) -> Result<LlamaConfig> {
        match self {
            Source::File(p) => Ok(stream_model(&p, &mut |id, t| take(id, Part::from_tensor(id, t, quantize)?))?.cfg),
            Source::Params(p) => {
                for id in p.ids() {
                    take(id, Part::from_tensor(id, p.get(id).clone(), quantize)?)?;
                }
                Ok(p.cfg.clone())
            }
        }
    }
}

/// The arithmetic of a quantized matrix product `x·Wᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// INT8 activations (one scale per token) times the weight's integer codes, summed in i32: the CPU's integer
    /// units (`qtune_quant::int8`). Needs symmetric codes with one scale per row.
    Int8,
    /// `int8` with LLM.int8()'s mixed decomposition: input columns holding any |x| > 6 stay f32 (their product is
    /// added in f32), so outlier features do not coarsen the rest of their token. The input gradient runs as int8.
    Int8Mixed,
    /// The weight dequantized tile by tile to f32, times f32 activations.
    F32,
}

impl Compute {
    /// The name `--compute` takes (`int8`, `int8-mixed`, `f32`).
    pub fn cli_name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value().map_or_else(|| format!("{self:?}"), |v| v.get_name().to_string())
    }

    /// Whether the products run on the integer units (the INT8 ceiling judges them).
    pub fn is_int(self) -> bool {
        matches!(self, Compute::Int8 | Compute::Int8Mixed)
    }
}

/// How a method turns an f32 matrix `[rows, cols]` into its stored format.
pub type Quantize<'a, W> = dyn FnMut(ParamId, &[f32], usize, usize) -> Result<W> + 'a;

pub struct QuantStore<W> {
    pub cfg: LlamaConfig,
    /// Indexed by `ParamId::index`; `None` for norm weights.
    mats: Vec<Option<W>>,
    /// f32 norm weights, indexed likewise; `None` for matrices.
    vecs: Vec<Option<Tensor>>,
    /// The arithmetic of `Weights::linear` (f32 unless a method or `qtune eval` asks for the integer path).
    pub compute: Compute,
}

impl<W: QuantWeight> QuantStore<W> {
    fn build(cfg: LlamaConfig, parts: HashMap<ParamId, Result<Part<W>>>) -> Result<Self> {
        let parts = parts.into_iter().map(|(id, p)| Ok((id, p?))).collect::<Result<HashMap<_, _>>>()?;
        let (mats, vecs) = place(&cfg, parts)?;
        Ok(QuantStore { cfg, mats, vecs, compute: Compute::F32 })
    }

    /// Reads a model file, quantizing each matrix as it arrives (at most one f32 tensor alive at a time).
    pub fn load(path: &Path, quantize: &mut Quantize<W>) -> Result<(Self, Option<Tok>)> {
        let mut parts = HashMap::new();
        let header = stream_model(path, &mut |id, t| {
            parts.insert(id, Part::from_tensor(id, t, quantize));
            Ok(())
        })?;
        Ok((Self::build(header.cfg, parts)?, header.tokenizer))
    }

    /// Quantizes an in-memory f32 model (tests, and methods that start from one).
    pub fn from_params(p: &ParamStore, quantize: &mut Quantize<W>) -> Result<Self> {
        let parts = p.ids().into_iter().map(|id| (id, Part::from_tensor(id, p.get(id).clone(), quantize))).collect();
        Self::build(p.cfg.clone(), parts)
    }

    pub fn mat(&self, id: ParamId) -> &W {
        self.mats[id.index(&self.cfg)].as_ref().expect("a matrix parameter")
    }

    pub fn mat_mut(&mut self, id: ParamId) -> &mut W {
        let i = id.index(&self.cfg);
        self.mats[i].as_mut().expect("a matrix parameter")
    }

    pub fn set_vector(&mut self, id: ParamId, t: Tensor) {
        let i = id.index(&self.cfg);
        self.vecs[i] = Some(t);
    }

    pub fn ids(&self) -> Vec<ParamId> {
        ParamId::all(&self.cfg)
    }

    /// Exact bytes of the quantized matrices.
    pub fn quant_bytes(&self) -> QuantBytes {
        self.mats.iter().flatten().map(|w| w.storage_bytes()).fold(QuantBytes::default(), |a, b| a + b)
    }

    /// Bytes of the f32 norm weights.
    pub fn f32_bytes(&self) -> usize {
        self.vecs.iter().flatten().map(|t| t.elem_count() * 4).sum()
    }

    /// Parameter `id` dequantized to f32 (export streams these one at a time).
    pub fn dense(&self, id: ParamId) -> Result<Tensor> {
        match &self.vecs[id.index(&self.cfg)] {
            Some(v) => Ok(v.clone()),
            None => {
                let w = self.mat(id);
                let mut out = vec![0f32; w.len()];
                w.dequantize_into(&mut out).map_err(quant_err)?;
                // Quantized matrices are held in host memory.
                Ok(Tensor::from_vec(out, (w.rows(), w.cols()), &Device::Cpu)?)
            }
        }
    }

    /// The whole model dequantized to f32 (tests and references only: a method never builds it).
    pub fn dequantize(&self) -> Result<ParamStore> {
        let map = self.ids().into_iter().map(|id| Ok((id, self.dense(id)?))).collect::<Result<HashMap<_, _>>>()?;
        ParamStore::from_map(self.cfg.clone(), map, Path::new("<quantized>"))
    }
}

/// Bytes of the transient f32 copy a product on a GPU makes of its dequantized matrix (cuBLAS multiplies f32), at
/// the largest matrix: what every quantized method adds on a GPU, in the planner and in the methods' own accounts.
pub fn gpu_dequantized_bytes(cfg: &LlamaConfig) -> usize {
    ParamId::all(cfg).iter().filter(|id| id.is_matrix()).map(|id| 4 * id.numel(cfg)).max().unwrap_or(0)
}

/// A store's slots: matrices and norm weights, each indexed by `ParamId::index` (`None` where the other kind is).
pub type Placed<T> = (Vec<Option<T>>, Vec<Option<Tensor>>);

/// Every parameter's part in its slot (`ParamId::index`): the matrices and the norm weights, each parameter of the
/// config present once (a store's layout, on either device).
pub fn place<T>(cfg: &LlamaConfig, mut parts: HashMap<ParamId, Part<T>>) -> Result<Placed<T>> {
    let n = ParamId::all(cfg).len();
    let (mut mats, mut vecs): (Vec<Option<T>>, Vec<Option<Tensor>>) = ((0..n).map(|_| None).collect(), vec![None; n]);
    for id in ParamId::all(cfg) {
        let i = id.index(cfg);
        match parts.remove(&id).ok_or_else(|| Error::Msg(format!("missing {id:?}")))? {
            Part::Mat(w) => mats[i] = Some(w),
            Part::Vec(t) => vecs[i] = Some(t),
        }
    }
    Ok((mats, vecs))
}

/// One parameter as a quantized method holds it: a quantized matrix or an f32 norm weight.
pub enum Part<W> {
    Mat(W),
    Vec(Tensor),
}

impl<W> Part<W> {
    fn from_tensor(id: ParamId, t: Tensor, quantize: &mut Quantize<W>) -> Result<Part<W>> {
        let t = t.to_dtype(DType::F32)?;
        if id.is_matrix() {
            let (r, c) = t.dims2()?;
            Ok(Part::Mat(with_f32_slice(&t, |v| quantize(id, v, r, c))??))
        } else {
            Ok(Part::Vec(t))
        }
    }
}

pub use crate::error::quant_err;

/// The weight as the integer kernels read it, or the error saying why it cannot be.
fn int_view(w: &(impl QuantWeight + ?Sized)) -> Result<&dyn qtune_quant::IntWeight> {
    w.as_int().ok_or_else(|| {
        Error::Option(
            "--compute int8: this weight format has no integer path (it needs symmetric codes with one scale per \
             row); use --compute f32"
                .into(),
        )
    })
}

/// y = x·Wᵀ with a quantized W, in f32 or on the integer path; x: [N, in] f32 on the CPU.
pub fn qlinear(compute: Compute, w: &(impl QuantWeight + ?Sized), x: &Tensor) -> Result<Tensor> {
    Ok(qlinears(compute, &[w], x)?.swap_remove(0))
}

/// [`qlinear`] for several weights reading the same x (q, k, v; gate, up): x is read out of its tensor, and on the
/// integer path quantized (with the tiles' packed copy), once for all of them.
pub fn qlinears<W: QuantWeight + ?Sized>(compute: Compute, ws: &[&W], x: &Tensor) -> Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    if let Some(w) = ws.iter().find(|w| w.cols() != k) {
        return Err(Error::Shape(format!("x has {k} columns, the weight {}", w.cols())));
    }
    let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let acts = match compute {
        Compute::F32 => None,
        Compute::Int8 => Some(int8::quantize_acts(&xv, m, k, int8::activation_qmax())),
        Compute::Int8Mixed => {
            Some(int8::quantize_acts_mixed(&xv, m, k, int8::activation_qmax(), int8::OUTLIER_THRESHOLD))
        }
    }
    .transpose()
    .map_err(quant_err)?;
    ws.iter()
        .map(|w| {
            let mut y = vec![0f32; m * w.rows()];
            match &acts {
                None => matmul::matmul_xwt(&xv, m, *w, &mut y),
                Some(acts) => int8::matmul_acts(acts, &xv, int_view(*w)?, &mut y),
            }
            .map_err(quant_err)?;
            Ok(Tensor::from_vec(y, (m, w.rows()), x.device())?)
        })
        .collect()
}

/// dx = dy·W with a quantized W, in f32 or on the integer path; dy: [N, out].
pub fn qlinear_t(compute: Compute, w: &(impl QuantWeight + ?Sized), dy: &Tensor) -> Result<Tensor> {
    let (m, n) = dy.dims2()?;
    if n != w.rows() {
        return Err(Error::Shape(format!("dy has {n} columns, the weight {} rows", w.rows())));
    }
    let dv = dy.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut dx = vec![0f32; m * w.cols()];
    match compute {
        Compute::F32 => matmul::matmul_xw(&dv, m, w, &mut dx),
        Compute::Int8 | Compute::Int8Mixed => matmul_xw_int(&dv, m, int_view(w)?, &mut dx),
    }
    .map_err(quant_err)?;
    Ok(Tensor::from_vec(dx, (m, w.cols()), dy.device())?)
}

/// Rows `ids` of a quantized matrix, dequantized: [len(ids), cols].
pub fn qrows(w: &(impl QuantWeight + ?Sized), ids: &Tensor) -> Result<Tensor> {
    let ids_t = ids;
    let ids = ids.to_vec1::<u32>()?;
    let cols = w.cols();
    let mut out = vec![0f32; ids.len() * cols];
    for (i, &r) in ids.iter().enumerate() {
        let r = r as usize;
        if r >= w.rows() {
            return Err(Error::Shape(format!("row {r} of a {}-row matrix", w.rows())));
        }
        w.dequantize_rows(r..r + 1, &mut out[i * cols..(i + 1) * cols]).map_err(quant_err)?;
    }
    Ok(Tensor::from_vec(out, (ids.len(), cols), ids_t.device())?)
}

impl<W: QuantWeight> Weights for QuantStore<W> {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        qlinear(self.compute, self.mat(id), x)
    }
    fn linears(&self, ids: &[ParamId], x: &Tensor) -> Result<Vec<Tensor>> {
        qlinears(self.compute, &ids.iter().map(|&id| self.mat(id)).collect::<Vec<_>>(), x)
    }
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        qlinear_t(self.compute, self.mat(id), dy)
    }
    fn vector(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.vecs[id.index(&self.cfg)].clone().expect("a vector parameter"))
    }
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor> {
        qrows(self.mat(id), ids)
    }
}

#[cfg(test)]
mod tests {
    //! The quantized store's forward equals the f32 forward on its dequantized weights (budget 1e-4 relative:
    //! the kernel sums in a different order), and a loaded-and-quantized model equals a quantized loaded one.
    use super::*;
    use crate::model::llama::tests::tiny_config;
    use crate::model::params::BlockParam;
    use crate::model::Llama;
    use qtune_quant::{Bits, Granularity, IntTensor, QuantSpec, Rounding};

    fn int8(_: ParamId, d: &[f32], r: usize, c: usize) -> Result<IntTensor> {
        IntTensor::quantize(d, r, c, QuantSpec::symmetric(Bits::B8, Granularity::PerRow), Rounding::Nearest)
            .map_err(quant_err)
    }

    #[test]
    fn quantized_forward_equals_forward_on_dequantized_weights() {
        let cfg = tiny_config(false);
        let p = ParamStore::random(&cfg, 2, 0.3, DType::F32).unwrap();
        let q = QuantStore::from_params(&p, &mut int8).unwrap();
        let d = q.dequantize().unwrap();
        let m = Llama::new(cfg);
        let ids = Tensor::new(&[[1u32, 4, 9, 30], [2, 2, 7, 0]], &Device::Cpu).unwrap();
        let a = m.logits(&q, &ids).unwrap();
        let b = m.logits(&d, &ids).unwrap();
        let err = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err / scale < 1e-4, "{err} / {scale}");
    }

    /// Quantizing the input once for q, k and v gives each the very output it gets alone (budget: bit for bit),
    /// at every compute (the mixed one with x's outlier columns above the threshold).
    #[test]
    fn shared_input_equals_one_by_one() {
        let cfg = tiny_config(false);
        let p = ParamStore::random(&cfg, 2, 0.3, DType::F32).unwrap();
        let mut q = QuantStore::from_params(&p, &mut int8).unwrap();
        let x = (Tensor::randn(0f32, 1.0, (5, cfg.hidden_size), &Device::Cpu).unwrap() * 4.0).unwrap();
        let ids = [BlockParam::Q, BlockParam::K, BlockParam::V].map(|b| ParamId::Block(1, b));
        for compute in [Compute::F32, Compute::Int8, Compute::Int8Mixed] {
            q.compute = compute;
            let together = q.linears(&ids, &x).unwrap();
            assert_eq!(together.len(), 3);
            let (m, xv) = (x.dim(0).unwrap(), x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for (&id, y) in ids.iter().zip(&together) {
                // The kernels' own one-weight entry points, which quantize the input for each call.
                let w = q.mat(id);
                let mut alone = vec![0f32; m * w.rows()];
                match compute {
                    Compute::F32 => matmul::matmul_xwt(&xv, m, w, &mut alone),
                    Compute::Int8 => qtune_quant::matmul_xwt_int(&xv, m, w, &mut alone),
                    Compute::Int8Mixed => qtune_quant::matmul_xwt_mixed(&xv, m, w, &mut alone),
                }
                .unwrap();
                assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), alone, "{compute:?} {id:?}");
            }
        }
        let wrong = Tensor::zeros((5, cfg.hidden_size + 1), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(q.linears(&ids, &wrong), Err(Error::Shape(_))));
    }

    #[test]
    fn load_quantizes_while_streaming() {
        let (q, tok) = QuantStore::load(Path::new("tests/fixtures/tiny_llama"), &mut int8).unwrap();
        assert!(tok.is_some());
        let p = crate::model::load_model(Path::new("tests/fixtures/tiny_llama")).unwrap().params;
        let q2 = QuantStore::from_params(&p, &mut int8).unwrap();
        for id in p.ids().into_iter().filter(|id| id.is_matrix()) {
            assert_eq!(q.mat(id), q2.mat(id));
        }
        // INT8 codes, one f32 scale per row.
        let b = q.quant_bytes();
        let mats: usize = p.ids().iter().filter(|id| id.is_matrix()).map(|id| id.numel(&p.cfg)).sum();
        assert_eq!(b.codes, mats);
    }
}
