//! Lion over QFT's INT8 states: weights re-encoded on their frozen grid with stochastic rounding, momentum
//! re-quantized block-wise, and the two update rules in f32 operation by operation (the GPU computes the same bits).
use super::{key, Int8Blocks, QftConfig, QftWeights};
use crate::model::{ParamId, Weights};
use crate::train::optim::LionConfig;
use crate::Result;
use candle_core::Tensor;
use qtune_quant::hybrid::HybridTensor;
use qtune_quant::rng::{STREAM_SR_MOMENTUM, STREAM_SR_WEIGHT};
use qtune_quant::{QuantWeight, Rounding};

/// How many of a hybrid matrix's stored entries differ: (dense INT8 codes, sparse f32 values).
pub(super) fn changed_entries(a: &HybridTensor, b: &HybridTensor) -> (usize, usize) {
    let dense = a.dense().codes().iter().zip(b.dense().codes()).filter(|(x, y)| x != y).count();
    let sparse = a.sparse().2.iter().zip(b.sparse().2).filter(|(x, y)| x != y).count();
    (dense, sparse)
}

/// Lion over QFT's INT8 states.
pub(super) struct Lion<'a> {
    pub weights: &'a QftWeights,
    pub momentum: &'a mut [Int8Blocks],
    pub cfg: &'a QftConfig,
    pub step: u64,
}

impl Lion<'_> {
    /// Lion on one parameter with gradient `g(start, out)` scaled by `scale`; weights re-encoded with stochastic
    /// rounding on their frozen grid; momentum re-quantized block-wise. Returns how many stored entries changed:
    /// (INT8 codes, exact f32 values: outliers and norm weights).
    pub fn update(
        &mut self,
        id: ParamId,
        g: &(dyn Fn(usize, &mut [f32]) -> Result<()> + Sync),
        scale: f32,
        lr: f64,
    ) -> Result<(usize, usize)> {
        let LionConfig { beta1, beta2, weight_decay } = self.cfg.lion;
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let wd = if id.is_matrix() { weight_decay as f32 } else { 0.0 };
        let lr = lr as f32;
        let mut store = self.weights.0.borrow_mut();
        let cfg = store.cfg.clone();
        let idx = id.index(&cfg);
        let m = &self.momentum[idx];
        let step_dir = |w: f32, m: f32, g: f32| lion_weight(w, m, g, scale, b1, lr, wd);
        let changed = if id.is_matrix() {
            let w = store.mat_mut(id);
            let cols = w.cols();
            let before = w.clone();
            let errors = std::sync::Mutex::new(None);
            w.update_rows(Rounding::Stochastic(key(self.cfg.seed, self.step, idx, STREAM_SR_WEIGHT)), |r, row| {
                let (mut gr, mut mr) = (vec![0f32; cols], vec![0f32; cols]);
                if let Err(e) = g(r * cols, &mut gr).and_then(|_| m.dequantize_span(r * cols, &mut mr)) {
                    *errors.lock().expect("not poisoned") = Some(e);
                    return;
                }
                for j in 0..cols {
                    row[j] = step_dir(row[j], mr[j], gr[j]);
                }
            });
            if let Some(e) = errors.into_inner().expect("not poisoned") {
                return Err(e);
            }
            changed_entries(&before, w)
        } else {
            let v: Vec<f32> = store.vector(id)?.to_vec1()?;
            let (mut gr, mut mr) = (vec![0f32; v.len()], vec![0f32; v.len()]);
            g(0, &mut gr)?;
            m.dequantize_span(0, &mut mr)?;
            let new: Vec<f32> = (0..v.len()).map(|j| step_dir(v[j], mr[j], gr[j])).collect();
            let changed = (0, new.iter().zip(&v).filter(|(a, b)| a != b).count());
            let n = new.len();
            let device = store.vector(id)?.device().clone();
            store.set_vector(id, Tensor::from_vec(new, n, &device)?);
            changed
        };
        drop(store);
        let mkey = key(self.cfg.seed, self.step, idx, STREAM_SR_MOMENTUM);
        self.momentum[idx].rewrite(mkey, |start, mv| {
            let mut gr = vec![0f32; mv.len()];
            g(start, &mut gr)?;
            for (m, &g) in mv.iter_mut().zip(&gr) {
                *m = lion_momentum(*m, g, scale, b2);
            }
            Ok(())
        })?;
        Ok(changed)
    }
}

/// Lion's new weight from momentum m and gradient g·gs: c = β₁m + (1 − β₁)·g·gs, w − lr·(sign(c) + wd·w), with
/// sign(0) = 0. In f32, operation by operation (the GPU's `kernels/quant.cu` computes the same bits).
pub fn lion_weight(w: f32, m: f32, g: f32, gs: f32, b1: f32, lr: f32, wd: f32) -> f32 {
    let c = b1 * m + (1.0 - b1) * g * gs;
    w - lr * (c.signum() * (c != 0.0) as i32 as f32 + wd * w)
}

/// Lion's new momentum: β₂m + (1 − β₂)·g·gs.
pub fn lion_momentum(m: f32, g: f32, gs: f32, b2: f32) -> f32 {
    b2 * m + (1.0 - b2) * g * gs
}
