//! A method's own trained tensors (LoRA factors, QST's side network) and the optimizer step every first-order
//! method applies to its tensors, its own ([`Trained`]) or the model's ([`ParamStore`]): take each gradient, scale
//! it, update the tensor in its optimizer slot.
use super::optim::Optimizer;
use super::DenseGrads;
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::{ParamId, ParamStore};
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

/// A method's own trained tensors (LoRA factors, QST's side network) in a fixed order: a tensor's position is its
/// optimizer slot; `decayed` says whether weight decay applies (matrices yes; norms, biases, gates no).
#[derive(Clone)]
pub struct Trained<K> {
    keys: Vec<K>,
    tensors: Vec<Tensor>,
    decayed: Vec<bool>,
    /// Multiplies the run's learning rate for this tensor (1 unless [`Trained::scale_lr`] set it).
    lr_scale: Vec<f64>,
    index: HashMap<K, usize>,
}

impl<K: Copy + Eq + Hash + Debug> Trained<K> {
    /// `items`: (key, initial value, decayed), in forward order.
    pub fn new(items: Vec<(K, Tensor, bool)>) -> Self {
        let mut t = Trained { keys: vec![], tensors: vec![], decayed: vec![], lr_scale: vec![], index: HashMap::new() };
        for (k, v, d) in items {
            t.index.insert(k, t.keys.len());
            t.keys.push(k);
            t.tensors.push(v);
            t.decayed.push(d);
            t.lr_scale.push(1.0);
        }
        t
    }

    /// Trains `k` at `scale` × the run's learning rate.
    pub fn scale_lr(&mut self, k: K, scale: f64) {
        let i = self.index[&k];
        self.lr_scale[i] = scale;
    }

    pub fn contains(&self, k: K) -> bool {
        self.index.contains_key(&k)
    }

    /// The tensor of `k`: a key the method itself created, so its absence is a bug.
    pub fn get(&self, k: K) -> &Tensor {
        &self.tensors[self.index[&k]]
    }

    pub fn set(&mut self, k: K, t: Tensor) {
        let i = self.index[&k];
        self.tensors[i] = t;
    }

    pub fn keys(&self) -> &[K] {
        &self.keys
    }

    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.elem_count()).sum()
    }

    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(crate::model::llama::tensor_bytes).sum()
    }

    /// Writes the tensors (by position, which is also their optimizer slot) under `prefix`.
    pub fn save(&self, w: &mut StateWriter, prefix: &str) -> Result<()> {
        for (i, t) in self.tensors.iter().enumerate() {
            w.tensor(&format!("{prefix}.{i}"), t)?;
        }
        Ok(())
    }

    /// Restores what [`Trained::save`] wrote, checking every shape.
    pub fn load(&mut self, r: &StateReader, prefix: &str) -> Result<()> {
        for (i, t) in self.tensors.iter_mut().enumerate() {
            let v = r.f32_len(&format!("{prefix}.{i}"), t.elem_count())?;
            *t = Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?;
        }
        Ok(())
    }

    /// (optimizer slot, shape) of every tensor.
    pub fn slot_shapes(&self) -> Vec<(usize, Vec<usize>)> {
        self.tensors.iter().enumerate().map(|(i, t)| (i, t.dims().to_vec())).collect()
    }
}

/// Tensors an optimizer updates, each with its optimizer slot, whether weight decay applies and its learning-rate
/// multiplier.
pub trait Slots<K> {
    /// (slot, key, decayed, lr multiplier) of every tensor, in update order.
    fn slots(&self) -> Vec<(usize, K, bool, f64)>;
    fn tensor(&self, k: K) -> &Tensor;
    fn set_tensor(&mut self, k: K, t: Tensor);
}

impl<K: Copy + Eq + Hash + Debug> Slots<K> for Trained<K> {
    fn slots(&self) -> Vec<(usize, K, bool, f64)> {
        (0..self.keys.len()).map(|i| (i, self.keys[i], self.decayed[i], self.lr_scale[i])).collect()
    }
    fn tensor(&self, k: K) -> &Tensor {
        self.get(k)
    }
    fn set_tensor(&mut self, k: K, t: Tensor) {
        self.set(k, t)
    }
}

/// The model's parameters in forward order: slot = [`ParamId::index`], matrices decayed, norm weights not.
impl Slots<ParamId> for ParamStore {
    fn slots(&self) -> Vec<(usize, ParamId, bool, f64)> {
        self.ids().into_iter().map(|id| (id.index(&self.cfg), id, id.is_matrix(), 1.0)).collect()
    }
    fn tensor(&self, k: ParamId) -> &Tensor {
        self.get(k)
    }
    fn set_tensor(&mut self, k: ParamId, t: Tensor) {
        self.set(k, t)
    }
}

/// One optimizer step: every tensor of `params` moved by its gradient in `grads` times `scale` (each gradient is
/// taken out, so the buffers are freed one by one); with no scale (a skipped step) the gradients are dropped.
pub fn apply<K: Copy + Debug + Eq + Hash>(
    opt: &mut Optimizer,
    params: &mut dyn Slots<K>,
    grads: &mut DenseGrads<K>,
    scale: Option<f64>,
    lr: f64,
) -> Result<()> {
    let Some(scale) = scale else {
        grads.clear();
        return Ok(());
    };
    opt.begin_step();
    for (slot, k, decayed, lr_scale) in params.slots() {
        let g = grads.take(k).ok_or_else(|| Error::Msg(format!("no gradient for {k:?}")))?;
        let g = if scale != 1.0 { (g * scale)? } else { g };
        let w = opt.update(slot, params.tensor(k), &g, lr * lr_scale, decayed)?;
        params.set_tensor(k, w);
    }
    Ok(())
}

/// Saves trained tensors and their optimizer state.
pub fn save<K: Copy + Eq + Hash + Debug>(w: &mut StateWriter, trained: &Trained<K>, opt: &Optimizer) -> Result<()> {
    trained.save(w, "trained")?;
    opt.save(w, "opt")
}

/// Restores what [`save`] wrote.
pub fn load<K: Copy + Eq + Hash + Debug>(r: &StateReader, trained: &mut Trained<K>, opt: &mut Optimizer) -> Result<()> {
    trained.load(r, "trained")?;
    opt.load(r, "opt", &trained.slot_shapes())
}
