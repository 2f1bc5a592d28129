//! Dense gradient buffers: the [`GradSink`] of the FP32 baselines. Gradients of successive micro-batches are
//! summed; the optimizer takes them out once per step. Keyed by [`ParamId`] for the model's own parameters, or by
//! a method's own key for parameters outside the model (LoRA factors, QST's side network). With several ranks the
//! buffers are summed over them once every local micro-batch has run ([`DenseGrads::all_reduce`]).
use crate::model::{GradSink, ParamId};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
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
    /// Global L2 norm of all held gradients. The tensors' squared norms are added in a fixed order (ascending), not
    /// the map's, whose order changes from process to process: a seeded run gives the same norm, bit for bit.
    pub fn global_norm(&self) -> Result<f64> {
        let mut squares = Vec::with_capacity(self.grads.len());
        for g in self.grads.values() {
            squares.push(g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?);
        }
        squares.sort_by(f64::total_cmp);
        Ok(squares.iter().sum::<f64>().sqrt())
    }
    pub fn clear(&mut self) {
        self.grads.clear();
    }

    /// Sums every buffer over the ranks (`crate::dist`), keys in ascending order, small tensors together in buckets
    /// of up to [`BUCKET`] elements and large ones in slices of it: the same bits on every rank, and with one
    /// micro-batch per rank the same bits as one process adding the micro-batches in turn. Transient memory: one
    /// tensor's copy and a bucket's gathered copies (ranks × 16 MiB).
    pub fn all_reduce(&mut self) -> Result<()>
    where
        K: Ord + Copy,
    {
        let mut keys: Vec<K> = self.grads.keys().copied().collect();
        keys.sort();
        // The ranks must hold the same tensors: their count and sizes, in key order, hashed.
        let sizes = keys
            .iter()
            .fold(keys.len() as u64, |h, k| (h ^ self.grads[k].elem_count() as u64).wrapping_mul(0x100_0000_01b3));
        crate::dist::check_agree(sizes, "the gradient tensors (count and sizes)")?;
        let mut bucket: Vec<(K, candle_core::Shape, candle_core::Device, Vec<f32>)> = Vec::new();
        let limit = bucket_len();
        for k in keys {
            let g = self.grads.remove(&k).expect("listed key");
            if g.dtype() != DType::F32 {
                return Err(Error::Msg(format!("data-parallel training sums f32 gradients, not {:?}", g.dtype())));
            }
            let (shape, dev, mut v) = (g.shape().clone(), g.device().clone(), g.flatten_all()?.to_vec1::<f32>()?);
            drop(g);
            if v.len() >= limit {
                for slice in v.chunks_mut(limit) {
                    crate::dist::sum_f32(slice)?;
                }
                self.grads.insert(k, Tensor::from_vec(v, shape, &dev)?);
                continue;
            }
            if bucket.iter().map(|b| b.3.len()).sum::<usize>() + v.len() > limit {
                self.reduce_bucket(&mut bucket)?;
            }
            bucket.push((k, shape, dev, v));
        }
        self.reduce_bucket(&mut bucket)
    }

    /// Sums the small tensors of `bucket` over the ranks in one call and puts them back.
    fn reduce_bucket(
        &mut self,
        bucket: &mut Vec<(K, candle_core::Shape, candle_core::Device, Vec<f32>)>,
    ) -> Result<()> {
        if bucket.is_empty() {
            return Ok(());
        }
        let mut flat: Vec<f32> = bucket.iter().flat_map(|b| b.3.iter().copied()).collect();
        crate::dist::sum_f32(&mut flat)?;
        let mut at = 0;
        for (k, shape, dev, v) in bucket.drain(..) {
            let n = v.len();
            self.grads.insert(k, Tensor::from_slice(&flat[at..at + n], shape, &dev)?);
            at += n;
        }
        Ok(())
    }
}

/// Elements per all-reduce bucket of [`DenseGrads::all_reduce`] (16 MiB of f32, under PyTorch DDP's 25 MB).
pub const BUCKET: usize = 1 << 22;

/// [`BUCKET`], or `QTUNE_DIST_BUCKET` elements where set: the tests' tiny models need a small bucket to take the
/// slicing and multi-bucket paths.
fn bucket_len() -> usize {
    std::env::var("QTUNE_DIST_BUCKET").ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(BUCKET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The norm against an f64 sum by hand (3² + 4² + 12² = 13²), and the same bits whatever order the buffers
    /// were filled in (a map's order differs between processes; here between two insertion orders).
    #[test]
    fn global_norm_is_exact_and_independent_of_order() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let mut a: DenseGrads<u32> = DenseGrads::default();
        a.add(0, t(&[3.0])).unwrap();
        a.add(1, t(&[4.0, 0.0])).unwrap();
        a.add(2, t(&[12.0])).unwrap();
        assert_eq!(a.global_norm().unwrap(), 13.0);
        // f64 squares over ten orders of magnitude: an f64 sum's last bits depend on the order of its terms.
        let values: Vec<Vec<f64>> =
            (0..200).map(|i| vec![1.37f64.powi(i % 40) * (i as f64).sin(), 1.0 / (i + 1) as f64]).collect();
        let fill = |order: &mut dyn Iterator<Item = usize>| {
            let mut g: DenseGrads<usize> = DenseGrads::default();
            for i in order {
                g.add(i, Tensor::new(values[i].as_slice(), &Device::Cpu).unwrap()).unwrap();
            }
            g.global_norm().unwrap().to_bits()
        };
        assert_eq!(fill(&mut (0..200)), fill(&mut (0..200).rev()));
    }
}
