//! Dense gradient buffers: the [`GradSink`] of the FP32 baselines. Gradients of successive micro-batches are
//! summed; the optimizer takes them out once per step. Keyed by [`ParamId`] for the model's own parameters, or by
//! a method's own key for parameters outside the model (LoRA factors, QST's side network).
use crate::model::{GradSink, ParamId};
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::hash::Hash;

pub struct DenseGrads<K = ParamId> {
    grads: HashMap<K, Tensor>,
}

impl<K> Default for DenseGrads<K> {
    fn default() -> Self {
        DenseGrads { grads: HashMap::new() }
    }
}

impl GradSink for DenseGrads {
    fn push(&mut self, id: ParamId, grad: Tensor) -> Result<()> {
        self.add(id, grad)
    }
}

impl<K: Hash + Eq> DenseGrads<K> {
    /// Adds `grad` to the buffer of `key` (creating it on the first micro-batch).
    pub fn add(&mut self, key: K, grad: Tensor) -> Result<()> {
        let g = match self.grads.remove(&key) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        self.grads.insert(key, g);
        Ok(())
    }
    pub fn get(&self, key: K) -> Option<&Tensor> {
        self.grads.get(&key)
    }
    pub fn take(&mut self, key: K) -> Option<Tensor> {
        self.grads.remove(&key)
    }
    pub fn bytes(&self) -> usize {
        self.grads.values().map(crate::model::llama::tensor_bytes).sum()
    }
    /// Global L2 norm of all held gradients.
    pub fn global_norm(&self) -> Result<f64> {
        let mut s = 0f64;
        for g in self.grads.values() {
            s += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(s.sqrt())
    }
    pub fn clear(&mut self) {
        self.grads.clear();
    }
}
