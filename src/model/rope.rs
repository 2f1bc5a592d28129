//! Rotary position embedding: the frequencies (plain, or scaled the ways transformers defines: `linear`, `dynamic`,
//! `llama3`, or per-frequency factors from a GGUF's `rope_freqs`) and the cos/sin tables the blocks rotate by.
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How a checkpoint stretches RoPE beyond its training context (HF `rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows with the sequence once it passes `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// LLaMA-3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// Per-frequency divisors (a GGUF's `rope_freqs.weight`, which llama.cpp applies as θ/factor), one per pair.
    Factors { factors: Vec<f64> },
}

/// The settings in `rope_scaling` that LLaMA-3.1 and 3.2 ship with: a GGUF stores only their result
/// (`rope_freqs`), so an export recognizes them to write a `config.json` transformers reads.
const LLAMA3_KNOWN: [(f64, f64, f64, usize); 2] = [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192)];

impl RopeScaling {
    /// Checks the settings; the message names the bad one.
    pub fn validate(&self, head_dim: usize) -> std::result::Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("rope_scaling {name} ({v}) must be positive"))
            }
        };
        match self {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => positive("factor", *factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err("rope_scaling high_freq_factor must exceed low_freq_factor".into());
                }
                positive("original_max_position_embeddings", *original_max_position_embeddings as f64)
            }
            RopeScaling::Factors { factors } => {
                if factors.len() != head_dim / 2 {
                    return Err(format!(
                        "rope_freqs has {} factors, head_dim {head_dim} needs {}",
                        factors.len(),
                        head_dim / 2
                    ));
                }
                factors.iter().try_for_each(|&f| positive("rope_freqs factor", f))
            }
        }
    }

    /// The HF `rope_scaling` object for this scaling, or `None` where transformers has no form for it.
    pub fn to_hf_json(&self, head_dim: usize, theta: f64) -> Option<serde_json::Value> {
        match self {
            RopeScaling::Factors { factors } => {
                // A LLaMA-3 GGUF: find the published settings that give exactly these factors.
                LLAMA3_KNOWN.iter().find_map(|&(factor, low, high, orig)| {
                    let s = RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: orig,
                    };
                    let base = inv_freq(theta, head_dim, None, 0, 0);
                    let scaled = inv_freq(theta, head_dim, Some(&s), 0, 0);
                    let same = base.iter().zip(&scaled).zip(factors).all(|((b, s), f)| (b / s / f - 1.0).abs() < 1e-3);
                    same.then(|| s.to_hf_json(head_dim, theta)).flatten()
                })
            }
            other => {
                let mut v = serde_json::to_value(other).expect("plain data");
                // transformers before 4.43 reads `type`, later ones `rope_type`.
                v["type"] = v["rope_type"].clone();
                Some(v)
            }
        }
    }
}

/// The inverse frequencies θ^(−2i/hd), i < hd/2, as `scaling` changes them for a sequence of `seq_len` positions
/// (only `dynamic` depends on it; `max_pos` is the config's `max_position_embeddings`). Computed in f64: transformers
/// computes them in f32, which differs by under 1e-6 relative.
pub fn inv_freq(theta: f64, hd: usize, scaling: Option<&RopeScaling>, seq_len: usize, max_pos: usize) -> Vec<f64> {
    let base_of = |theta: f64| (0..hd / 2).map(move |i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64));
    match scaling {
        None => base_of(theta).collect(),
        Some(RopeScaling::Linear { factor }) => base_of(theta).map(|f| f / factor).collect(),
        Some(RopeScaling::Dynamic { factor }) => {
            // transformers' `_compute_dynamic_ntk_parameters`: the base is stretched once the sequence is longer
            // than the trained context.
            let n = seq_len.max(max_pos) as f64;
            let d = hd as f64;
            let theta = theta * (factor * n / max_pos as f64 - (factor - 1.0)).powf(d / (d - 2.0));
            base_of(theta).collect()
        }
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            // transformers' `_compute_llama3_parameters`, wavelength by wavelength.
            let old = *original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            base_of(theta)
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        Some(RopeScaling::Factors { factors }) => base_of(theta).zip(factors).map(|(f, d)| f / d).collect(),
    }
}

/// Rotary position embedding in HF's rotate-half layout (the first and second halves of each head are the pair).
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    neg_sin: Tensor,
}

impl Rope {
    /// Tables for positions `0..t` and the inverse frequencies `inv_freq` (hd/2 of them).
    pub fn new(t: usize, inv_freq: &[f64], dtype: DType, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in inv_freq {
                // Angles in f64 so the f32 tables carry no extra error.
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), device)?.to_dtype(dtype)?;
        let neg_sin = sin.neg()?;
        Ok(Rope { cos, sin, neg_sin })
    }

    /// Plain RoPE with base `theta` on heads of width `hd`.
    pub fn plain(t: usize, hd: usize, theta: f64, dtype: DType, device: &Device) -> Result<Self> {
        Self::new(t, &inv_freq(theta, hd, None, t, t), dtype, device)
    }

    /// x: [B, H, T, hd] with T at most the table's length (positions 0..T).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.rotate(x, &self.sin)
    }

    /// RoPE is a rotation, so its backward is the rotation by the opposite angle.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.rotate(dy, &self.neg_sin)
    }

    /// x: [B, H, T, hd] at positions `offset..offset + T` (generation with a KV cache).
    pub fn forward_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let (cos, sin) = (self.cos.narrow(0, offset, t)?.contiguous()?, self.sin.narrow(0, offset, t)?.contiguous()?);
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    fn rotate(&self, x: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // A prefix of the table's rows is contiguous, as the fused kernel needs.
        let t = x.dim(2)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos.narrow(0, 0, t)?, &sin.narrow(0, 0, t)?)
    }
}

#[cfg(test)]
mod tests {
    //! The scaled frequencies against values written out from transformers' formulas (f64, budget 1e-12 relative),
    //! and the GGUF factor form recognized as the LLaMA-3 settings it came from.
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs()
    }

    #[test]
    fn linear_and_dynamic_follow_transformers() {
        let plain = inv_freq(10000.0, 8, None, 0, 0);
        assert!(close(plain[1], 0.1)); // 10000^(-2/8)
        let lin = inv_freq(10000.0, 8, Some(&RopeScaling::Linear { factor: 4.0 }), 0, 0);
        assert!(plain.iter().zip(&lin).all(|(p, l)| close(p / 4.0, *l)));
        // Dynamic: unchanged up to the trained context; at twice it with factor 2, base·(2·2 − 1)^(8/6).
        let dy = RopeScaling::Dynamic { factor: 2.0 };
        assert_eq!(inv_freq(10000.0, 8, Some(&dy), 16, 16), plain);
        let stretched = inv_freq(10000.0, 8, Some(&dy), 32, 16);
        let base = 10000.0 * 3f64.powf(8.0 / 6.0);
        assert!(close(stretched[1], 1.0 / base.powf(0.25)));
    }

    #[test]
    fn llama3_ramps_between_the_wavelength_bounds() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let hd = 16;
        let plain = inv_freq(500000.0, hd, None, 0, 0);
        let scaled = inv_freq(500000.0, hd, Some(&s), 0, 0);
        let mut kinds = [0; 3];
        for (p, q) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f64::consts::PI / p;
            if wavelen < 16.0 {
                assert!(close(*q, *p));
                kinds[0] += 1;
            } else if wavelen > 64.0 {
                assert!(close(*q, p / 8.0));
                kinds[1] += 1;
            } else {
                let smooth = (64.0 / wavelen - 1.0) / 3.0;
                assert!(close(*q, (1.0 - smooth) * p / 8.0 + smooth * p));
                kinds[2] += 1;
            }
        }
        assert!(kinds.iter().all(|&k| k > 0), "the test frequencies cover all three regimes: {kinds:?}");
    }

    #[test]
    fn gguf_factors_of_llama3_export_as_llama3() {
        let (theta, hd) = (500000.0, 64);
        let s = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let base = inv_freq(theta, hd, None, 0, 0);
        let factors: Vec<f64> = base.iter().zip(inv_freq(theta, hd, Some(&s), 0, 0)).map(|(b, q)| b / q).collect();
        let f = RopeScaling::Factors { factors };
        assert_eq!(f.to_hf_json(hd, theta), s.to_hf_json(hd, theta));
        assert_eq!(s.to_hf_json(hd, theta).unwrap()["rope_type"], "llama3");
        assert!(RopeScaling::Factors { factors: vec![2.0; 32] }.to_hf_json(hd, theta).is_none());
    }
}
