//! QFT's hybrid weights on a GPU (INT8 per row + f32 outliers in CSR) and its Lion step, on them and on f32
//! vectors.
use super::{cuda_of, func, grid, launch_error, with_f32_ptr};
use super::{GpuBlocks8, GpuInt, RowIds, Rows};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;
use qtune_quant::{HybridTensor, IntTensor, RngKey};
use std::ops::Range;

/// QFT's [`HybridTensor`] on a GPU: the dense INT8 part (one scale per row) and the CSR outliers.
pub struct GpuHybrid {
    pub(super) dense: GpuInt,
    pub(super) fraction: f64,
    /// The outlier threshold of the last calibration (which the GPU does not redo).
    pub(super) threshold: f32,
    pub(super) row_ptr: CudaSlice<u32>,
    pub(super) col_idx: CudaSlice<u32>,
    pub(super) values: CudaSlice<f32>,
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
            .map_err(crate::error::quant_err)
    }

    /// The dense codes and the outlier values back on the host (checkpoints, tests).
    pub fn download_parts(&self) -> Result<(IntTensor, Vec<f32>)> {
        let dev = &self.dense.dev;
        let nnz = dev.clone_dtoh(&self.row_ptr)?.last().copied().unwrap_or(0) as usize;
        let mut values = dev.clone_dtoh(&self.values)?;
        values.truncate(nnz);
        Ok((self.dense.download()?, values))
    }

    /// The device the tensor is on.
    pub fn device(&self) -> &CudaDevice {
        &self.dense.dev
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
        self.with_outliers(self.dense.dequantize_rows(rows.clone())?, Rows::Span(rows))
    }

    /// Rows `ids` (an embedding lookup) as an f32 tensor [ids, cols]: only those rows dequantized.
    pub fn gather_rows(&self, ids: &RowIds) -> Result<Tensor> {
        self.with_outliers(self.dense.gather_rows(ids)?, Rows::Ids(ids))
    }

    /// `t`, the dense values of `rows`, with those rows' outliers written over them.
    fn with_outliers(&self, t: Tensor, rows: Rows<'_>) -> Result<Tensor> {
        if rows.is_empty() {
            return Ok(t);
        }
        let f = func(&self.dense.dev, "csr_scatter_rows")?;
        let (r0, nrows, cols, null) = (rows.first() as u64, rows.len() as u64, self.dense.cols as u64, 0u64);
        with_f32_ptr(&t, |p| {
            let mut b = f.builder();
            b.arg(&p).arg(&self.row_ptr).arg(&self.col_idx).arg(&self.values).arg(&r0);
            rows.push_ids(&mut b, &null);
            b.arg(&nrows).arg(&cols);
            // SAFETY: csr_scatter_rows' signature; thread r < rows writes its row's outlier columns (< cols), its
            // source row checked by the dense read.
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
