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

fn launch_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("CUDA kernel {what}: {e}"))
}

/// Elements `start .. start + n` of the stream `key` (uniform or Gaussian), as a 1-D f32 tensor on `dev`.
pub fn philox_fill(dev: &CudaDevice, key: &RngKey, start: u64, n: usize, draw: Draw) -> Result<Tensor> {
    let func = dev.get_or_load_custom_func("philox_fill_f32", "qtune_rng", RNG_PTX)?;
    // SAFETY: every element is written by the kernel below before the tensor is read.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    if n > 0 {
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
