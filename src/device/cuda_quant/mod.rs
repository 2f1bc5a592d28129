//! Quantized tensors on a GPU: codes and scales in device memory, read and rewritten by `kernels/quant.cu`. Each
//! type is uploaded from its CPU twin in qtune-quant (the loader quantizes on the host as it streams the model, one
//! tensor at a time) and downloaded back for checkpoints, so a format has one definition, the CPU's, and the kernels
//! compute its arithmetic bit for bit (tests/kernels_on_host.rs on the host, tests/gpu.rs on a GPU).
//!
//! Memory: a tensor holds its codes and scales only; reads give one f32 tile ([`GpuInt::dequantize_rows`] of the
//! rows a product needs) and updates rewrite the codes in place (QuZO's fused update, QFT's Lion), so no method
//! holds a full-precision copy of the model on the device.
//!
//! - `int.rs`: INT8/INT4 ([`GpuInt`]) and QuZO's directions; `nf4.rs`: NF4 ([`GpuNf4`]); `hybrid.rs`: QFT's weights
//!   ([`GpuHybrid`]) and Lion; `blocks.rs`: INT8 blocks ([`GpuBlocks8`]). This file: loading and launching.
use super::cuda::launch_error;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};
use qtune_quant::Rounding;
use std::ops::Range;
use std::sync::Arc;

mod blocks;
mod hybrid;
mod int;
mod nf4;

pub use blocks::{GpuBlocks8, Requant, BLOCK8};
pub use hybrid::{lion_f32, GpuHybrid, LionArgs};
pub use int::{add_direction, gauss_absmax, zo_update_f32, GpuInt, ZoDir};
pub use nf4::GpuNf4;

/// Row ids on the device for a gather (an embedding lookup), so a lookup dequantizes only the rows it takes. Each
/// read checks them against its matrix's row count on the host first: a bad id would otherwise be a device fault.
pub struct RowIds {
    buf: CudaSlice<u32>,
    len: usize,
    max: Option<u32>,
}

impl RowIds {
    /// The ids of a 1-D u32 tensor (on the host or the device), uploaded once for all the reads that use them.
    pub fn new(ids: &Tensor, dev: &CudaDevice) -> Result<Self> {
        let host = ids.to_vec1::<u32>()?;
        // A zero-length upload is not an allocation; a read of no rows launches nothing.
        let buf = dev.clone_htod(if host.is_empty() { &[0u32][..] } else { &host })?;
        Ok(RowIds { buf, len: host.len(), max: host.iter().copied().max() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The rows a read takes: a span, or rows by id.
pub enum Rows<'a> {
    Span(Range<usize>),
    Ids(&'a RowIds),
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        match self {
            Rows::Span(r) => r.len(),
            Rows::Ids(ids) => ids.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first row of a span (the kernels' `start` is this times the row length); 0 for ids.
    fn first(&self) -> usize {
        match self {
            Rows::Span(r) => r.start,
            Rows::Ids(_) => 0,
        }
    }

    /// An error unless every row read lies in a matrix of `rows` rows.
    fn check(&self, rows: usize) -> Result<()> {
        match self {
            Rows::Span(r) if r.start > r.end || r.end > rows => {
                Err(Error::Msg(format!("rows {r:?} of a {rows}-row GPU tensor")))
            }
            Rows::Ids(ids) => match ids.max {
                Some(m) if m as usize >= rows => Err(Error::Shape(format!("row {m} of a {rows}-row matrix"))),
                _ => Ok(()),
            },
            Rows::Span(_) => Ok(()),
        }
    }

    /// Pushes the kernels' `ids` argument: the device ids, or a null pointer for a span (`null` must be 0).
    fn push_ids<'b>(&'b self, b: &mut LaunchArgs<'b>, null: &'b u64) {
        match self {
            Rows::Ids(ids) => b.arg(&ids.buf),
            Rows::Span(_) => b.arg(null),
        };
    }
}

/// `kernels/quant.cu`.
const QUANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quant.ptx"));
/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

/// A loaded kernel and the device's stream it launches on.
struct Kernel {
    stream: Arc<CudaStream>,
    f: CudaFunction,
}

impl Kernel {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.f)
    }
}

fn func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, "qtune_quant", QUANT_PTX)?.into_cuda_function();
    Ok(Kernel { stream: dev.cuda_stream(), f })
}

/// One thread per item.
fn grid(what: &str, items: usize) -> Result<LaunchConfig> {
    let blocks =
        u32::try_from(items.div_ceil(THREADS as usize).max(1)).map_err(|_| launch_error(what, "too many elements"))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// The device pointer of a contiguous f32 tensor on `dev`, given to `f` while the tensor's storage is held.
fn with_f32_ptr<R>(t: &Tensor, f: impl FnOnce(u64) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cuda(cs), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(Error::Msg("a quantized kernel's input must be a contiguous f32 tensor on the GPU".into()));
    };
    let view = cs.as_cuda_slice::<f32>()?.slice(a..b);
    let stream = cs.device.cuda_stream();
    let (ptr, _sync) = view.device_ptr(&stream);
    f(ptr)
}

/// A new f32 tensor of `shape` on `dev` from a buffer the kernels wrote.
fn tensor_of(dev: &CudaDevice, buf: CudaSlice<f32>, shape: &[usize]) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(buf, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

fn cuda_of(dev: &Device) -> Result<&CudaDevice> {
    match dev {
        Device::Cuda(d) => Ok(d),
        _ => Err(Error::Msg("a GPU tensor needs a CUDA device".into())),
    }
}

/// The stochastic-rounding arguments of a kernel: (on, seed, tensor, stream) of `Rounding`.
fn sr_args(r: &Rounding) -> (i32, u64, u32, u32) {
    match r {
        Rounding::Nearest => (0, 0, 0, 0),
        Rounding::Stochastic(k) => (1, k.seed, k.tensor, k.stream),
    }
}
