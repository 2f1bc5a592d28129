//! The statistics of a comparison: two runs' answers paired example by example with an exact McNemar test
//! ([`paired`]), and how well a two-class run's scores rank the examples ([`ranking`], ROC AUC).
use super::RunRecord;
use crate::train::eval::Prediction;

/// Two runs' answers on the examples both answered (one split: "eval" where both have it, else "dev").
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    pub a: String,
    pub b: String,
    pub split: String,
    pub examples: usize,
    pub both_right: usize,
    pub only_a: usize,
    pub only_b: usize,
    pub both_wrong: usize,
    /// Accuracy of a minus accuracy of b, in points, and its 95% interval (normal approximation of the paired
    /// difference: var = ((only_a + only_b)/n − d²)/n).
    pub diff_points: f64,
    pub ci95_points: (f64, f64),
    /// Exact two-sided McNemar test: the probability of a split of the discordant examples at least this uneven if
    /// the two runs were equally accurate.
    pub p_value: f64,
}

/// Pairs `a`'s and `b`'s answers by example key; `None` when they share no example.
pub fn paired(a: &RunRecord, b: &RunRecord) -> Option<Paired> {
    let has = |r: &RunRecord, s: &str| r.predictions.iter().any(|(x, _)| x == s);
    let split = ["eval", "dev"].into_iter().find(|s| has(a, s) && has(b, s))?;
    let answers = |r: &RunRecord| -> std::collections::HashMap<String, bool> {
        r.predictions.iter().filter(|(x, _)| x == split).map(|(_, p)| (p.key.clone(), p.predicted == p.label)).collect()
    };
    let (ra, rb) = (answers(a), answers(b));
    let mut counts = [0usize; 4]; // both right, only a, only b, both wrong
    for (key, &right_a) in &ra {
        if let Some(&right_b) = rb.get(key) {
            counts[match (right_a, right_b) {
                (true, true) => 0,
                (true, false) => 1,
                (false, true) => 2,
                (false, false) => 3,
            }] += 1;
        }
    }
    let n = counts.iter().sum::<usize>();
    if n == 0 {
        return None;
    }
    let (nf, disc) = (n as f64, (counts[1] + counts[2]) as f64);
    let d = (counts[1] as f64 - counts[2] as f64) / nf;
    let half = 1.96 * ((disc / nf - d * d).max(0.0) / nf).sqrt();
    Some(Paired {
        a: a.name.clone(),
        b: b.name.clone(),
        split: split.into(),
        examples: n,
        both_right: counts[0],
        only_a: counts[1],
        only_b: counts[2],
        both_wrong: counts[3],
        diff_points: 100.0 * d,
        ci95_points: (100.0 * (d - half), 100.0 * (d + half)),
        p_value: mcnemar_exact(counts[1], counts[2]),
    })
}

/// Two-sided exact McNemar p-value: 2·P(X ≤ min(b, c)) for X ~ Binomial(b + c, 1/2), at most 1. The terms are
/// built in log space (2^−n underflows f64 past n ≈ 1074).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    let mut log_term = -(n as f64) * std::f64::consts::LN_2; // log C(n, 0) / 2^n
    let mut tail = 0.0;
    for i in 0..=b.min(c) {
        tail += log_term.exp();
        log_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

/// A split's answers against always answering its most frequent label: the paired comparison that says whether a
/// run learned more than the label prior.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VersusMajority {
    pub n: usize,
    pub majority_label: u32,
    pub accuracy: f64,
    pub majority: f64,
    /// Examples the run gets right and the majority answer wrong, and the other way round.
    pub run_only: usize,
    pub majority_only: usize,
    /// Exact McNemar p of the difference.
    pub p: f64,
}

impl VersusMajority {
    /// The comparison over one split's predictions (`None` when there are none).
    pub fn of(preds: &[&Prediction]) -> Option<Self> {
        let n = preds.len();
        let k = preds.iter().map(|p| p.label).max()? as usize + 1;
        let mut counts = vec![0usize; k];
        for p in preds {
            counts[p.label as usize] += 1;
        }
        // The most frequent label; the lowest index wins a tie.
        let maj = (0..k).fold(0, |b, i| if counts[i] > counts[b] { i } else { b }) as u32;
        let right = |p: &&&Prediction| p.predicted == p.label;
        let run_only = preds.iter().filter(|p| right(p) && p.label != maj).count();
        let majority_only = preds.iter().filter(|p| !right(p) && p.label == maj).count();
        Some(VersusMajority {
            n,
            majority_label: maj,
            accuracy: preds.iter().filter(right).count() as f64 / n as f64,
            majority: counts[maj as usize] as f64 / n as f64,
            run_only,
            majority_only,
            p: mcnemar_exact(run_only, majority_only),
        })
    }

    /// Better than the majority answer at the 5% level.
    pub fn clearly_above(&self) -> bool {
        self.accuracy > self.majority && self.p < 0.05
    }
}

/// How well a two-class run's scores order the examples, whatever its decision threshold: a run that has learned
/// only the label prior answers the majority class everywhere and its accuracy says nothing of what its scores
/// carry. Read from `predictions.jsonl` (one split: "eval" where the run has it, else "dev").
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    pub name: String,
    pub split: String,
    pub examples: usize,
    /// Mean P(class 1): the run's prior (the data's is the share of class 1).
    pub mean_p1: f64,
    /// Share of class 1 in the split.
    pub share1: f64,
    /// ROC AUC of P(class 1): the chance that a class-1 example scores above a class-0 one (ties count half).
    pub auc: f64,
    /// A run with a side branch (QST): its class-1 logit margin split into the side branch's part and the rest
    /// (the frozen base's state, scaled by α), [side, rest].
    pub parts: Option<[MarginPart; 2]>,
}

/// One part of a two-class run's logit margin over a split's examples: its mean (what it adds to the prior), its
/// spread, and its AUC scored alone (what of the ranking it carries).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarginPart {
    pub mean: f64,
    pub sd: f64,
    pub auc: f64,
}

impl MarginPart {
    pub(super) fn of(scored: &[(f64, bool)]) -> Option<Self> {
        let n = scored.len() as f64;
        let mean = scored.iter().map(|s| s.0).sum::<f64>() / n;
        let sd = (scored.iter().map(|s| (s.0 - mean).powi(2)).sum::<f64>() / n).sqrt();
        Some(MarginPart { mean, sd, auc: auc(scored)? })
    }
}

/// The ranking of a run whose answers are two-class (every label and answer 0 or 1); `None` otherwise. Each
/// prediction's loss is the cross-entropy over the two label words, so P(label) = exp(−loss).
pub fn ranking(r: &RunRecord) -> Option<Ranking> {
    let split = ["eval", "dev"].into_iter().find(|s| r.predictions.iter().any(|(x, _)| x == s))?;
    let preds: Vec<&Prediction> = r.predictions.iter().filter(|(x, _)| x == split).map(|(_, p)| p).collect();
    if preds.iter().any(|p| p.label > 1 || p.predicted > 1) {
        return None;
    }
    let scored: Vec<(f64, bool)> = preds
        .iter()
        .map(|p| {
            let p_label = (-p.loss).exp();
            (if p.label == 1 { p_label } else { 1.0 - p_label }, p.label == 1)
        })
        .collect();
    // The class-1 margin logit₁ − logit₀ from the label's loss softplus(−margin_label), split into the side part and
    // the rest.
    let parts = preds
        .iter()
        .map(|p| {
            let s = p.side.as_ref().filter(|s| s.len() == 2)?;
            let m_label = -p.loss.exp_m1().ln();
            let margin = if p.label == 1 { m_label } else { -m_label };
            let side = (s[1] - s[0]) as f64;
            Some(((side, p.label == 1), (margin - side, p.label == 1)))
        })
        .collect::<Option<(Vec<_>, Vec<_>)>>()
        .and_then(|(side, rest)| Some([MarginPart::of(&side)?, MarginPart::of(&rest)?]));
    let n = scored.len() as f64;
    Some(Ranking {
        name: r.name.clone(),
        split: split.into(),
        examples: scored.len(),
        mean_p1: scored.iter().map(|s| s.0).sum::<f64>() / n,
        share1: scored.iter().filter(|s| s.1).count() as f64 / n,
        auc: auc(&scored)?,
        parts,
    })
}

/// ROC AUC by ranks (Mann–Whitney U): sort the scores, give tied scores their mean rank, and
/// AUC = (sum of the positives' ranks − n₊(n₊ + 1)/2) / (n₊·n₋). `None` when one class is absent.
pub fn auc(scored: &[(f64, bool)]) -> Option<f64> {
    let mut v = scored.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < v.len() {
        let j = i + v[i..].iter().take_while(|x| x.0 == v[i].0).count();
        let mean_rank = (i + 1 + j) as f64 / 2.0; // ranks i + 1 ..= j
        rank_sum += mean_rank * v[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let pos = v.iter().filter(|x| x.1).count() as f64;
    let neg = v.len() as f64 - pos;
    (pos > 0.0 && neg > 0.0).then(|| (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against counts by hand: labels 1,1,1,0,0 (majority 1, 3/5); answers 1,0,1,0,1: right on 0,2,3; the run is
    /// right where the majority answer is wrong on example 3 only, wrong where it is right on example 1 only.
    #[test]
    fn versus_majority_counts_the_disagreements() {
        let pred =
            |label, predicted| Prediction { example: 0, key: String::new(), label, predicted, loss: 0.0, side: None };
        let ps = [pred(1, 1), pred(1, 0), pred(1, 1), pred(0, 0), pred(0, 1)];
        let v = VersusMajority::of(&ps.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!((v.n, v.majority_label, v.run_only, v.majority_only), (5, 1, 1, 1));
        assert_eq!((v.accuracy, v.majority), (0.6, 0.6));
        assert_eq!(v.p, 1.0);
        assert!(!v.clearly_above());
        assert!(VersusMajority::of(&[]).is_none());
    }

    /// Exact McNemar p-values against binomial sums by hand: (10, 2): 2·(1 + 12 + 66)/2¹²; (3, 0): 2/2³; equal
    /// splits give 1; past n = 1074 (where 2^−n underflows) the value stays a probability, symmetric in (b, c).
    #[test]
    fn mcnemar_matches_binomial_sums() {
        assert!((mcnemar_exact(10, 2) - 158.0 / 4096.0).abs() < 1e-15);
        assert!((mcnemar_exact(0, 3) - 0.25).abs() < 1e-15);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        let (p, q) = (mcnemar_exact(700, 800), mcnemar_exact(800, 700));
        // Normal approximation: z = 100/√1500 = 2.58, two-sided 0.0098; the exact value is close to it.
        assert!(p == q && (p - 0.0098).abs() < 0.002, "{p}");
    }

    /// AUC by ranks against the pairwise count by brute force (ties count half), on scores with ties; a perfect
    /// ranking is 1, a reversed one 0, one class alone has none.
    #[test]
    fn auc_matches_pairwise_counts() {
        let scored: Vec<(f64, bool)> = [0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.9, 0.1, 0.55]
            .iter()
            .zip([false, true, false, true, true, false, true, true, false])
            .map(|(&s, y)| (s, y))
            .collect();
        let (mut wins, mut pairs) = (0.0, 0.0);
        for a in scored.iter().filter(|x| x.1) {
            for b in scored.iter().filter(|x| !x.1) {
                pairs += 1.0;
                wins += if a.0 > b.0 {
                    1.0
                } else if a.0 == b.0 {
                    0.5
                } else {
                    0.0
                };
            }
        }
        assert!((auc(&scored).unwrap() - wins / pairs).abs() < 1e-15);
        assert_eq!(auc(&[(0.2, false), (0.9, true)]), Some(1.0));
        assert_eq!(auc(&[(0.9, false), (0.2, true)]), Some(0.0));
        assert_eq!(auc(&[(0.9, true), (0.2, true)]), None);
    }
}
