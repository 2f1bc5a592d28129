//! NF4 tensors (QLoRA's and QST's base) on a GPU: values with or without double quantization.
use super::{func, grid, launch_error, tensor_of, RowIds, Rows};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;
use qtune_quant::nf4::{dynamic_map, Nf4Scales, DQ_BLOCK, NF4_LEVELS};
use qtune_quant::{Nf4Tensor, QuantWeight};
use std::ops::Range;

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

    /// The device the tensor is on.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
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
        self.read(Rows::Span(rows))
    }

    /// Rows `ids` (an embedding lookup) as an f32 tensor [ids, cols] on the device: only those rows dequantized.
    pub fn gather_rows(&self, ids: &RowIds) -> Result<Tensor> {
        self.read(Rows::Ids(ids))
    }

    fn read(&self, rows: Rows<'_>) -> Result<Tensor> {
        rows.check(self.rows)?;
        let n = rows.len() * self.cols;
        // SAFETY: the kernel writes every one of the n elements.
        let mut out = unsafe { self.dev.alloc::<f32>(n.max(1))? };
        if n > 0 {
            let f = func(&self.dev, "nf4_dequant_f32")?;
            let (n64, start, cols) = (n as u64, (rows.first() * self.cols) as u64, self.cols as u64);
            let (block, dq_block) = (self.block as u64, DQ_BLOCK as u64);
            let null = 0u64;
            let mut b = f.builder();
            b.arg(&mut out).arg(&self.codes).arg(&n64).arg(&start);
            rows.push_ids(&mut b, &null);
            b.arg(&cols).arg(&block).arg(&self.levels);
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
            // the guard keeps j < n, and each element read (start + j, or a checked id's row) is in the tensor.
            unsafe { b.launch(grid("nf4_dequant_f32", n)?) }.map_err(|e| launch_error("nf4_dequant_f32", e))?;
        }
        Ok(tensor_of(&self.dev, out, &[rows.len(), self.cols]))
    }
}
