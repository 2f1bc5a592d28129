//! Where QFT's backward hands its gradients: the INT8 gradient stack ([`StackSink`], over the host's or the GPU's
//! entries: [`StackEntries`]) or, in the fused variant, straight into Lion ([`FusedSink`]).
use super::lion::Lion;
use super::{add, Int8Blocks};
use crate::model::{GradSink, ParamId};
use crate::train::zeroth_order::direction_seed;
use crate::{Error, Result};
use candle_core::Tensor;
use qtune_quant::rng::{RngKey, STREAM_SR_GRAD};

/// How a gradient-stack entry is made and grown, on the device that holds it: the host's [`Int8Blocks`] here, the
/// GPU's blocks in `qft_gpu`. Each returns Σ new² (for clipping) when asked.
pub(crate) trait StackEntries {
    type Entry;
    /// The entry of an f32 gradient, quantized with stochastic rounding on `key`.
    fn quantize(&self, grad: &Tensor, key: RngKey, sumsq: bool) -> Result<(Self::Entry, f64)>;
    /// `entry` ← entry + grad, re-quantized with stochastic rounding on `key`.
    fn add(&self, entry: &mut Self::Entry, grad: &Tensor, key: RngKey, sumsq: bool) -> Result<f64>;
}

/// The host's stack: gradients read in place (a second f32 copy of the largest gradient, the embedding's, would be
/// most of a step's peak).
pub(crate) struct HostEntries;

impl StackEntries for HostEntries {
    type Entry = Int8Blocks;
    fn quantize(&self, grad: &Tensor, key: RngKey, sumsq: bool) -> Result<(Int8Blocks, f64)> {
        crate::model::load::with_f32_slice(grad, |g| {
            let s = if sumsq { g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() } else { 0.0 };
            Ok((Int8Blocks::quantize(g, key)?, s))
        })?
    }
    fn add(&self, entry: &mut Int8Blocks, grad: &Tensor, key: RngKey, _sumsq: bool) -> Result<f64> {
        crate::model::load::with_f32_slice(grad, |g| {
            entry.rewrite(key, |start, v| {
                let n = v.len();
                v.iter_mut().zip(&g[start..start + n]).for_each(|(a, b)| *a += b);
                Ok(())
            })
        })?
    }
}

/// The stack sink: quantize at once and push (first micro-batch) or add into the entry at the same depth, with the
/// same rounding keys on either device.
pub(crate) struct StackSink<'a, S: StackEntries> {
    pub entries: &'a S,
    pub stack: &'a mut Vec<(ParamId, S::Entry)>,
    pub depth: usize,
    pub accumulate: bool,
    /// Whether this is the step's last micro-batch (its pushes carry the final values, whose norm clipping needs).
    pub last: bool,
    pub sumsq: f64,
    pub seed: u64,
    pub micro: u64,
}

impl<S: StackEntries> GradSink for StackSink<'_, S> {
    fn push(&mut self, id: ParamId, grad: Tensor) -> Result<()> {
        let k = RngKey::new(direction_seed(self.seed, self.micro, self.depth), self.depth as u32, STREAM_SR_GRAD);
        let s = if !self.accumulate {
            let (entry, s) = self.entries.quantize(&grad, k, self.last)?;
            self.stack.push((id, entry));
            s
        } else {
            let (eid, entry) =
                self.stack.get_mut(self.depth).ok_or_else(|| Error::Msg("gradient stack underflow".into()))?;
            if *eid != id {
                return Err(Error::Msg(format!(
                    "gradient stack out of order: {id:?} arrived where {eid:?} was pushed"
                )));
            }
            self.entries.add(entry, &grad, k, self.last)?
        };
        if self.last {
            self.sumsq += s;
        }
        self.depth += 1;
        Ok(())
    }
}

/// The fused sink: apply Lion to each parameter as its f32 gradient arrives.
pub(super) struct FusedSink<'a> {
    pub lion: Lion<'a>,
    pub lr: f64,
    pub changed: (usize, usize),
}

impl GradSink for FusedSink<'_> {
    fn push(&mut self, id: ParamId, grad: Tensor) -> Result<()> {
        let changed = crate::model::load::with_f32_slice(&grad, |g| {
            let src = |start: usize, out: &mut [f32]| -> Result<()> {
                out.copy_from_slice(&g[start..start + out.len()]);
                Ok(())
            };
            self.lion.update(id, &src, 1.0, self.lr)
        })??;
        self.changed = add(self.changed, changed);
        Ok(())
    }
}
