//! Generation: the decoder run token by token over a KV cache (each block's keys and values of the positions so
//! far, so a new token costs one position's work instead of the whole prefix's), and the sampler (greedy,
//! temperature, top-k, nucleus). Runs on any [`Weights`]: f32, or the INT8/INT4 stores `--bits` builds.
use super::layers;
use super::llama::{linears, Llama, Weights};
use super::params::{BlockParam as P, ParamId};
use super::rope::Rope;
use crate::Result;
use candle_core::{DType, Tensor};

/// Keys and values of every block for the positions generated so far.
#[derive(Default)]
pub struct KvCache {
    k: Vec<Tensor>, // per block: [1, KV, T, hd] after RoPE
    v: Vec<Tensor>, // per block: [1, KV, T, hd]
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.first().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (what generation adds to the weights).
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(super::llama::tensor_bytes).sum()
    }
}

impl Llama {
    /// Runs `ids` (the next positions after what `cache` holds), appends their keys and values to `cache`, and
    /// returns the next-token logits [vocab] (f32) after the last of them.
    pub fn decode(&self, w: &dyn Weights, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (p0, n) = (cache.len(), ids.len());
        let total = p0 + n;
        let dtype = w.vector(ParamId::FinalNorm)?.dtype();
        let dev = self.device().clone();
        let rope = Rope::new(total, &c.inv_freq(total), dtype, &dev)?;
        // Query i (position p0 + i) sees key j iff j ≤ p0 + i, within the sliding window if there is one.
        let win = c.sliding_window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..n * total)
            .map(|x| {
                let (q, k) = (p0 + x / total, x % total);
                if k > q || q - k >= win {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, total), &dev)?.to_dtype(dtype)?;
        let mut x = w.rows(ParamId::Embed, &Tensor::new(ids, &dev)?)?.to_dtype(dtype)?;
        for l in 0..c.num_hidden_layers {
            let id = |p| ParamId::Block(l, p);
            let (xn, _) = layers::rms_norm_forward(&x, &w.vector(id(P::AttnNorm))?, c.rms_norm_eps)?;
            let heads = |y: Tensor, m: usize| -> Result<Tensor> {
                Ok(y.reshape((1, n, m, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let [q, k, v] = self.qkv(w, l, &xn)?;
            let (q, k, v) = (rope.forward_at(&heads(q, h)?, p0)?, rope.forward_at(&heads(k, kv)?, p0)?, heads(v, kv)?);
            let (k, v) = match (cache.k.get(l), cache.v.get(l)) {
                (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                _ => (k, v),
            };
            let (ctx, _) = layers::attention_forward(&q, &k, &v, c.group_size(), &mask)?;
            if l < cache.k.len() {
                (cache.k[l], cache.v[l]) = (k, v);
            } else {
                cache.k.push(k);
                cache.v.push(v);
            }
            let ctx = ctx.transpose(1, 2)?.reshape((n, h * hd))?;
            let x2 = (&x + w.linear(id(P::O), &ctx)?)?;
            let (xn2, _) = layers::rms_norm_forward(&x2, &w.vector(id(P::MlpNorm))?, c.rms_norm_eps)?;
            let [gate, up] = linears(w, [id(P::Gate), id(P::Up)], &xn2)?;
            let hmid = layers::swiglu_forward(&gate, &up)?;
            x = (&x2 + w.linear(id(P::Down), &hmid)?)?;
        }
        let last = x.narrow(0, n - 1, 1)?;
        let (xn, _) = layers::rms_norm_forward(&last, &w.vector(ParamId::FinalNorm)?, c.rms_norm_eps)?;
        Ok(w.linear(ParamId::head(c), &xn)?.flatten_all()?.to_dtype(DType::F32)?)
    }
}

/// How the next token is chosen.
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "Sampling")]
pub struct SamplerArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities sum to at least p (nucleus sampling; 1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
}
crate::options::defaults_from_clap!(SamplerArgs);

impl SamplerArgs {
    /// Checks the settings; the message names the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(crate::Error::Option(format!("--temperature {} must be ≥ 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(crate::Error::Option(format!("--top-p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }

    /// The next token from `logits` and a uniform draw `u` in [0, 1): the argmax when greedy; else a draw from
    /// softmax(logits / T) restricted to the top-k, then to the smallest most-likely set holding `top_p` of the
    /// mass (transformers' order: top-k, then top-p), renormalized.
    pub fn pick(&self, logits: &[f32], u: f64) -> u32 {
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature <= 0.0 {
            return argmax();
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let m = logits[order[0]] as f64;
        let mut p: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - m) / self.temperature).exp()).collect();
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        // Keep tokens while the mass before them is below top_p (the first is always kept).
        let mut acc = 0.0;
        let keep = p
            .iter()
            .take_while(|&&x| {
                let before = acc;
                acc += x;
                before < self.top_p
            })
            .count()
            .max(1);
        let (order, p) = (&order[..keep], &p[..keep]);
        let mut r = u * p.iter().sum::<f64>();
        for (&i, &x) in order.iter().zip(p) {
            r -= x;
            if r < 0.0 {
                return i as u32;
            }
        }
        order[keep - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    //! Decoding over the KV cache against the full recompute (f64 model, f32 logits out: budget 1e-6 relative)
    //! for every family difference (q/k/v biases, a sliding window shorter than the text, linear RoPE scaling), fed
    //! one token at a time and in chunks; and the sampler's restrictions. (Dynamic RoPE scaling changes the
    //! frequencies as the text grows; cached keys keep the rotation they were made with, as in transformers.)
    use super::*;
    use crate::model::llama::tests::tiny_config;
    use crate::model::rope::RopeScaling;
    use crate::model::{Arch, ParamStore};
    use candle_core::Device;

    #[test]
    fn cached_decoding_matches_the_full_forward() {
        let mut qwen2 = tiny_config(true);
        (qwen2.arch, qwen2.attention_bias) = (Arch::Qwen2, true);
        let mut mistral = tiny_config(false);
        mistral.sliding_window = Some(3);
        let mut linear = tiny_config(false);
        linear.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 });
        let ids = [3u32, 7, 1, 30, 12, 5, 9, 2];
        for cfg in [tiny_config(true), qwen2, mistral, linear] {
            let m = Llama::new(cfg.clone());
            let p = ParamStore::random(&cfg, 5, 0.3, DType::F64).unwrap();
            let full = m.logits(&p, &Tensor::new(&[ids], &Device::Cpu).unwrap()).unwrap().squeeze(0).unwrap();
            for chunks in [&[1usize; 8][..], &[3, 1, 4][..]] {
                let mut cache = KvCache::default();
                let mut at = 0;
                for &c in chunks {
                    let got = m.decode(&p, &ids[at..at + c], &mut cache).unwrap();
                    at += c;
                    let want = full.get(at - 1).unwrap().to_dtype(DType::F32).unwrap();
                    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(err / scale < 1e-6, "{:?} at {at}: {err}", cfg.arch);
                }
                assert_eq!(cache.len(), ids.len());
            }
        }
    }

    #[test]
    fn sampling_keeps_to_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 2.0, 1.0, -1.0];
        let greedy = SamplerArgs::default();
        assert_eq!(greedy.pick(&logits, 0.9), 1);
        let k2 = SamplerArgs { temperature: 1.0, top_k: 2, top_p: 1.0 };
        let p_small = SamplerArgs { temperature: 1.0, top_k: 0, top_p: 0.5 };
        for i in 0..100 {
            let u = i as f64 / 100.0;
            assert!([1, 2].contains(&k2.pick(&logits, u)));
            // softmax mass of token 1 alone is 0.64 ≥ 0.5: the nucleus is that one token.
            assert_eq!(p_small.pick(&logits, u), 1);
        }
        let all = SamplerArgs { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let seen: std::collections::HashSet<u32> = (0..1000).map(|i| all.pick(&logits, i as f64 / 1000.0)).collect();
        assert_eq!(seen.len(), 5);
        assert!(SamplerArgs { top_p: 0.0, ..all.clone() }.validate().is_err());
    }
}
