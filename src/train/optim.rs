//! FP32 optimizers: AdamW and Lion (Chen et al. 2023) with decoupled weight decay. States are keyed by a slot
//! number the caller chooses (a model parameter's `ParamId::index`, or an adapter's own numbering), and the caller
//! says whether a tensor is decayed (matrices are, norm weights are not, as in HF's and MeZO's trainers).
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct LionConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig { beta1: 0.9, beta2: 0.99, weight_decay: 0.0 }
    }
}

/// The optimizer of the methods that train their own tensors (QST, LoRA, QLoRA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    #[value(name = "adamw")]
    AdamW,
    Lion,
}

/// The optimizer option (read by qst, lora and qlora).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "Methods that train their own tensors (qst, lora, qlora)")]
pub struct OptimizerArgs {
    /// Optimizer of qst, lora and qlora: adamw or lion.
    #[arg(long, value_enum, default_value_t = OptimizerKind::AdamW)]
    pub optimizer: OptimizerKind,
}
crate::options::defaults_from_clap!(OptimizerArgs);

/// An FP32 optimizer over dense parameter tensors. States are created on a parameter's first update.
pub enum Optimizer {
    /// m, v per parameter: 8 bytes/param of state.
    AdamW { cfg: AdamWConfig, step: u64, m: HashMap<usize, Tensor>, v: HashMap<usize, Tensor> },
    /// m per parameter: 4 bytes/param of state.
    Lion { cfg: LionConfig, m: HashMap<usize, Tensor> },
}

impl Optimizer {
    pub fn adamw(cfg: AdamWConfig) -> Self {
        Optimizer::AdamW { cfg, step: 0, m: HashMap::new(), v: HashMap::new() }
    }
    pub fn lion(cfg: LionConfig) -> Self {
        Optimizer::Lion { cfg, m: HashMap::new() }
    }

    /// Call once per optimizer step, before the per-parameter updates (AdamW's bias correction counts steps).
    pub fn begin_step(&mut self) {
        if let Optimizer::AdamW { step, .. } = self {
            *step += 1;
        }
    }

    /// Returns the updated tensor `w` of slot `id` given its gradient `g`; `decayed` applies the weight decay.
    pub fn update(&mut self, id: usize, w: &Tensor, g: &Tensor, lr: f64, decayed: bool) -> Result<Tensor> {
        if w.shape() != g.shape() {
            return Err(Error::Shape(format!("slot {id}: weight {:?} vs gradient {:?}", w.shape(), g.shape())));
        }
        let decay = |wd: f64| if decayed { wd } else { 0.0 };
        // A state restored from a checkpoint arrives on the host: it moves to the weight's device on first use
        // (a no-op on the CPU).
        let dev = w.device().clone();
        let take = |m: &mut HashMap<usize, Tensor>| m.remove(&id).map(|t| t.to_device(&dev)).transpose();
        match self {
            Optimizer::AdamW { cfg, step, m, v } => {
                let (b1, b2) = (cfg.beta1, cfg.beta2);
                let m_new = match take(m)? {
                    Some(m0) => ((m0 * b1)? + (g * (1.0 - b1))?)?,
                    None => (g * (1.0 - b1))?,
                };
                let v_new = match take(v)? {
                    Some(v0) => ((v0 * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                    None => (g.sqr()? * (1.0 - b2))?,
                };
                let bc1 = 1.0 - b1.powi(*step as i32);
                let bc2 = 1.0 - b2.powi(*step as i32);
                let denom = ((&v_new / bc2)?.sqrt()? + cfg.eps)?;
                let upd = ((&m_new / bc1)? / denom)?;
                let wd = decay(cfg.weight_decay);
                let w_new = ((w * (1.0 - lr * wd))? - (upd * lr)?)?;
                m.insert(id, m_new);
                v.insert(id, v_new);
                Ok(w_new)
            }
            Optimizer::Lion { cfg, m } => {
                let (b1, b2) = (cfg.beta1, cfg.beta2);
                let m0 = match take(m)? {
                    Some(m0) => m0,
                    None => g.zeros_like()?,
                };
                let c = ((&m0 * b1)? + (g * (1.0 - b1))?)?;
                let wd = decay(cfg.weight_decay);
                let w_new = ((w * (1.0 - lr * wd))? - (c.sign()? * lr)?)?;
                m.insert(id, ((m0 * b2)? + (g * (1.0 - b2))?)?);
                Ok(w_new)
            }
        }
    }

    /// Writes the optimizer's states (and AdamW's step count) under `prefix`.
    pub fn save(&self, w: &mut crate::checkpoint::StateWriter, prefix: &str) -> Result<()> {
        let put = |w: &mut crate::checkpoint::StateWriter, name: &str, m: &HashMap<usize, Tensor>| -> Result<()> {
            let mut slots: Vec<usize> = m.keys().copied().collect();
            slots.sort();
            for s in slots {
                w.tensor(&format!("{prefix}.{name}.{s}"), &m[&s])?;
            }
            Ok(())
        };
        match self {
            Optimizer::AdamW { step, m, v, .. } => {
                w.meta(&format!("{prefix}.step"), *step);
                put(w, "m", m)?;
                put(w, "v", v)
            }
            Optimizer::Lion { m, .. } => put(w, "m", m),
        }
    }

    /// Restores what [`Optimizer::save`] wrote, for the slots `shapes` (slot, shape of its tensor); a slot whose state
    /// is absent had not been updated yet.
    pub fn load(
        &mut self,
        r: &crate::checkpoint::StateReader,
        prefix: &str,
        shapes: &[(usize, Vec<usize>)],
    ) -> Result<()> {
        let get = |name: &str, m: &mut HashMap<usize, Tensor>| -> Result<()> {
            m.clear();
            for (s, shape) in shapes {
                let key = format!("{prefix}.{name}.{s}");
                if r.has(&key) {
                    let v = r.f32_len(&key, shape.iter().product())?;
                    m.insert(*s, Tensor::from_vec(v, shape.as_slice(), &candle_core::Device::Cpu)?);
                }
            }
            Ok(())
        };
        match self {
            Optimizer::AdamW { step, m, v, .. } => {
                *step = r.meta()[format!("{prefix}.step")]
                    .as_u64()
                    .ok_or_else(|| Error::file(r.path(), format!("no `{prefix}.step` in the metadata")))?;
                get("m", m)?;
                get("v", v)
            }
            Optimizer::Lion { m, .. } => get("m", m),
        }
    }

    /// Bytes of optimizer state currently held.
    pub fn state_bytes(&self) -> usize {
        let sum = |m: &HashMap<usize, Tensor>| m.values().map(crate::model::llama::tensor_bytes).sum::<usize>();
        match self {
            Optimizer::AdamW { m, v, .. } => sum(m) + sum(v),
            Optimizer::Lion { m, .. } => sum(m),
        }
    }

    /// Bytes of state per trained parameter once every one has been updated.
    pub fn state_bytes_per_param(&self) -> usize {
        match self {
            Optimizer::AdamW { .. } => 8,
            Optimizer::Lion { .. } => 4,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each optimizer against a scalar f64 reference of its update rule over several steps (budget 1e-6 relative,
    //! f32 arithmetic).
    use super::*;
    use candle_core::Device;

    const BUDGET: f64 = 1e-6;

    fn run(opt: &mut Optimizer, decayed: bool, w0: &[f32], grads: &[Vec<f32>], lr: f64) -> Vec<f32> {
        let mut w = Tensor::new(w0, &Device::Cpu).unwrap();
        for g in grads {
            opt.begin_step();
            w = opt.update(0, &w, &Tensor::new(g.as_slice(), &Device::Cpu).unwrap(), lr, decayed).unwrap();
        }
        w.to_vec1().unwrap()
    }

    #[test]
    fn adamw_matches_reference() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let w0 = [0.5f32, -1.0, 2.0];
        let grads = vec![vec![0.1f32, -0.2, 0.3], vec![-0.05, 0.4, 0.1], vec![0.2, 0.0, -0.3]];
        let got = run(&mut Optimizer::adamw(cfg), true, &w0, &grads, 0.01);
        for i in 0..3 {
            let (mut w, mut m, mut v) = (w0[i] as f64, 0.0, 0.0);
            for (t, g) in grads.iter().enumerate() {
                let g = g[i] as f64;
                m = 0.9 * m + 0.1 * g;
                v = 0.99 * v + 0.01 * g * g;
                let mh = m / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v / (1.0 - 0.99f64.powi(t as i32 + 1));
                w = w * (1.0 - 0.01 * 0.1) - 0.01 * mh / (vh.sqrt() + 1e-8);
            }
            assert!((got[i] as f64 - w).abs() / w.abs() < BUDGET, "{i}: {} vs {w}", got[i]);
        }
    }

    #[test]
    fn lion_matches_reference_and_skips_decay_on_norms() {
        let cfg = LionConfig { beta1: 0.9, beta2: 0.99, weight_decay: 0.5 };
        let w0 = [0.5f32, -1.0, 2.0];
        let grads = vec![vec![0.1f32, -0.2, 0.3], vec![-0.5, 0.4, 0.1], vec![0.2, 0.0, -0.3]];
        for (decayed, wd) in [(true, 0.5), (false, 0.0)] {
            let got = run(&mut Optimizer::lion(cfg), decayed, &w0, &grads, 0.01);
            for i in 0..3 {
                let (mut w, mut m) = (w0[i] as f64, 0.0f64);
                for g in &grads {
                    let g = g[i] as f64;
                    let c = 0.9 * m + 0.1 * g;
                    let s = if c > 0.0 {
                        1.0
                    } else if c < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    w = w * (1.0 - 0.01 * wd) - 0.01 * s;
                    m = 0.99 * m + 0.01 * g;
                }
                assert!((got[i] as f64 - w).abs() / w.abs() < BUDGET, "decayed {decayed} [{i}]: {} vs {w}", got[i]);
            }
        }
    }
}
