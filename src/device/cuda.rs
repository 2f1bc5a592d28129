//! qtune's own CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs` under the `cuda` feature) and their
//! launches on candle's CUDA device. Each kernel has a CPU twin in `qtune-quant`; `tests/gpu.rs` compares them.
use super::Draw;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Storage, Tensor};

use qtune_quant::rng::RngKey;

/// `kernels/rng.cu`: Philox4x32-10 streams.
const RNG_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rng.ptx"));

pub(crate) fn launch_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("CUDA kernel {what}: {e}"))
}

/// Elements `start .. start + n` of the stream `key` (uniform or Gaussian), as a 1-D f32 tensor on `dev`.
pub fn philox_fill(dev: &CudaDevice, key: &RngKey, start: u64, n: usize, draw: Draw) -> Result<Tensor> {
    if n == 0 {
        return Ok(Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cuda(dev.clone()))?);
    }
    let func = dev.get_or_load_custom_func("philox_fill_f32", "qtune_rng", RNG_PTX)?;
    // SAFETY: every element is written by the kernel below before the tensor is read.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    {
        let (n64, lo, hi) = (n as u64, key.seed as u32, (key.seed >> 32) as u32);
        let gaussian = i32::from(matches!(draw, Draw::Gaussian));
        let blocks =
            u32::try_from(n.div_ceil(256)).map_err(|_| launch_error("philox_fill_f32", "too many elements"))?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&mut out).arg(&n64).arg(&start).arg(&lo).arg(&hi).arg(&key.tensor).arg(&key.stream).arg(&gaussian);
        // SAFETY: the arguments match the kernel's signature (float*, u64, u64, u32, u32, u32, u32, int) and the
        // grid covers n threads, each writing out[j] for j < n.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("philox_fill_f32", e))?;
    }
    let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(Storage::Cuda(storage), n, BackpropOp::none(), false))
}

/// `scale·x + Σ_k c_k·z_k` for a contiguous f32 tensor `x` on a GPU, with z_k the Gaussian stream of `terms[k].0`
/// from element 0 and c_k = `terms[k].1`: one output buffer, each direction added by `philox_axpy_f32` as it is
/// drawn, so no direction tensor is ever allocated (the GPU's version of MeZO's chunked loop).
pub fn add_gaussians(x: &Tensor, scale: f32, terms: &[(RngKey, f32)]) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Err(Error::Msg("add_gaussians: the tensor is not on a GPU".into()));
    };
    if terms.is_empty() || x.elem_count() == 0 {
        return Ok((x * scale as f64)?);
    }
    let n = x.elem_count();
    let func = dev.get_or_load_custom_func("philox_axpy_f32", "qtune_rng", RNG_PTX)?;
    let stream = dev.cuda_stream();
    // SAFETY: the first launch writes every element before any is read.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let blocks = u32::try_from(n.div_ceil(256)).map_err(|_| launch_error("philox_axpy_f32", "too many elements"))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (storage, layout) = x.storage_and_layout();
    let (candle_core::Storage::Cuda(cs), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(Error::Msg("add_gaussians: the tensor is not a contiguous GPU tensor".into()));
    };
    let x_ptr = {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let view = cs.as_cuda_slice::<f32>()?.slice(a..b);
        let (p, _sync) = view.device_ptr(&stream);
        p
    };
    let (n64, start) = (n as u64, 0u64);
    for (k, (key, coef)) in terms.iter().enumerate() {
        // The first term reads x; the others add in place (out is read and written by the same thread).
        let (src, s) = if k == 0 {
            (x_ptr, scale)
        } else {
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let (p, _sync) = out.device_ptr(&stream);
            (p, 1.0f32)
        };
        let (lo, hi) = (key.seed as u32, (key.seed >> 32) as u32);
        let mut bld = func.builder();
        bld.arg(&mut out).arg(&src).arg(&s).arg(coef).arg(&n64).arg(&start).arg(&lo).arg(&hi);
        bld.arg(&key.tensor).arg(&key.stream);
        // SAFETY: the arguments match `philox_axpy_f32(float*, const float*, float, float, u64, u64, u32, u32, u32,
        // u32)`; src points at n floats (x's contiguous range, or out itself) and the grid's guard keeps j < n.
        unsafe { bld.launch(cfg) }.map_err(|e| launch_error("philox_axpy_f32", e))?;
    }
    drop(storage);
    let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), x.shape().clone(), BackpropOp::none(), false))
}
