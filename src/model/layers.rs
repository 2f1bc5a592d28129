//! The layers of a LLaMA block as forward/backward pairs (llm.c style): each `*_forward` returns its output and
//! what its backward needs; each `*_backward` takes the upstream gradient and returns input and weight gradients.
//! Everything is written with device-agnostic candle ops, in the tensor's own dtype (f32 for training, f64 for
//! the finite-difference tests). Because no candle autograd is involved, candle's fused (gradient-less) softmax
//! and RoPE kernels are safe to use here.
use candle_core::{DType, Device, Result, Tensor, D};

/// RMSNorm over the last dim of `x` [N, d]: returns `(y [N, d], rstd [N, 1])`.
pub fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&rstd)?.broadcast_mul(w)?;
    Ok((y, rstd))
}

/// dx = rstd·(g − x̂·mean(g·x̂)) with g = dy·w and x̂ = x·rstd; dw = Σ_rows dy·x̂.
pub fn rms_norm_backward(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<(Tensor, Tensor)> {
    let xhat = x.broadcast_mul(rstd)?;
    let dw = (dy * &xhat)?.sum(0)?;
    let g = dy.broadcast_mul(w)?;
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(rstd)?;
    Ok((dx, dw))
}

/// Additive causal mask [T, T]: 0 on and below the diagonal, −∞ above.
pub fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    window_mask(t, None, dtype, device)
}

/// Additive causal mask [T, T] that, with a sliding `window` (Mistral), also hides keys `window` or more positions
/// back: query i sees key j iff j ≤ i and i − j < window (transformers' `sliding_window_overlay`).
pub fn window_mask(t: usize, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let w = window.unwrap_or(usize::MAX);
    let m: Vec<f32> = (0..t * t)
        .map(|i| {
            let (q, k) = (i / t, i % t);
            if k > q || q - k >= w {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (t, t), device)?.to_dtype(dtype)
}

/// Repeats each KV head `group` times: [B, KV, T, hd] → [B, KV·group, T, hd] (grouped-query attention).
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, group, t, hd))?.contiguous()?.reshape((b, kv * group, t, hd))
}

/// Sums the gradients of repeated KV heads back: [B, KV·group, T, hd] → [B, KV, T, hd].
fn reduce_kv(dx: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(dx.clone());
    }
    let (b, h, t, hd) = dx.dims4()?;
    dx.reshape((b, h / group, group, t, hd))?.sum(2)
}

/// Causal scaled-dot-product attention. q: [B, H, T, hd], k/v: [B, KV, T, hd].
/// Returns `(ctx [B, H, T, hd], probs [B, H, T, T])`; `probs` is what the backward needs besides q, k, v.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, group: usize, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let hd = q.dim(D::Minus1)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let k = repeat_kv(k, group)?;
    let v = repeat_kv(v, group)?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let ctx = probs.matmul(&v)?;
    Ok((ctx, probs))
}

/// Attention probabilities as a block keeps them for its backward: whole, or only their lower triangle (the strict
/// upper one is exactly 0 under the causal mask): [B, H, T, T] → [B·H, T(T+1)/2], about half the bytes, rebuilt
/// exactly by [`Probs::full`] at one extra [B, H, T, T] of backward scratch.
pub enum Probs {
    Full(Tensor),
    Lower { packed: Tensor, b: usize, h: usize, t: usize },
}

/// Flat indices i·T + j of the lower triangle j ≤ i, row by row.
fn lower_index(t: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..t).flat_map(|i| (0..=i).map(move |j| (i * t + j) as u32)).collect();
    Tensor::from_vec(idx, t * (t + 1) / 2, device)
}

impl Probs {
    /// Packs [B, H, T, T] causal probabilities to their lower triangle.
    pub fn lower(p: &Tensor) -> Result<Self> {
        let (b, h, t, _) = p.dims4()?;
        let packed = p.reshape((b * h, t * t))?.index_select(&lower_index(t, p.device())?, 1)?;
        Ok(Probs::Lower { packed, b, h, t })
    }

    /// The [B, H, T, T] probabilities.
    pub fn full(&self) -> Result<Tensor> {
        match self {
            Probs::Full(p) => Ok(p.clone()),
            &Probs::Lower { ref packed, b, h, t } => {
                let zeros = Tensor::zeros((b * h, t * t), packed.dtype(), packed.device())?;
                Ok(zeros.index_add(&lower_index(t, packed.device())?, packed, 1)?.reshape((b, h, t, t))?)
            }
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Probs::Full(p) | Probs::Lower { packed: p, .. } => p.elem_count() * p.dtype().size_in_bytes(),
        }
    }
}

/// Backward of [`attention_forward`]: returns `(dq, dk, dv)` in the shapes of q, k, v.
pub fn attention_backward(
    dctx: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    group: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let hd = q.dim(D::Minus1)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let kr = repeat_kv(k, group)?;
    let vr = repeat_kv(v, group)?;
    let dv = probs.t()?.matmul(dctx)?;
    let dprobs = dctx.matmul(&vr.t()?)?;
    // Softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked entries have P = 0 and get no gradient.
    let row = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
    let dscores = (probs * dprobs.broadcast_sub(&row)?)?;
    let dscores = (dscores * scale)?;
    let dq = dscores.matmul(&kr)?;
    let dk = dscores.t()?.matmul(q)?;
    Ok((dq, reduce_kv(&dk, group)?, reduce_kv(&dv, group)?))
}

/// LayerNorm over the last dim of `x` [N, d] with affine `w`, `b` [d] (PyTorch's, biased variance):
/// returns `(y [N, d], x̂ [N, d], rstd [N, 1])`.
pub fn layer_norm_forward(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let y = xhat.broadcast_mul(w)?.broadcast_add(b)?;
    Ok((y, xhat, rstd))
}

/// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·w; dw = Σ_rows dy·x̂; db = Σ_rows dy.
pub fn layer_norm_backward(dy: &Tensor, xhat: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dw = (dy * xhat)?.sum(0)?;
    let db = dy.sum(0)?;
    let g = dy.broadcast_mul(w)?;
    let proj = (&g * xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?.sub(&xhat.broadcast_mul(&proj)?)?.broadcast_mul(rstd)?;
    Ok((dx, dw, db))
}

/// Backward of SiLU: dx = dy·silu'(x), silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
pub fn silu_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(x)?;
    dy * (&s * (1.0 + (x * (1.0 - &s)?)?)?)?
}

/// SwiGLU activation h = silu(gate) ⊙ up.
pub fn swiglu_forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Backward of [`swiglu_forward`].
pub fn swiglu_backward(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let dgate = silu_backward(&(dh * up)?, gate)?;
    let dup = (dh * gate.silu()?)?;
    Ok((dgate, dup))
}

/// Mean cross-entropy of `logits` [P, C] against `labels` [P] (u32 class indices).
/// Returns `(loss, dlogits)`: the loss's gradient is formed here, at the only place the logits exist.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = logits.dim(0)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let idx = labels.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?;
    let loss = (picked.sum_all()? * (-1.0 / p as f64))?;
    let grad = (logp.exp()? * (1.0 / p as f64))?;
    let minus = Tensor::full(-1.0 / p as f64, (p, 1), logits.device())?.to_dtype(logits.dtype())?;
    let dlogits = grad.scatter_add(&idx, &minus, 1)?;
    Ok((loss, dlogits))
}

/// Multiple-choice cross-entropy: option j's score is the sum of its tokens' log-probabilities
/// (log softmax of `logits` [P, V] at `labels` [P]), and the loss is the mean over examples of the cross-entropy
/// of the options' scores against the right one. Returns `(loss, dlogits, scores [E, K])` (−inf pads the scores of
/// an example with fewer than K options). With p the options' softmax and y the right one, a token of option j
/// gets (p_j − [j = y]) / E · (onehot − softmax), the derivative of its log-probability being onehot − softmax.
pub fn choice_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    c: &super::batch::Choices,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (p, dev) = (logits.dim(0)?, logits.device().clone());
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let idx = labels.unsqueeze(1)?;
    let token_lp: Vec<f64> = logp.gather(&idx, 1)?.squeeze(1)?.to_dtype(DType::F64)?.to_vec1()?;
    let n_opts: usize = c.options.iter().map(|&k| k as usize).sum();
    let n_pos: usize = c.option_tokens.iter().map(|&k| k as usize).sum();
    if n_opts != c.option_tokens.len() || n_pos != p || c.answers.len() != c.options.len() {
        return Err(candle_core::Error::Msg(format!(
            "choice grouping: {} options over {} positions does not match {} option rows and {p} positions",
            n_opts,
            n_pos,
            c.option_tokens.len()
        )));
    }
    // Option scores: sums of consecutive token log-probabilities.
    let mut at = 0;
    let opt_score: Vec<f64> = c
        .option_tokens
        .iter()
        .map(|&n| {
            let s = token_lp[at..at + n as usize].iter().sum();
            at += n as usize;
            s
        })
        .collect();
    let (e, kmax) = (c.options.len(), c.options.iter().copied().max().unwrap_or(0) as usize);
    let mut scores = vec![f64::NEG_INFINITY; e * kmax];
    let mut coef_opt = vec![0f64; n_opts];
    let (mut loss, mut o) = (0f64, 0);
    for (ex, (&k, &y)) in c.options.iter().zip(&c.answers).enumerate() {
        let s = &opt_score[o..o + k as usize];
        let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
        loss += m + z.ln() - s[y as usize];
        for j in 0..k as usize {
            scores[ex * kmax + j] = s[j];
            let pj = (s[j] - m).exp() / z;
            coef_opt[o + j] = (pj - if j == y as usize { 1.0 } else { 0.0 }) / e as f64;
        }
        o += k as usize;
    }
    // Per position: its option's coefficient; dlogits = coef · (onehot − softmax).
    let coef: Vec<f64> =
        c.option_tokens.iter().zip(&coef_opt).flat_map(|(&n, &k)| std::iter::repeat_n(k, n as usize)).collect();
    let coef = Tensor::new(coef.as_slice(), &dev)?.to_dtype(logits.dtype())?.unsqueeze(1)?;
    let dlogits = logp.exp()?.broadcast_mul(&coef.neg()?)?.scatter_add(&idx, &coef, 1)?;
    let loss = Tensor::new(loss / e.max(1) as f64, &dev)?.to_dtype(logits.dtype())?;
    Ok((loss, dlogits, Tensor::from_vec(scores, (e, kmax), &dev)?.to_dtype(logits.dtype())?))
}

#[cfg(test)]
pub(crate) mod tests {
    //! Each backward against central finite differences in f64 (budget: 1e-6 relative to the gradient's scale,
    //! with h = 1e-6 the truncation error is ~1e-12 and round-off ~1e-10).
    use super::*;
    use candle_core::Device;

    const FD_BUDGET: f64 = 1e-6;
    const H: f64 = 1e-6;

    /// Uniform(−1, 1) f64 tensor from an LCG (deterministic, dependency-free).
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Finite-difference check of d<f(x), r>/dx against `analytic` for a scalar probe with random weights r.
    pub fn check(name: &str, x: &Tensor, analytic: &Tensor, f: impl Fn(&Tensor) -> Tensor, r: &Tensor) {
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let av: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
        let scale = av.iter().fold(0f64, |m, a| m.max(a.abs())).max(1e-3);
        for i in 0..xv.len() {
            let mut p = xv.clone();
            p[i] += H;
            let mut m = xv.clone();
            m[i] -= H;
            let fp = (f(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap()) * r).unwrap().sum_all().unwrap();
            let fm = (f(&Tensor::from_vec(m, x.shape(), &Device::Cpu).unwrap()) * r).unwrap().sum_all().unwrap();
            let fd = (fp.to_scalar::<f64>().unwrap() - fm.to_scalar::<f64>().unwrap()) / (2.0 * H);
            let err = (fd - av[i]).abs() / scale;
            assert!(err < FD_BUDGET, "{name}[{i}]: fd {fd} analytic {} rel err {err:e}", av[i]);
        }
    }

    /// The lower-triangle store of causal attention probabilities gives back the same tensor, bit for bit, at about
    /// half the bytes.
    #[test]
    fn lower_probs_round_trip_exactly() {
        let (b, h, t, hd) = (2, 3, 7, 4);
        let (q, k, v) = (rand(&[b, h, t, hd], 1), rand(&[b, h, t, hd], 2), rand(&[b, h, t, hd], 3));
        let (_, probs) = attention_forward(&q, &k, &v, 1, &causal_mask(t, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let lower = Probs::lower(&probs).unwrap();
        assert_eq!(lower.bytes(), b * h * t * (t + 1) / 2 * 8);
        let back: Vec<f64> = lower.full().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(back, probs.flatten_all().unwrap().to_vec1::<f64>().unwrap());
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let x = rand(&[3, 8], 1);
        let w = (rand(&[8], 2) + 1.5).unwrap();
        let r = rand(&[3, 8], 3);
        let (_, rstd) = rms_norm_forward(&x, &w, 1e-5).unwrap();
        let (dx, dw) = rms_norm_backward(&r, &x, &w, &rstd).unwrap();
        check("dx", &x, &dx, |x| rms_norm_forward(x, &w, 1e-5).unwrap().0, &r);
        check("dw", &w, &dw, |w| rms_norm_forward(&x, w, 1e-5).unwrap().0, &r);
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let rope = crate::model::rope::Rope::plain(5, 8, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let x = rand(&[2, 3, 5, 8], 4);
        let r = rand(&[2, 3, 5, 8], 5);
        let dx = rope.backward(&r).unwrap();
        check("dx", &x, &dx, |x| rope.forward(x).unwrap(), &r);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let (b, h, kv, t, hd) = (2, 4, 2, 5, 4);
        let q = rand(&[b, h, t, hd], 6);
        let k = rand(&[b, kv, t, hd], 7);
        let v = rand(&[b, kv, t, hd], 8);
        let r = rand(&[b, h, t, hd], 9);
        let mask = causal_mask(t, DType::F64, &Device::Cpu).unwrap();
        let g = h / kv;
        let (_, probs) = attention_forward(&q, &k, &v, g, &mask).unwrap();
        let (dq, dk, dv) = attention_backward(&r, &q, &k, &v, &probs, g).unwrap();
        check("dq", &q, &dq, |q| attention_forward(q, &k, &v, g, &mask).unwrap().0, &r);
        check("dk", &k, &dk, |k| attention_forward(&q, k, &v, g, &mask).unwrap().0, &r);
        check("dv", &v, &dv, |v| attention_forward(&q, &k, v, g, &mask).unwrap().0, &r);
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let x = rand(&[3, 8], 14).affine(2.0, 0.3).unwrap();
        let w = (rand(&[8], 15) + 1.5).unwrap();
        let b = rand(&[8], 16);
        let r = rand(&[3, 8], 17);
        let (_, xhat, rstd) = layer_norm_forward(&x, &w, &b, 1e-5).unwrap();
        let (dx, dw, db) = layer_norm_backward(&r, &xhat, &w, &rstd).unwrap();
        check("dx", &x, &dx, |x| layer_norm_forward(x, &w, &b, 1e-5).unwrap().0, &r);
        check("dw", &w, &dw, |w| layer_norm_forward(&x, w, &b, 1e-5).unwrap().0, &r);
        check("db", &b, &db, |b| layer_norm_forward(&x, &w, b, 1e-5).unwrap().0, &r);
    }

    #[test]
    fn silu_backward_matches_finite_differences() {
        let x = (rand(&[4, 5], 18) * 4.0).unwrap();
        let r = rand(&[4, 5], 19);
        check("dx", &x, &silu_backward(&r, &x).unwrap(), |x| x.silu().unwrap(), &r);
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let g = (rand(&[4, 6], 10) * 3.0).unwrap();
        let u = rand(&[4, 6], 11);
        let r = rand(&[4, 6], 12);
        let (dg, du) = swiglu_backward(&r, &g, &u).unwrap();
        check("dgate", &g, &dg, |g| swiglu_forward(g, &u).unwrap(), &r);
        check("dup", &u, &du, |u| swiglu_forward(&g, u).unwrap(), &r);
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let logits = (rand(&[3, 5], 13) * 4.0).unwrap();
        let labels = Tensor::new(&[0u32, 4, 2], &Device::Cpu).unwrap();
        let (_, d) = cross_entropy(&logits, &labels).unwrap();
        let one = Tensor::new(1.0f64, &Device::Cpu).unwrap();
        check("dlogits", &logits, &d, |l| cross_entropy(l, &labels).unwrap().0, &one);
    }

    /// Two examples (3 and 2 options, options of 2, 1, 3, 1, 2 tokens): the gradient against finite differences,
    /// and the scores against sums of log-softmax entries computed in f64 by hand (budget 1e-12).
    #[test]
    fn choice_cross_entropy_matches_finite_differences_and_hand_sums() {
        use crate::model::batch::Choices;
        let logits = (rand(&[9, 6], 17) * 3.0).unwrap();
        let labels = Tensor::new(&[1u32, 5, 0, 2, 2, 4, 3, 0, 1], &Device::Cpu).unwrap();
        let c =
            Choices { option_tokens: vec![2, 1, 3, 1, 2], options: vec![3, 2], answers: vec![2, 0], bytes: vec![1; 5] };
        let (_, d, scores) = choice_cross_entropy(&logits, &labels, &c).unwrap();
        let one = Tensor::new(1.0f64, &Device::Cpu).unwrap();
        check("dlogits", &logits, &d, |l| choice_cross_entropy(l, &labels, &c).unwrap().0, &one);
        let l: Vec<Vec<f64>> = logits.to_vec2().unwrap();
        let lab: Vec<u32> = labels.to_vec1().unwrap();
        let lp = |t: usize| {
            let lse = l[t].iter().map(|v| v.exp()).sum::<f64>().ln();
            l[t][lab[t] as usize] - lse
        };
        let want = [lp(0) + lp(1), lp(2), lp(3) + lp(4) + lp(5), lp(6), lp(7) + lp(8)];
        let got: Vec<Vec<f64>> = scores.to_vec2().unwrap();
        for (g, w) in [got[0][0], got[0][1], got[0][2], got[1][0], got[1][1]].iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
        assert_eq!(got[1].len(), 3);
        assert!(got[1][2].is_infinite(), "the missing third option of example 2 scores −inf");
    }
}
