//! The zeroth-order two-point step, written once for MeZO, QuZO and their LoRA modes: per direction k a seed s_k
//! (from the run seed, the step and k), the mean loss at θ + εu_k and at θ − εu_k, the projected gradient
//!   μ_k = [L(θ + εu_k) − L(θ − εu_k)] / 2ε,
//! and an update θ ← θ − η·Σ_k μ_k·u_k / n the method replays from the seeds. A method supplies how a direction is
//! drawn and applied through [`Perturbation`]; nothing of size θ is ever stored by the loop.
//!
//! Across ranks (`crate::dist`) each rank evaluates the same seeded directions on its micro-batches and the ranks
//! exchange their losses only, 8 bytes per micro-batch and direction: the update is replayed from the seeds.
use super::method::{Method, OnNonFinite, StepStats};
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::{Batch, Keep, Llama, Weights};
use crate::{Error, Result};

/// Options of the zeroth-order loop (read by every zeroth-order method).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "Zeroth-order methods (mezo, quzo)")]
pub struct ZoArgs {
    /// Zeroth-order perturbation scale ε.
    #[arg(long, default_value_t = 1e-3)]
    pub eps: f64,
    /// Zeroth-order directions per step.
    #[arg(long, default_value_t = 1)]
    pub directions: usize,
    /// Train LoRA factors (--lora-r, --lora-alpha) over the frozen f32 / INT8 / INT4 base.
    #[arg(long)]
    pub lora: bool,
}
crate::options::defaults_from_clap!(ZoArgs);

/// The loop's configuration and position: what a zeroth-order method holds of the loop.
#[derive(Clone, Copy, Debug)]
pub struct ZoLoop {
    /// Perturbation scale ε.
    pub eps: f64,
    /// Directions per step (n).
    pub directions: usize,
    pub weight_decay: f64,
    pub seed: u64,
    pub on_nan: OnNonFinite,
    /// Steps taken (the directions' seeds depend on it, so a resumed run draws the same ones).
    pub step: u64,
}

impl ZoLoop {
    pub fn new(args: &ZoArgs, weight_decay: f64, seed: u64, on_nan: OnNonFinite) -> Result<Self> {
        if args.directions == 0 || !(args.eps > 0.0 && args.eps.is_finite()) {
            return Err(Error::Option(format!(
                "zeroth-order needs --directions ≥ 1 and --eps > 0 (got {} and {})",
                args.directions, args.eps
            )));
        }
        Ok(ZoLoop { eps: args.eps, directions: args.directions, weight_decay, seed, on_nan, step: 0 })
    }

    /// Saves the step (the directions are regenerated from the seed and the step, so nothing else is needed).
    pub fn save(&self, w: &mut StateWriter) {
        w.meta("step", self.step);
    }

    pub fn load(&mut self, r: &StateReader) -> Result<()> {
        self.step = r.meta()["step"].as_u64().ok_or_else(|| Error::file(r.path(), "no `step` in the metadata"))?;
        Ok(())
    }
}

/// The seed of direction `dir` at step `step` (splitmix64 of the run seed, step and direction).
pub fn direction_seed(run_seed: u64, step: u64, dir: usize) -> u64 {
    let mut z = run_seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (dir as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The loss of each micro-batch under weights `w` (forwards with nothing kept).
pub fn micro_losses(model: &Llama, w: &dyn Weights, micro: &[Batch]) -> Result<Vec<f32>> {
    micro.iter().map(|b| Ok(model.forward(w, b, Keep::Nothing)?.0.loss)).collect()
}

/// A method's part of the zeroth-order step (the step's memory report starts from [`Method::state_bytes`]).
pub trait Perturbation: Method {
    /// What a direction needs beyond its seed (QuZO: each tensor's quantization scale of the direction; nothing
    /// for Gaussian directions, which are regenerated from the seed as each tensor is read).
    type Direction: Default;
    /// The method's loop state.
    fn zo_mut(&mut self) -> &mut ZoLoop;
    /// ε as the perturbation applies it (QuZO perturbs in f32: ε rounded to f32).
    fn applied_eps(&self, eps: f64) -> f64 {
        eps
    }
    /// The direction of `seed` (by default: nothing beyond the seed).
    fn direction(&self, _seed: u64) -> Result<Self::Direction> {
        Ok(Self::Direction::default())
    }
    /// The loss of each micro-batch of `micro` with the weights moved by `eps` along direction `d` (the weights
    /// themselves are left as they were).
    fn loss_at(&mut self, model: &Llama, micro: &[Batch], seed: u64, d: &Self::Direction, eps: f64)
        -> Result<Vec<f32>>;
    /// θ ← θ·(1 − η·λ) − η·Σ_k μ_k·u_k / n over `est` = (seed, direction, μ) of step `zo.step` (λ is
    /// `zo.weight_decay`).
    fn update(&mut self, zo: &ZoLoop, est: &[(u64, Self::Direction, f64)], lr: f64) -> Result<()>;
    /// Transient bytes of a step (a perturbed or updated copy of the largest tensor, or a chunk of one).
    fn scratch_bytes(&self) -> usize;
}

/// One zeroth-order step of `p` over `micro` at learning rate `lr`.
pub fn step<P: Perturbation>(p: &mut P, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
    // The loop state is read once and written back once, so the method can be borrowed whole in between.
    let this = *p.zo_mut();
    let stats = two_point(p, this, model, micro, lr);
    p.zo_mut().step = this.step + 1;
    stats
}

fn two_point<P: Perturbation>(p: &mut P, zo: ZoLoop, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
    let eps = p.applied_eps(zo.eps);
    let mut mem = p.state_bytes();
    mem.scratch = p.scratch_bytes();
    let mut est = Vec::with_capacity(zo.directions);
    let mut loss_sum = 0f32;
    for dir in 0..zo.directions {
        let seed = direction_seed(zo.seed, zo.step, dir);
        let d = p.direction(seed)?;
        // This rank's micro-batches; the mean is over the whole step's, in the order one process would add them, so
        // every rank computes the same μ_k and replays the same update (the loss pairs are all the ranks exchange).
        let plus = crate::dist::mean_in_order(&p.loss_at(model, micro, seed, &d, eps)?)?;
        let minus = crate::dist::mean_in_order(&p.loss_at(model, micro, seed, &d, -eps)?)?;
        est.push((seed, d, (plus as f64 - minus as f64) / (2.0 * eps)));
        loss_sum += (plus + minus) / 2.0;
    }
    let loss = loss_sum / zo.directions as f32;
    if !loss.is_finite() || est.iter().any(|e| !e.2.is_finite()) {
        return zo.on_nan.fault(loss, None, mem);
    }
    p.update(&zo, &est, lr)?;
    let norm = est.iter().map(|e| e.2 * e.2).sum::<f64>().sqrt();
    Ok(StepStats { loss, grad_norm: Some(norm), applied: true, memory: mem, figures: Vec::new() })
}
