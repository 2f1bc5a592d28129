//! Flat arrays in INT8 blocks on a GPU (QFT's gradient-stack entries and Lion's momentum).
use super::{func, launch_error, with_f32_ptr};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;
use qtune_quant::RngKey;

/// Elements per scale of [`GpuBlocks8`] (`BLOCK8` in kernels/quant.cu).
pub const BLOCK8: usize = 256;

/// A flat array in INT8 blocks on a GPU (QFT's `Int8Blocks`: a gradient-stack entry, Lion's momentum): INT8 codes,
/// one scale per [`BLOCK8`] elements, stochastic rounding keyed per `piece` elements (the seed xor-ed with the
/// piece's index times φ, at the index within the piece) as the CPU's pieces are.
pub struct GpuBlocks8 {
    pub(super) len: usize,
    pub(super) piece: usize,
    pub(super) codes: CudaSlice<u8>,
    pub(super) scales: CudaSlice<f32>,
    pub(super) dev: CudaDevice,
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
