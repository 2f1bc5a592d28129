//! A model whose matrices are held quantized on a GPU (`device::cuda_quant`: INT8/INT4, NF4, QFT's hybrid) and
//! whose norm weights are f32 tensors there. Each matrix is quantized on the host as the loader reads it and moved
//! to the device at once, so the host holds one tensor at a time and the device never holds an f32 model: a product
//! dequantizes its one matrix into a transient f32 tensor (cuBLAS then multiplies it), freed when the product is
//! done. The CPU's twin is [`super::quantized::QuantStore`]; both implement [`Weights`].
use super::config::LlamaConfig;
use super::llama::Weights;
use super::params::ParamId;
use super::quantized::{place, Part, Quantize, Source};
use crate::device::cuda_quant::{GpuHybrid, GpuInt, GpuNf4, RowIds};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use qtune_quant::{HybridTensor, IntTensor, Nf4Tensor};

/// A quantized matrix on a GPU.
pub enum GpuMat {
    Int(GpuInt),
    Nf4(GpuNf4),
    Hybrid(GpuHybrid),
}

impl GpuMat {
    /// The whole matrix as a transient f32 tensor [rows, cols] on the device.
    pub fn dequantize(&self) -> Result<Tensor> {
        match self {
            GpuMat::Int(w) => w.dequantize_rows(0..w.rows()),
            GpuMat::Nf4(w) => w.dequantize_rows(0..w.rows()),
            GpuMat::Hybrid(w) => w.dequantize_rows(0..w.rows()),
        }
    }

    /// Rows `ids` (a 1-D u32 tensor: an embedding lookup) as a transient f32 tensor [ids, cols]: only those rows
    /// dequantized.
    pub fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = RowIds::new(ids, self.device())?;
        match self {
            GpuMat::Int(w) => w.gather_rows(&ids),
            GpuMat::Nf4(w) => w.gather_rows(&ids),
            GpuMat::Hybrid(w) => w.gather_rows(&ids),
        }
    }

    /// The device the matrix is on.
    pub fn device(&self) -> &candle_core::cuda_backend::CudaDevice {
        match self {
            GpuMat::Int(w) => w.device(),
            GpuMat::Nf4(w) => w.device(),
            GpuMat::Hybrid(w) => w.device(),
        }
    }

    /// Bytes on the device.
    pub fn device_bytes(&self) -> usize {
        match self {
            GpuMat::Int(w) => w.device_bytes(),
            GpuMat::Nf4(w) => w.device_bytes(),
            GpuMat::Hybrid(w) => w.device_bytes(),
        }
    }
}

/// A CPU format that has a GPU twin.
pub trait ToGpu {
    fn to_gpu(&self, dev: &candle_core::cuda_backend::CudaDevice) -> Result<GpuMat>;
}

impl ToGpu for IntTensor {
    fn to_gpu(&self, dev: &candle_core::cuda_backend::CudaDevice) -> Result<GpuMat> {
        Ok(GpuMat::Int(GpuInt::upload(dev, self)?))
    }
}

impl ToGpu for Nf4Tensor {
    fn to_gpu(&self, dev: &candle_core::cuda_backend::CudaDevice) -> Result<GpuMat> {
        Ok(GpuMat::Nf4(GpuNf4::upload(dev, self)?))
    }
}

impl ToGpu for HybridTensor {
    fn to_gpu(&self, dev: &candle_core::cuda_backend::CudaDevice) -> Result<GpuMat> {
        Ok(GpuMat::Hybrid(GpuHybrid::upload(dev, self)?))
    }
}

/// The model's parameters on a GPU: quantized matrices and f32 norm weights, indexed by `ParamId::index`.
pub struct GpuStore {
    pub cfg: LlamaConfig,
    mats: Vec<Option<GpuMat>>,
    vecs: Vec<Option<Tensor>>,
}

impl GpuStore {
    /// Reads `source`, quantizing each matrix on the host with `quantize` and moving it to `dev` at once.
    pub fn load<W: ToGpu>(source: Source, quantize: &mut Quantize<W>, dev: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = dev else {
            return Err(Error::Msg("a GPU store needs a CUDA device".into()));
        };
        let mut parts = std::collections::HashMap::new();
        let cfg = source.stream_parts(quantize, &mut |id, part| {
            let moved = match part {
                Part::Mat(w) => Part::Mat(w.to_gpu(cuda)?),
                Part::Vec(t) => Part::Vec(t.to_device(dev)?),
            };
            parts.insert(id, moved);
            Ok(())
        })?;
        let (mats, vecs) = place(&cfg, parts)?;
        Ok(GpuStore { cfg, mats, vecs })
    }

    /// Quantizes f32 parameters that are on a GPU there, matrix by matrix (`quantize` names the format; QAT's copy
    /// of its master weights).
    pub fn quantize_params(params: &super::ParamStore, spec: qtune_quant::QuantSpec) -> Result<Self> {
        let cfg = params.cfg.clone();
        let mut parts = std::collections::HashMap::new();
        for id in ParamId::all(&cfg) {
            let t = params.get(id);
            let part = if id.is_matrix() {
                Part::Mat(GpuMat::Int(GpuInt::quantize(&t.contiguous()?, spec, qtune_quant::Rounding::Nearest)?))
            } else {
                Part::Vec(t.clone())
            };
            parts.insert(id, part);
        }
        let (mats, vecs) = place(&cfg, parts)?;
        Ok(GpuStore { cfg, mats, vecs })
    }

    pub fn mat(&self, id: ParamId) -> &GpuMat {
        self.mats[id.index(&self.cfg)].as_ref().expect("a matrix parameter")
    }

    pub fn mat_mut(&mut self, id: ParamId) -> &mut GpuMat {
        let i = id.index(&self.cfg);
        self.mats[i].as_mut().expect("a matrix parameter")
    }

    pub fn set_vector(&mut self, id: ParamId, t: Tensor) {
        let i = id.index(&self.cfg);
        self.vecs[i] = Some(t);
    }

    /// Bytes of the quantized matrices on the device.
    pub fn quant_bytes(&self) -> usize {
        self.mats.iter().flatten().map(GpuMat::device_bytes).sum()
    }

    /// Bytes of the f32 norm weights.
    pub fn f32_bytes(&self) -> usize {
        self.vecs.iter().flatten().map(|t| t.elem_count() * 4).sum()
    }
}

impl Weights for GpuStore {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        let w = self.mat(id).dequantize()?;
        Ok(x.matmul(&w.t()?)?)
    }

    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        let w = self.mat(id).dequantize()?;
        Ok(dy.matmul(&w)?)
    }

    fn vector(&self, id: ParamId) -> Result<Tensor> {
        self.vecs[id.index(&self.cfg)].clone().ok_or_else(|| Error::Msg(format!("{id:?} is not a vector parameter")))
    }

    /// Only the rows taken are dequantized (a transient of [ids, cols]).
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor> {
        self.mat(id).gather_rows(ids)
    }
}
