//! Quantized tensors on a GPU: codes and scales in device memory, read and rewritten by `kernels/quant.cu`. Each
//! type is uploaded from its CPU twin in qtune-quant (the loader quantizes on the host as it streams the model, one
//! tensor at a time) and downloaded back for checkpoints, so a format has one definition, the CPU's, and the kernels
//! compute its arithmetic bit for bit (tests/kernels_on_host.rs on the host, tests/gpu.rs on a GPU).
//!
//! Memory: a tensor holds its codes and scales only; reads give one f32 tile ([`GpuInt::dequantize_rows`] of the
//! rows a product needs) and updates rewrite the codes in place (QuZO's fused update, QFT's Lion), so no method
//! holds a full-precision copy of the model on the device.
use super::cuda::launch_error;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};
use qtune_quant::nf4::{dynamic_map, Nf4Scales, DQ_BLOCK, NF4_LEVELS};
use qtune_quant::{Bits, HybridTensor, IntTensor, Nf4Tensor, QuantSpec, QuantWeight, RngKey, Rounding};
use std::ops::Range;
use std::sync::Arc;

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

/// An [`IntTensor`] on a GPU: INT8 or INT4 codes (the CPU's byte layout), one scale (and offset) per group.
pub struct GpuInt {
    rows: usize,
    cols: usize,
    spec: QuantSpec,
    group: usize,
    codes: CudaSlice<u8>,
    scales: CudaSlice<f32>,
    offsets: Option<CudaSlice<f32>>,
    dev: CudaDevice,
}

impl GpuInt {
    pub fn upload(dev: &CudaDevice, t: &IntTensor) -> Result<Self> {
        Ok(GpuInt {
            rows: t.rows(),
            cols: t.cols(),
            spec: t.spec(),
            group: t.group_len(),
            codes: dev.clone_htod(t.codes())?,
            scales: dev.clone_htod(t.scales())?,
            offsets: t.offsets().map(|o| dev.clone_htod(o)).transpose()?,
            dev: dev.clone(),
        })
    }

    /// A rows×cols tensor in `spec` with zero codes and scales, to be filled by [`GpuInt::recalibrate`].
    pub fn zeros(dev: &CudaDevice, rows: usize, cols: usize, spec: QuantSpec) -> Result<Self> {
        let n = rows * cols;
        let group = spec.group_len(rows, cols).map_err(crate::model::quantized::quant_err)?;
        let groups = n.div_ceil(group).max(1);
        Ok(GpuInt {
            rows,
            cols,
            spec,
            group,
            codes: dev.alloc_zeros(spec.bits.code_bytes(n).max(1))?,
            scales: dev.alloc_zeros(groups)?,
            offsets: if spec.symmetric { None } else { Some(dev.alloc_zeros(groups)?) },
            dev: dev.clone(),
        })
    }

    /// `data` ([rows, cols] f32 on the device) quantized on the device: the CPU's `IntTensor::quantize`, bit for bit.
    pub fn quantize(data: &Tensor, spec: QuantSpec, rounding: Rounding) -> Result<Self> {
        let (rows, cols) = data.dims2()?;
        let mut t = Self::zeros(cuda_of(data.device())?, rows, cols, spec)?;
        t.recalibrate(data, rounding)?;
        Ok(t)
    }

    /// The tensor back on the host (checkpoints, tests).
    pub fn download(&self) -> Result<IntTensor> {
        let codes = self.dev.clone_dtoh(&self.codes)?;
        let scales = self.dev.clone_dtoh(&self.scales)?;
        let offsets = self.offsets.as_ref().map(|o| self.dev.clone_dtoh(o)).transpose()?;
        IntTensor::from_raw(self.rows, self.cols, self.spec, codes, scales, offsets)
            .map_err(crate::model::quantized::quant_err)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn spec(&self) -> QuantSpec {
        self.spec
    }

    /// Bytes on the device: codes, scales and offsets.
    pub fn device_bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.offsets.as_ref().map_or(0, |o| o.len()))
    }

    fn bits(&self) -> i32 {
        self.spec.bits.count() as i32
    }

    fn check_rows(&self, rows: &Range<usize>) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::Msg(format!("rows {rows:?} of a {}-row GPU tensor", self.rows)));
        }
        Ok(())
    }

    /// Rows `rows` as an f32 tensor [rows, cols] on the device.
    pub fn dequantize_rows(&self, rows: Range<usize>) -> Result<Tensor> {
        self.check_rows(&rows)?;
        let n = rows.len() * self.cols;
        let start = (rows.start * self.cols) as u64;
        // SAFETY: the kernel writes every one of the n elements.
        let mut out = unsafe { self.dev.alloc::<f32>(n.max(1))? };
        if n > 0 {
            let f = func(&self.dev, "int_dequant_f32")?;
            let (n64, bits, sym, group) = (n as u64, self.bits(), self.spec.symmetric as i32, self.group as u64);
            let null = 0u64;
            let mut b = f.builder();
            b.arg(&mut out).arg(&self.codes).arg(&n64).arg(&start).arg(&bits).arg(&sym).arg(&group).arg(&self.scales);
            match &self.offsets {
                Some(o) => b.arg(o),
                None => b.arg(&null),
            };
            // SAFETY: the arguments follow int_dequant_f32's signature; the guard keeps j < n, and every element
            // it reads (start + j < rows·cols) lies within the codes and its group within the scales.
            unsafe { b.launch(grid("int_dequant_f32", n)?) }.map_err(|e| launch_error("int_dequant_f32", e))?;
        }
        Ok(tensor_of(&self.dev, out, &[rows.len(), self.cols]))
    }

    /// Re-encodes rows `rows` from `data` ([rows, cols] f32 on the device) against the frozen scales, each code
    /// moved by the rounded distance from its current value (the CPU's `requantize_rows_frozen`).
    pub fn requantize_rows_frozen(&mut self, rows: Range<usize>, data: &Tensor, rounding: Rounding) -> Result<()> {
        self.encode(rows, data, rounding, true)
    }

    fn encode(&mut self, rows: Range<usize>, data: &Tensor, rounding: Rounding, delta: bool) -> Result<()> {
        self.check_rows(&rows)?;
        let n = rows.len() * self.cols;
        if data.elem_count() != n {
            return Err(Error::Msg(format!("{} values for rows {rows:?} of {} columns", data.elem_count(), self.cols)));
        }
        if n == 0 {
            return Ok(());
        }
        let bytes = if self.spec.bits == Bits::B8 {
            n
        } else {
            let s = rows.start * self.cols;
            (s + n - 1) / 2 - s / 2 + 1
        };
        let f = func(&self.dev, "int_encode")?;
        let (n64, start) = (n as u64, (rows.start * self.cols) as u64);
        let (bits, sym, group, delta) = (self.bits(), self.spec.symmetric as i32, self.group as u64, delta as i32);
        let (sr, seed, tensor, stream) = sr_args(&rounding);
        let (null, piece) = (0u64, 0u64);
        with_f32_ptr(&data.contiguous()?, |x| {
            let mut b = f.builder();
            b.arg(&mut self.codes).arg(&x).arg(&n64).arg(&start).arg(&bits).arg(&sym).arg(&group).arg(&self.scales);
            match &self.offsets {
                Some(o) => b.arg(o),
                None => b.arg(&null),
            };
            b.arg(&delta).arg(&sr).arg(&seed).arg(&tensor).arg(&stream).arg(&piece);
            // SAFETY: int_encode's signature; one thread per byte holding elements [start, start + n), each reading
            // x[i - start] (n floats) and writing only its own byte.
            unsafe { b.launch(grid("int_encode", bytes)?) }.map_err(|e| launch_error("int_encode", e))?;
            Ok(())
        })
    }

    /// New group scales (and offsets) from `data` (the whole tensor, [rows, cols] f32 on the device), and `data`
    /// encoded on them afresh (the CPU's `recalibrate`).
    pub fn recalibrate(&mut self, data: &Tensor, rounding: Rounding) -> Result<()> {
        let n = self.rows * self.cols;
        if data.elem_count() != n {
            return Err(Error::Msg(format!(
                "{} values for a {}x{} GPU tensor",
                data.elem_count(),
                self.rows,
                self.cols
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let data = data.contiguous()?;
        let groups = n.div_ceil(self.group);
        let f = func(&self.dev, "int_group_scales")?;
        let blocks = u32::try_from(groups).map_err(|_| launch_error("int_group_scales", "too many groups"))?;
        // One block per group of a power of two up to 1024 threads (threads past the group's end add nothing).
        let threads = (self.group.next_power_of_two().min(1024)) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let (n64, group, bits, sym, null) =
            (n as u64, self.group as u64, self.bits(), self.spec.symmetric as i32, 0u64);
        with_f32_ptr(&data, |x| {
            let mut b = f.builder();
            b.arg(&mut self.scales);
            match &mut self.offsets {
                Some(o) => b.arg(o),
                None => b.arg(&null),
            };
            b.arg(&x).arg(&n64).arg(&group).arg(&bits).arg(&sym);
            // SAFETY: int_group_scales' signature; block g reads x[g·group .. min((g+1)·group, n)] and writes
            // scales[g] (and offsets[g] when asymmetric, which is when offsets exist).
            unsafe { b.launch(cfg) }.map_err(|e| launch_error("int_group_scales", e))?;
            Ok(())
        })?;
        self.encode(0..self.rows, &data, rounding, false)
    }

    /// QuZO's update of rows `rows`, fused (dequantize, step, re-encode with stochastic rounding on `key`): `dirs`
    /// are the step's directions of this tensor with their projected gradients, `u2` the rounding stream of the
    /// update's directions (None: to nearest, Q-RGE1).
    pub fn zo_update(
        &mut self,
        rows: Range<usize>,
        dirs: &[ZoDir],
        u2: Option<u32>,
        lr: f64,
        decay: f64,
        key: RngKey,
    ) -> Result<()> {
        self.check_rows(&rows)?;
        let n = rows.len() * self.cols;
        if n == 0 || dirs.is_empty() {
            return Ok(());
        }
        let start = rows.start * self.cols;
        let bytes = if self.spec.bits == Bits::B8 { n } else { (start + n - 1) / 2 - start / 2 + 1 };
        let raw = self.dev.clone_htod(&zo_dirs_bytes(dirs))?;
        let f = func(&self.dev, "zo_update_int")?;
        let (n64, start, bits, sym, group) =
            (n as u64, start as u64, self.bits(), self.spec.symmetric as i32, self.group as u64);
        let (k, u2) = (dirs.len() as u32, u2.map_or(-1i64, i64::from));
        let null = 0u64;
        let mut b = f.builder();
        b.arg(&mut self.codes).arg(&n64).arg(&start).arg(&bits).arg(&sym).arg(&group).arg(&self.scales);
        match &self.offsets {
            Some(o) => b.arg(o),
            None => b.arg(&null),
        };
        b.arg(&raw).arg(&k).arg(&u2).arg(&lr).arg(&decay).arg(&key.seed).arg(&key.tensor).arg(&key.stream);
        // SAFETY: zo_update_int's signature; `raw` holds k ZoDir records; one thread per byte as in int_encode.
        unsafe { b.launch(grid("zo_update_int", bytes)?) }.map_err(|e| launch_error("zo_update_int", e))?;
        Ok(())
    }
}

/// One direction of a QuZO step as `kernels/quant.cu` reads it: the Gaussian stream, the quantized direction's scale
/// and grid, and the direction's projected gradient μ.
#[derive(Clone, Copy, Debug)]
pub struct ZoDir {
    pub gauss: RngKey,
    pub scale: f32,
    pub qmax: f32,
    pub mu: f64,
}

/// The kernels' `ZoDir` records: 32 bytes each (u64 seed, u32 tensor, u32 stream, f32 scale, f32 qmax, f64 μ).
fn zo_dirs_bytes(dirs: &[ZoDir]) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 * dirs.len());
    for d in dirs {
        b.extend(d.gauss.seed.to_le_bytes());
        b.extend(d.gauss.tensor.to_le_bytes());
        b.extend(d.gauss.stream.to_le_bytes());
        b.extend(d.scale.to_le_bytes());
        b.extend(d.qmax.to_le_bytes());
        b.extend(d.mu.to_le_bytes());
    }
    b
}

/// `x + eps·u` for a contiguous f32 tensor `x` holding elements `start ..` of a tensor whose quantized direction is
/// `d` (rounded on `sr_stream`, or to nearest): QuZO's perturbed tile, in place of a new buffer.
pub fn add_direction(x: &Tensor, start: u64, eps: f32, d: &ZoDir, sr_stream: Option<u32>) -> Result<Tensor> {
    let dev = cuda_of(x.device())?;
    let out = x.contiguous()?.copy()?;
    let n = out.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let f = func(dev, "qdir_axpy_f32")?;
    let (n64, sr) = (n as u64, sr_stream.map_or(-1i64, i64::from));
    with_f32_ptr(&out, |p| {
        let mut b = f.builder();
        b.arg(&p).arg(&n64).arg(&start).arg(&eps).arg(&d.gauss.seed).arg(&d.gauss.tensor).arg(&d.gauss.stream);
        b.arg(&d.scale).arg(&d.qmax).arg(&sr);
        // SAFETY: qdir_axpy_f32's signature; out holds n floats, each thread j < n reads and writes out[j].
        unsafe { b.launch(grid("qdir_axpy_f32", n)?) }.map_err(|e| launch_error("qdir_axpy_f32", e))?;
        Ok(())
    })?;
    Ok(out)
}

/// QuZO's update of an f32 vector (norm weights: elements 0..) on the device, in place of a new tensor.
pub fn zo_update_f32(w: &Tensor, dirs: &[ZoDir], u2: Option<u32>, lr: f64, decay: f64) -> Result<Tensor> {
    let dev = cuda_of(w.device())?;
    let out = w.contiguous()?.copy()?;
    let n = out.elem_count();
    if n == 0 || dirs.is_empty() {
        return Ok(out);
    }
    let raw = dev.clone_htod(&zo_dirs_bytes(dirs))?;
    let f = func(dev, "zo_update_f32")?;
    let (n64, start, k, u2) = (n as u64, 0u64, dirs.len() as u32, u2.map_or(-1i64, i64::from));
    with_f32_ptr(&out, |p| {
        let mut b = f.builder();
        b.arg(&p).arg(&n64).arg(&start).arg(&raw).arg(&k).arg(&u2).arg(&lr).arg(&decay);
        // SAFETY: zo_update_f32's signature; out holds n floats, `raw` k ZoDir records.
        unsafe { b.launch(grid("zo_update_f32", n)?) }.map_err(|e| launch_error("zo_update_f32", e))?;
        Ok(())
    })?;
    Ok(out)
}

/// QFT's Lion step of an f32 vector (norm weights), exactly in f32.
pub fn lion_f32(w: &Tensor, m: &GpuBlocks8, g: &GpuBlocks8, a: LionArgs) -> Result<Tensor> {
    let dev = cuda_of(w.device())?;
    let out = w.contiguous()?.copy()?;
    let n = out.elem_count();
    if m.len != n || g.len != n {
        return Err(Error::Msg(format!("Lion on {n} weights with {} momenta and {} gradients", m.len, g.len)));
    }
    if n == 0 {
        return Ok(out);
    }
    let f = func(dev, "lion_f32")?;
    let n64 = n as u64;
    with_f32_ptr(&out, |p| {
        let mut b = f.builder();
        b.arg(&p).arg(&n64).arg(&m.codes).arg(&m.scales).arg(&g.codes).arg(&g.scales);
        b.arg(&a.gs).arg(&a.b1).arg(&a.lr).arg(&a.wd);
        // SAFETY: lion_f32's signature; thread i < n reads element i of each operand and writes out[i].
        unsafe { b.launch(grid("lion_f32", n)?) }.map_err(|e| launch_error("lion_f32", e))?;
        Ok(())
    })?;
    Ok(out)
}

/// The largest |z| over elements 0..n of the Gaussian stream `key` (QuZO's direction scale), computed on the GPU:
/// the CPU's `QDirection::new` reduces the same draws, and a maximum does not depend on the order.
pub fn gauss_absmax(dev: &CudaDevice, key: &RngKey, n: usize) -> Result<f32> {
    let mut out = dev.alloc_zeros::<u32>(1)?;
    if n > 0 {
        let f = func(dev, "gauss_absmax")?;
        let blocks = n.div_ceil(THREADS as usize).min(4096) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&mut out).arg(&n64).arg(&key.seed).arg(&key.tensor).arg(&key.stream);
        // SAFETY: gauss_absmax's signature, 256 threads per block; `out` is one zeroed u32.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("gauss_absmax", e))?;
    }
    Ok(f32::from_bits(dev.clone_dtoh(&out)?[0]))
}

/// An [`Nf4Tensor`] on a GPU: packed codes and its block absmax values (plain, or double-quantized).
pub struct GpuNf4 {
    rows: usize,
    cols: usize,
    block: usize,
    codes: CudaSlice<u8>,
    absmax: Option<CudaSlice<f32>>,
    /// Double quantization: codes, second-level absmax, offset.
    dq: Option<(CudaSlice<u8>, CudaSlice<f32>, f32)>,
    levels: CudaSlice<f32>,
    dmap: CudaSlice<f32>,
    dev: CudaDevice,
}

impl GpuNf4 {
    pub fn upload(dev: &CudaDevice, t: &Nf4Tensor) -> Result<Self> {
        let (absmax, dq) = match t.scales() {
            Nf4Scales::Plain(a) => (Some(dev.clone_htod(a)?), None),
            Nf4Scales::Double(d) => (None, Some((dev.clone_htod(&d.codes)?, dev.clone_htod(&d.absmax2)?, d.offset))),
        };
        Ok(GpuNf4 {
            rows: t.rows(),
            cols: t.cols(),
            block: t.block_len(),
            codes: dev.clone_htod(t.codes())?,
            absmax,
            dq,
            levels: dev.clone_htod(&NF4_LEVELS)?,
            dmap: dev.clone_htod(&dynamic_map())?,
            dev: dev.clone(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes on the device (the two 1 KiB tables left out).
    pub fn device_bytes(&self) -> usize {
        let scales = match (&self.absmax, &self.dq) {
            (Some(a), _) => 4 * a.len(),
            (None, Some((c, a2, _))) => c.len() + 4 * a2.len() + 4,
            (None, None) => 0,
        };
        self.codes.len() + scales
    }

    /// Rows `rows` as an f32 tensor [rows, cols] on the device.
    pub fn dequantize_rows(&self, rows: Range<usize>) -> Result<Tensor> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::Msg(format!("rows {rows:?} of a {}-row GPU tensor", self.rows)));
        }
        let n = rows.len() * self.cols;
        // SAFETY: the kernel writes every one of the n elements.
        let mut out = unsafe { self.dev.alloc::<f32>(n.max(1))? };
        if n > 0 {
            let f = func(&self.dev, "nf4_dequant_f32")?;
            let (n64, start, block, dq_block) =
                (n as u64, (rows.start * self.cols) as u64, self.block as u64, DQ_BLOCK as u64);
            let null = 0u64;
            let mut b = f.builder();
            b.arg(&mut out).arg(&self.codes).arg(&n64).arg(&start).arg(&block).arg(&self.levels);
            match (&self.absmax, &self.dq) {
                (Some(a), _) => {
                    b.arg(a).arg(&null).arg(&null).arg(&0f32);
                }
                (None, Some((c, a2, off))) => {
                    b.arg(&null).arg(c).arg(a2).arg(off);
                }
                (None, None) => return Err(Error::Msg("an NF4 tensor without scales".into())),
            }
            b.arg(&dq_block).arg(&self.dmap);
            // SAFETY: nf4_dequant_f32's signature; exactly one of absmax and the double-quantized scales is given;
            // the guard keeps j < n and start + j < rows·cols.
            unsafe { b.launch(grid("nf4_dequant_f32", n)?) }.map_err(|e| launch_error("nf4_dequant_f32", e))?;
        }
        Ok(tensor_of(&self.dev, out, &[rows.len(), self.cols]))
    }
}

/// QFT's [`HybridTensor`] on a GPU: the dense INT8 part (one scale per row) and the CSR outliers.
pub struct GpuHybrid {
    dense: GpuInt,
    fraction: f64,
    /// The outlier threshold of the last calibration (which the GPU does not redo).
    threshold: f32,
    row_ptr: CudaSlice<u32>,
    col_idx: CudaSlice<u32>,
    values: CudaSlice<f32>,
}

impl GpuHybrid {
    pub fn upload(dev: &CudaDevice, t: &HybridTensor) -> Result<Self> {
        let (row_ptr, col_idx, values) = t.sparse();
        Ok(GpuHybrid {
            dense: GpuInt::upload(dev, t.dense())?,
            fraction: t.fraction(),
            threshold: t.threshold(),
            row_ptr: dev.clone_htod(row_ptr)?,
            // An empty slice cannot be allocated: one unused entry stands in.
            col_idx: dev.clone_htod(if col_idx.is_empty() { &[0u32][..] } else { col_idx })?,
            values: dev.clone_htod(if values.is_empty() { &[0f32][..] } else { values })?,
        })
    }

    /// The whole tensor back on the host (checkpoints, recalibration).
    pub fn download(&self) -> Result<HybridTensor> {
        let dev = &self.dense.dev;
        let row_ptr = dev.clone_dtoh(&self.row_ptr)?;
        let nnz = row_ptr.last().copied().unwrap_or(0) as usize;
        let (mut col_idx, mut values) = (dev.clone_dtoh(&self.col_idx)?, dev.clone_dtoh(&self.values)?);
        col_idx.truncate(nnz);
        values.truncate(nnz);
        HybridTensor::from_raw(self.dense.download()?, self.fraction, self.threshold, row_ptr, col_idx, values)
            .map_err(crate::model::quantized::quant_err)
    }

    /// The dense codes and the outlier values back on the host (checkpoints, tests).
    pub fn download_parts(&self) -> Result<(IntTensor, Vec<f32>)> {
        let dev = &self.dense.dev;
        let nnz = dev.clone_dtoh(&self.row_ptr)?.last().copied().unwrap_or(0) as usize;
        let mut values = dev.clone_dtoh(&self.values)?;
        values.truncate(nnz);
        Ok((self.dense.download()?, values))
    }

    pub fn rows(&self) -> usize {
        self.dense.rows
    }

    /// The fraction of entries kept as outliers.
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    pub fn device_bytes(&self) -> usize {
        self.dense.device_bytes() + 4 * (self.row_ptr.len() + self.col_idx.len() + self.values.len())
    }

    /// Rows `rows` as an f32 tensor [rows, cols]: the dense values with the outliers written over them.
    pub fn dequantize_rows(&self, rows: Range<usize>) -> Result<Tensor> {
        let t = self.dense.dequantize_rows(rows.clone())?;
        if rows.is_empty() {
            return Ok(t);
        }
        let f = func(&self.dense.dev, "csr_scatter_rows")?;
        let (r0, nrows, cols) = (rows.start as u64, rows.len() as u64, self.dense.cols as u64);
        with_f32_ptr(&t, |p| {
            let mut b = f.builder();
            b.arg(&p).arg(&self.row_ptr).arg(&self.col_idx).arg(&self.values).arg(&r0).arg(&nrows).arg(&cols);
            // SAFETY: csr_scatter_rows' signature; thread r < rows writes its row's outlier columns (< cols).
            unsafe { b.launch(grid("csr_scatter_rows", rows.len())?) }.map_err(|e| launch_error("csr_scatter_rows", e))
        })?;
        Ok(t)
    }

    /// QFT's Lion step on the whole matrix: momentum `m` and gradient `g` (times `gs`, the clipping factor) in INT8
    /// blocks; dense codes re-encoded on their frozen row grid with stochastic rounding on `key`, outliers exactly.
    pub fn lion_step(&mut self, m: &GpuBlocks8, g: &GpuBlocks8, a: LionArgs, key: RngKey) -> Result<()> {
        let (rows, cols) = (self.dense.rows, self.dense.cols);
        let n = rows * cols;
        if m.len != n || g.len != n {
            return Err(Error::Msg(format!("Lion on {n} weights with {} momenta and {} gradients", m.len, g.len)));
        }
        let dev = self.dense.dev.clone();
        let (n64, cols64, rows64) = (n as u64, cols as u64, rows as u64);
        let f = func(&dev, "lion_dense")?;
        let mut b = f.builder();
        b.arg(&mut self.dense.codes).arg(&self.dense.scales).arg(&n64).arg(&cols64);
        b.arg(&m.codes).arg(&m.scales).arg(&g.codes).arg(&g.scales).arg(&a.gs).arg(&a.b1).arg(&a.lr).arg(&a.wd);
        b.arg(&key.seed).arg(&key.tensor).arg(&key.stream);
        // SAFETY: lion_dense's signature; thread i < n reads element i of every operand and writes codes[i].
        unsafe { b.launch(grid("lion_dense", n)?) }.map_err(|e| launch_error("lion_dense", e))?;
        let f = func(&dev, "lion_outliers")?;
        let mut b = f.builder();
        b.arg(&mut self.values).arg(&mut self.dense.codes).arg(&self.row_ptr).arg(&self.col_idx).arg(&rows64);
        b.arg(&cols64).arg(&m.codes).arg(&m.scales).arg(&g.codes).arg(&g.scales).arg(&a.gs).arg(&a.b1).arg(&a.lr);
        b.arg(&a.wd);
        // SAFETY: lion_outliers' signature; thread r < rows owns its row's outliers and their dense codes. It runs
        // after lion_dense on the same stream, so the codes it zeroes stay zero.
        unsafe { b.launch(grid("lion_outliers", rows)?) }.map_err(|e| launch_error("lion_outliers", e))?;
        Ok(())
    }
}

/// Lion's hyperparameters as the kernels take them (all f32, as the CPU's QFT computes).
#[derive(Clone, Copy, Debug)]
pub struct LionArgs {
    /// The gradient's factor (global-norm clipping).
    pub gs: f32,
    pub b1: f32,
    pub lr: f32,
    pub wd: f32,
}

/// Elements per scale of [`GpuBlocks8`] (`BLOCK8` in kernels/quant.cu).
pub const BLOCK8: usize = 256;

/// A flat array in INT8 blocks on a GPU (QFT's `Int8Blocks`: a gradient-stack entry, Lion's momentum): INT8 codes,
/// one scale per [`BLOCK8`] elements, stochastic rounding keyed per `piece` elements (the seed xor-ed with the
/// piece's index times φ, at the index within the piece) as the CPU's pieces are.
pub struct GpuBlocks8 {
    len: usize,
    piece: usize,
    codes: CudaSlice<u8>,
    scales: CudaSlice<f32>,
    dev: CudaDevice,
}

/// What [`GpuBlocks8::requant`] writes (the modes of `blocks_requant`).
#[derive(Clone, Copy)]
pub enum Requant<'a> {
    /// x: a gradient pushed on the stack.
    Set(&'a Tensor),
    /// old + x: a later micro-batch's gradient.
    Add(&'a Tensor),
    /// β₂·old + (1 − β₂)·g·gs: Lion's momentum.
    Momentum { g: &'a GpuBlocks8, gs: f32, b2: f32 },
}

impl GpuBlocks8 {
    /// Zero codes and scales for `len` elements, rounded in pieces of `piece`.
    pub fn zeros(dev: &CudaDevice, len: usize, piece: usize) -> Result<Self> {
        Ok(GpuBlocks8 {
            len,
            piece,
            codes: dev.alloc_zeros(len.max(1))?,
            scales: dev.alloc_zeros(len.div_ceil(BLOCK8).max(1))?,
            dev: dev.clone(),
        })
    }

    /// From the CPU's codes (one i8 per element) and scales (one per [`BLOCK8`]): `Int8Blocks::parts`.
    pub fn upload(dev: &CudaDevice, codes: &[u8], scales: &[f32], piece: usize) -> Result<Self> {
        if scales.len() != codes.len().div_ceil(BLOCK8) || !piece.is_multiple_of(BLOCK8) {
            return Err(Error::Msg(format!(
                "INT8 blocks of {BLOCK8}: {} codes with {} scales, pieces of {piece}",
                codes.len(),
                scales.len()
            )));
        }
        if codes.is_empty() {
            return Self::zeros(dev, 0, piece);
        }
        Ok(GpuBlocks8 {
            len: codes.len(),
            piece,
            codes: dev.clone_htod(codes)?,
            scales: dev.clone_htod(scales)?,
            dev: dev.clone(),
        })
    }

    /// Codes and scales back on the host.
    pub fn download_parts(&self) -> Result<(Vec<u8>, Vec<f32>)> {
        let mut codes = self.dev.clone_dtoh(&self.codes)?;
        let mut scales = self.dev.clone_dtoh(&self.scales)?;
        codes.truncate(self.len);
        scales.truncate(self.len.div_ceil(BLOCK8));
        Ok((codes, scales))
    }

    pub fn device_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Rewrites every block (`what`), re-quantized with fresh scales and stochastic rounding on `key` (the CPU's
    /// `Int8Blocks::quantize` / `rewrite`). With `sumsq`, returns Σ new² (per block, then over the blocks, each in a
    /// fixed order: the same bits from run to run, though not the CPU's sequential sum's); it waits for the device.
    pub fn requant(&mut self, what: Requant, key: RngKey, sumsq: bool) -> Result<Option<f64>> {
        let n = self.len;
        if n == 0 {
            return Ok(sumsq.then_some(0.0));
        }
        let (mode, x, g) = match what {
            Requant::Set(x) => (0i32, Some(x), None),
            Requant::Add(x) => (1, Some(x), None),
            Requant::Momentum { g, .. } => (2, None, Some(g)),
        };
        let (gs, b2) = match what {
            Requant::Momentum { gs, b2, .. } => (gs, b2),
            _ => (1.0f32, 0.0f32),
        };
        if let Some(x) = x {
            if x.elem_count() != n {
                return Err(Error::Msg(format!("{} values for {n} INT8-block elements", x.elem_count())));
            }
        }
        if let Some(g) = g {
            if g.len != n {
                return Err(Error::Msg(format!("a momentum of {n} from a gradient of {}", g.len)));
            }
        }
        let nblocks = n.div_ceil(BLOCK8);
        let mut partials = if sumsq { Some(self.dev.alloc_zeros::<f64>(nblocks)?) } else { None };
        let f = func(&self.dev, "blocks_requant")?;
        let blocks = u32::try_from(nblocks).map_err(|_| launch_error("blocks_requant", "too many blocks"))?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK8 as u32, 1, 1), shared_mem_bytes: 0 };
        let (n64, piece, null) = (n as u64, self.piece as u64, 0u64);
        let xc = x.map(|x| x.contiguous()).transpose()?;
        let mut launch = |xp: u64| -> Result<()> {
            let mut b = f.builder();
            b.arg(&mut self.codes).arg(&mut self.scales).arg(&n64).arg(&mode).arg(&xp);
            match g {
                Some(g) => b.arg(&g.codes).arg(&g.scales),
                None => b.arg(&null).arg(&null),
            };
            b.arg(&gs).arg(&b2).arg(&key.seed).arg(&key.tensor).arg(&key.stream).arg(&piece);
            match &mut partials {
                Some(p) => b.arg(p),
                None => b.arg(&null),
            };
            // SAFETY: blocks_requant's signature; one block of 256 threads per 256 elements, thread i < n reading
            // x[i] (n floats) or g's element i and writing codes[i] (and thread 0 its block's scale and partial
            // sum, one f64 per block).
            unsafe { b.launch(cfg) }.map_err(|e| launch_error("blocks_requant", e))?;
            Ok(())
        };
        match &xc {
            Some(x) => with_f32_ptr(x, &mut launch)?,
            None => launch(0)?,
        }
        let Some(partials) = partials else { return Ok(None) };
        let mut total = self.dev.alloc_zeros::<f64>(1)?;
        let f = func(&self.dev, "sum_f64")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let nb = nblocks as u64;
        let mut b = f.builder();
        b.arg(&mut total).arg(&partials).arg(&nb);
        // SAFETY: sum_f64's signature; one block of 256 threads reading partials[0..nb) and writing total[0].
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("sum_f64", e))?;
        Ok(Some(self.dev.clone_dtoh(&total)?[0]))
    }
}
