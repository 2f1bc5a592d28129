//! Dense gradient buffers: the [`GradSink`] of the FP32 baselines. Gradients of successive micro-batches are
//! summed; the optimizer takes them out once per step.
use crate::model::{GradSink, ParamId};
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;

#[derive(Default)]
pub struct DenseGrads {
    grads: HashMap<ParamId, Tensor>,
}

impl GradSink for DenseGrads {
    fn push(&mut self, id: ParamId, grad: Tensor) -> Result<()> {
        let g = match self.grads.remove(&id) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        self.grads.insert(id, g);
        Ok(())
    }
}

impl DenseGrads {
    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.grads.get(&id)
    }
    pub fn take(&mut self, id: ParamId) -> Option<Tensor> {
        self.grads.remove(&id)
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
