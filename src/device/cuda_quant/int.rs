//! INT8/INT4 tensors on a GPU ([`GpuInt`]: values, frozen-grid re-encoding, recalibration, QuZO's fused update)
//! and QuZO's quantized directions ([`ZoDir`], [`add_direction`], [`gauss_absmax`]).
use super::sr_args;
use super::{cuda_of, func, grid, launch_error, tensor_of, with_f32_ptr, RowIds, Rows, THREADS};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;
use qtune_quant::{Bits, IntTensor, QuantSpec, QuantWeight, RngKey, Rounding};
use std::ops::Range;

/// An [`IntTensor`] on a GPU: INT8 or INT4 codes (the CPU's byte layout), one scale (and offset) per group.
pub struct GpuInt {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) spec: QuantSpec,
    pub(super) group: usize,
    pub(super) codes: CudaSlice<u8>,
    pub(super) scales: CudaSlice<f32>,
    pub(super) offsets: Option<CudaSlice<f32>>,
    pub(super) dev: CudaDevice,
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
        let group = spec.group_len(rows, cols).map_err(crate::error::quant_err)?;
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
        IntTensor::from_raw(self.rows, self.cols, self.spec, codes, scales, offsets).map_err(crate::error::quant_err)
    }

    /// The device the tensor is on.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
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
        Rows::Span(rows.clone()).check(self.rows)
    }

    /// Rows `rows` as an f32 tensor [rows, cols] on the device.
    pub fn dequantize_rows(&self, rows: Range<usize>) -> Result<Tensor> {
        self.read(Rows::Span(rows))
    }

    /// Rows `ids` (an embedding lookup) as an f32 tensor [ids, cols] on the device: only those rows dequantized.
    pub fn gather_rows(&self, ids: &RowIds) -> Result<Tensor> {
        self.read(Rows::Ids(ids))
    }

    fn read(&self, rows: Rows<'_>) -> Result<Tensor> {
        Ok(tensor_of(&self.dev, self.dequantize_buffer(&rows)?, &[rows.len(), self.cols]))
    }

    /// Rows `rows` read as W + ε·u for QuZO's quantized direction `d` (rounded on `sr_stream`, or to nearest), the
    /// direction added into the dequantized buffer itself: one transient f32 copy of the rows.
    pub fn dequantize_rows_moved(&self, rows: Rows<'_>, eps: f32, d: &ZoDir, sr_stream: Option<u32>) -> Result<Tensor> {
        let mut buf = self.dequantize_buffer(&rows)?;
        let n = rows.len() * self.cols;
        if n > 0 {
            let stream = self.dev.cuda_stream();
            let (p, _sync) = buf.device_ptr_mut(&stream);
            launch_qdir_axpy(&self.dev, p, n, &rows, self.cols, eps, d, sr_stream)?;
        }
        Ok(tensor_of(&self.dev, buf, &[rows.len(), self.cols]))
    }

    /// The values of rows `rows` in a new f32 buffer.
    fn dequantize_buffer(&self, rows: &Rows<'_>) -> Result<CudaSlice<f32>> {
        rows.check(self.rows)?;
        let n = rows.len() * self.cols;
        // SAFETY: the kernel writes every one of the n elements.
        let mut out = unsafe { self.dev.alloc::<f32>(n.max(1))? };
        if n > 0 {
            let f = func(&self.dev, "int_dequant_f32")?;
            let (n64, start, cols) = (n as u64, (rows.first() * self.cols) as u64, self.cols as u64);
            let (bits, sym, group) = (self.bits(), self.spec.symmetric as i32, self.group as u64);
            let null = 0u64;
            let mut b = f.builder();
            b.arg(&mut out).arg(&self.codes).arg(&n64).arg(&start);
            rows.push_ids(&mut b, &null);
            b.arg(&cols).arg(&bits).arg(&sym).arg(&group).arg(&self.scales);
            match &self.offsets {
                Some(o) => b.arg(o),
                None => b.arg(&null),
            };
            // SAFETY: the arguments follow int_dequant_f32's signature; the guard keeps j < n, and every element
            // it reads (start + j, or a checked id's row) lies within the codes and its group within the scales.
            unsafe { b.launch(grid("int_dequant_f32", n)?) }.map_err(|e| launch_error("int_dequant_f32", e))?;
        }
        Ok(out)
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

/// `x + eps·u` as a new tensor, for a contiguous f32 tensor `x` holding elements `start ..` of a tensor whose
/// quantized direction is `d` (rounded on `sr_stream`, or to nearest): QuZO's perturbed norm weights (a matrix is
/// moved as it is dequantized, [`GpuInt::dequantize_rows_moved`]).
pub fn add_direction(x: &Tensor, start: usize, eps: f32, d: &ZoDir, sr_stream: Option<u32>) -> Result<Tensor> {
    let dev = cuda_of(x.device())?;
    let out = x.contiguous()?.copy()?;
    let n = out.elem_count();
    if n > 0 {
        with_f32_ptr(&out, |p| launch_qdir_axpy(dev, p, n, &Rows::Span(start..start + n), 1, eps, d, sr_stream))?;
    }
    Ok(out)
}

/// `out[j] += eps·u(e)` for j < n (`qdir_axpy_f32`), `out` a device pointer to n floats holding `rows` of a
/// matrix with rows of `cols` (e the element out[j] holds).
#[allow(clippy::too_many_arguments)] // qdir_axpy_f32's own arguments
fn launch_qdir_axpy(
    dev: &CudaDevice,
    out: u64,
    n: usize,
    rows: &Rows<'_>,
    cols: usize,
    eps: f32,
    d: &ZoDir,
    sr_stream: Option<u32>,
) -> Result<()> {
    let f = func(dev, "qdir_axpy_f32")?;
    let (n64, start, cols64) = (n as u64, (rows.first() * cols) as u64, cols as u64);
    let (sr, null) = (sr_stream.map_or(-1i64, i64::from), 0u64);
    let mut b = f.builder();
    b.arg(&out).arg(&n64).arg(&start);
    rows.push_ids(&mut b, &null);
    b.arg(&cols64).arg(&eps).arg(&d.gauss.seed).arg(&d.gauss.tensor).arg(&d.gauss.stream);
    b.arg(&d.scale).arg(&d.qmax).arg(&sr);
    // SAFETY: qdir_axpy_f32's signature; out points at n floats, each thread j < n reads and writes out[j].
    unsafe { b.launch(grid("qdir_axpy_f32", n)?) }.map_err(|e| launch_error("qdir_axpy_f32", e))?;
    Ok(())
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
