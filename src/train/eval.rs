//! Evaluation: accuracy, mean loss and every example's answer on a split, for any inference forward (a method's,
//! or a loaded model's in `qtune eval`). A method that wants its own figures of an evaluation (QST: how far its side
//! branch moves the answer) supplies an [`EvalProbe`].
use crate::data::{make_batch, Target, TaskData};
use crate::model::{Batch, Choices, Output};
use crate::{Error, Result};
use candle_core::{Device, D};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One example's answer on a classification split. `key` (a hash of the prompt's tokens and the label) names the
/// example across runs, so two runs' answers can be paired on the examples they share ([`crate::report::paired`]).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Prediction {
    /// The example's index in its split.
    pub example: usize,
    pub key: String,
    pub label: u32,
    pub predicted: u32,
    /// The example's cross-entropy over the label words.
    pub loss: f64,
    /// A model with a side branch ([`Output::side`], QST): the branch's part of the example's label-word logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Vec<f32>>,
}

/// FNV-1a over the prompt's tokens and the label, as 16 hex digits (a JSON number would lose bits in some readers).
fn example_key(prompt: &[u32], label: u32) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in prompt.iter().chain(std::iter::once(&label)).flat_map(|t| t.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A method's own measurement over an evaluation: it sees every batch's output and reports figures at the end.
pub trait EvalProbe {
    /// One classification batch's output ([P, C] label-word logits, one row per example).
    fn observe(&mut self, out: &Output) -> Result<()>;
    /// The figures over the split (name, value), for the summary.
    fn figures(&self) -> Vec<(&'static str, f64)>;
    /// The figures in words, for the accuracy line ("" when there are none).
    fn describe(&self) -> String;
}

/// Accuracy and mean loss of a model on one split.
#[derive(Clone, Debug, Default)]
pub struct EvalResult {
    /// Classification: argmax over the label words. Multiple choice: argmax over the options' summed
    /// log-likelihoods (the length-normalized accuracy is the figure `acc_norm`). Language modelling: next-token
    /// accuracy on the answer tokens.
    pub accuracy: f64,
    /// Mean cross-entropy of the targets (less noisy than the accuracy on a few hundred examples).
    pub loss: f64,
    /// Classification: the accuracy of always answering the split's most frequent class.
    pub majority: Option<f64>,
    pub examples: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// The method's own figures ([`EvalProbe::figures`]) and their description.
    pub figures: Vec<(&'static str, f64)>,
    pub note: String,
    /// Classification and multiple choice: every example's answer, in split order (empty for language modelling,
    /// whose answers are tokens).
    pub predictions: Vec<Prediction>,
}

/// The batches evaluation reads `data` in, each with its examples' indices: sorted by prompt length, so a batch's
/// rows are about as long as each other. `(rank, ranks)`: this rank's share, every ranks-th batch from the rank-th.
pub fn eval_batches(
    data: &TaskData,
    batch_size: usize,
    max_len: usize,
    pad: u32,
    dev: Device,
    (rank, ranks): (usize, usize),
) -> impl Iterator<Item = Result<(Vec<usize>, Batch)>> + '_ {
    let mut order: Vec<usize> = (0..data.examples.len()).collect();
    order.sort_by_key(|&i| data.examples[i].tokens.len());
    let chunks: Vec<Vec<usize>> =
        order.chunks(batch_size.max(1)).skip(rank).step_by(ranks.max(1)).map(<[usize]>::to_vec).collect();
    chunks.into_iter().map(move |chunk| {
        let exs: Vec<_> = chunk.iter().map(|&i| &data.examples[i]).collect();
        let batch = make_batch(&exs, data.classes.as_deref(), max_len, pad, &dev)?;
        Ok((chunk, batch))
    })
}

/// How a split is evaluated: batch size, longest row, padding token, and the device the batches go to.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    pub batch_size: usize,
    pub max_len: usize,
    pub pad: u32,
    pub device: Device,
}

/// Evaluates an inference `forward` (a model's, or a method's own such as QST's base plus side network) on `data`;
/// examples are batched by length so little compute goes to padding. `probe` sees every classification batch.
/// With several ranks (`crate::dist`) each evaluates every ranks-th batch and the counts, losses and answers are
/// combined, so every rank returns the whole split's result; a probe's figures do not combine, so with a probe every
/// rank evaluates every batch.
pub fn evaluate(
    forward: &dyn Fn(&Batch) -> Result<Output>,
    data: &TaskData,
    s: &EvalSettings,
    mut probe: Option<Box<dyn EvalProbe>>,
) -> Result<EvalResult> {
    let t0 = Instant::now();
    let (mut correct, mut count, mut loss_sum, mut tokens) = (0usize, 0usize, 0f64, 0usize);
    let mut class_counts = vec![0usize; if data.answered() { data.n_answers() } else { 0 }];
    let mut predictions = Vec::new();
    let mut correct_norm = 0usize;
    let w = crate::dist::world();
    let share = if probe.is_some() { (0, 1) } else { (w.rank(), w.size()) };
    // Each batch's loss × rows, by its index among all the split's batches: summed in that order, across ranks too.
    let mut batch_losses: Vec<(u64, f64)> = Vec::new();
    for (j, b) in eval_batches(data, s.batch_size, s.max_len, s.pad, s.device.clone(), share).enumerate() {
        let (chunk, batch) = b?;
        let out = forward(&batch)?;
        let pred: Vec<u32> = out.logits.argmax(D::Minus1)?.to_vec1()?;
        let answers = batch.targets.answers();
        let n = answers.len();
        correct += pred.iter().zip(answers).filter(|(p, l)| p == l).count();
        if let Some(c) = &batch.targets.choices {
            correct_norm += normalized_correct(&out.logits.to_vec2()?, c);
        }
        if data.answered() {
            if let Some(p) = probe.as_mut() {
                p.observe(&out)?;
            }
            // One row of scores per example: row k of the [n, C] label-word logits (or option scores) is example
            // chunk[k].
            let logits: Vec<Vec<f32>> = out.logits.to_vec2()?;
            let side: Option<Vec<Vec<f32>>> = out.side.as_ref().map(|s| s.to_vec2()).transpose()?;
            for (k, &i) in chunk.iter().enumerate() {
                let (row, label) = (&logits[k], answers[k]);
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                predictions.push(Prediction {
                    example: i,
                    key: example_key(&data.examples[i].tokens, label),
                    label,
                    predicted: pred[k],
                    loss: lse - row[label as usize] as f64,
                    side: side.as_ref().map(|s| s[k].clone()),
                });
            }
        }
        for &l in answers {
            if let Some(c) = class_counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        count += n;
        loss_sum += out.loss as f64 * n as f64;
        batch_losses.push(((share.0 + j * share.1) as u64, out.loss as f64 * n as f64));
        tokens += batch.real_tokens();
    }
    if share.1 > 1 {
        let mut sums: Vec<f64> = [correct, count, tokens, correct_norm].iter().map(|&c| c as f64).collect();
        sums.extend(class_counts.iter().map(|&c| c as f64));
        crate::dist::sum_f64(&mut sums)?;
        let c = |i: usize| sums[i] as usize;
        (correct, count, tokens, correct_norm) = (c(0), c(1), c(2), c(3));
        class_counts.iter_mut().enumerate().for_each(|(i, n)| *n = c(4 + i));
        // Losses as their bits (JSON has no NaN), added in the split's batch order as one process adds them.
        let mine: Vec<(u64, u64)> = batch_losses.iter().map(|&(i, l)| (i, l.to_bits())).collect();
        let mut all: Vec<(u64, u64)> = Vec::new();
        for bytes in crate::dist::gather_varied(&serde_json::to_vec(&mine).map_err(|e| Error::Msg(e.to_string()))?)? {
            all.extend(serde_json::from_slice::<Vec<(u64, u64)>>(&bytes).map_err(|e| Error::Msg(e.to_string()))?);
        }
        all.sort_by_key(|&(i, _)| i);
        loss_sum = all.iter().fold(0f64, |acc, &(_, l)| acc + f64::from_bits(l));
        let mine: Vec<(usize, &str, u32, u32, u64)> =
            predictions.iter().map(|p| (p.example, p.key.as_str(), p.label, p.predicted, p.loss.to_bits())).collect();
        let mine = serde_json::to_vec(&mine).map_err(|e| Error::Msg(e.to_string()))?;
        predictions = Vec::new();
        for bytes in crate::dist::gather_varied(&mine)? {
            let theirs: Vec<(usize, String, u32, u32, u64)> =
                serde_json::from_slice(&bytes).map_err(|e| Error::Msg(e.to_string()))?;
            predictions.extend(theirs.into_iter().map(|(example, key, label, predicted, loss)| Prediction {
                example,
                key,
                label,
                predicted,
                loss: f64::from_bits(loss),
                side: None,
            }));
        }
    }
    predictions.sort_by_key(|p| p.example);
    let mut figures = probe.as_ref().map(|p| p.figures()).unwrap_or_default();
    if data.examples.iter().any(|e| matches!(e.target, Target::Choice { .. })) {
        figures.push(("acc_norm", correct_norm as f64 / count.max(1) as f64));
    }
    Ok(EvalResult {
        accuracy: correct as f64 / count.max(1) as f64,
        loss: loss_sum / count.max(1) as f64,
        majority: class_counts.iter().max().filter(|_| count > 0).map(|&m| m as f64 / count as f64),
        examples: data.examples.len(),
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        figures,
        note: probe.as_ref().map(|p| p.describe()).unwrap_or_default(),
        predictions,
    })
}

/// How many examples lm-eval's length-normalized score gets right: the argmax of each option's summed
/// log-likelihood divided by its length in bytes (`scores` [E, K], one row per example).
fn normalized_correct(scores: &[Vec<f32>], c: &Choices) -> usize {
    let mut o = 0;
    let mut correct = 0;
    for (row, (&k, &y)) in scores.iter().zip(c.options.iter().zip(&c.answers)) {
        let norm = |j: usize| row[j] as f64 / c.bytes[o + j].max(1) as f64;
        let best = (0..k as usize).fold(0, |b, j| if norm(j) > norm(b) { j } else { b });
        correct += (best == y as usize) as usize;
        o += k as usize;
    }
    correct
}

/// Writes `<out>/predictions.jsonl`: one line per example of each evaluated classification split (`split` is
/// "dev" or "eval"; the dev split as it stands after training). Nothing is written when there is none.
pub fn write_predictions(out: &Path, splits: &[(&str, Option<&EvalResult>)]) -> Result<()> {
    let mut text = Vec::new();
    for (split, r) in splits {
        for p in r.iter().flat_map(|r| &r.predictions) {
            let mut line = serde_json::to_value(p).map_err(|e| Error::Msg(e.to_string()))?;
            line["split"] = (*split).into();
            text.extend(serde_json::to_vec(&line).map_err(|e| Error::Msg(e.to_string()))?);
            text.push(b'\n');
        }
    }
    if text.is_empty() {
        return Ok(());
    }
    crate::io::write_bytes_atomic(&out.join("predictions.jsonl"), &text)
}

/// "0.6150 (loss 0.6641; majority class 0.6180)": accuracy and loss, and for a classification split the accuracy a
/// model needs to beat to have learned more than the label prior; "none (no examples)" for an empty split.
pub fn describe(r: &EvalResult) -> String {
    if r.examples == 0 {
        return "none (no examples)".into();
    }
    let majority = r.majority.map_or(String::new(), |m| format!("; majority class {m:.4}"));
    let note = if r.note.is_empty() { String::new() } else { format!("; {}", r.note) };
    format!("{:.4} (loss {:.4}{majority}{note})", r.accuracy, r.loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Example, Target};
    use candle_core::Tensor;
    use std::collections::HashSet;

    fn settings(batch_size: usize) -> EvalSettings {
        EvalSettings { batch_size, max_len: 16, pad: 0, device: Device::Cpu }
    }

    /// Accuracy, mean loss and the majority class of a classification split, against counts made by hand: a forward
    /// that always answers class 0 on 5 examples labelled 1, 0, 1, 1, 0 is right 2/5 times, and the majority class
    /// (1) is right 3/5 times; the loss is the batch-size-weighted mean of the forward's losses (exact).
    #[test]
    fn evaluate_reports_accuracy_loss_and_majority() {
        let labels = [1u32, 0, 1, 1, 0];
        let examples =
            labels.iter().enumerate().map(|(i, &y)| Example { tokens: vec![1; i + 1], target: Target::Class(y) });
        let data = TaskData { examples: examples.collect(), classes: Some(vec![7, 8]) };
        let forward = |b: &Batch| -> Result<Output> {
            let p = b.targets.labels.len();
            let logits = Tensor::from_vec([1f32, 0.0].repeat(p), (p, 2), &Device::Cpu)?;
            Ok(Output { loss: p as f32, logits, side: None })
        };
        let r = evaluate(&forward, &data, &settings(2), None).unwrap();
        assert_eq!(r.accuracy, 2.0 / 5.0);
        assert_eq!(r.majority, Some(3.0 / 5.0));
        // Batches of 2, 2, 1 report losses 2, 2, 1: (2·2 + 2·2 + 1·1) / 5.
        assert_eq!(r.loss, 9.0 / 5.0);
        // Every example's answer, in split order (the batches were sorted by length), with its cross-entropy over
        // the logits [1, 0] against an f64 reference: ln(e + 1) − logit[label]; budget 1e-12 (f32 logits are exact).
        let want: Vec<(usize, u32, u32)> = labels.iter().enumerate().map(|(i, &y)| (i, y, 0)).collect();
        let got: Vec<(usize, u32, u32)> = r.predictions.iter().map(|p| (p.example, p.label, p.predicted)).collect();
        assert_eq!(got, want);
        for p in &r.predictions {
            let reference = (1f64.exp() + 1.0).ln() - if p.label == 0 { 1.0 } else { 0.0 };
            assert!((p.loss - reference).abs() < 1e-12, "{} vs {reference}", p.loss);
        }
        let keys: HashSet<&str> = r.predictions.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys.len(), 5, "distinct prompts have distinct keys");
        assert_eq!(example_key(&[1, 2], 0), example_key(&[1, 2], 0));
        assert_ne!(example_key(&[1, 2], 0), example_key(&[1, 2], 1));
        let lm = TaskData { examples: vec![], classes: None };
        assert_eq!(evaluate(&forward, &lm, &settings(2), None).unwrap().majority, None);
        assert!(r.figures.is_empty(), "no probe, no figures");
    }

    /// A probe sees every classification batch once and its figures reach the result: a counter of rows.
    #[test]
    fn a_probe_sees_every_batch() {
        struct Rows(usize, usize);
        impl EvalProbe for Rows {
            fn observe(&mut self, out: &Output) -> Result<()> {
                self.0 += 1;
                self.1 += out.logits.dim(0)?;
                Ok(())
            }
            fn figures(&self) -> Vec<(&'static str, f64)> {
                vec![("batches", self.0 as f64), ("rows", self.1 as f64)]
            }
            fn describe(&self) -> String {
                format!("{} rows", self.1)
            }
        }
        let examples = (0..5).map(|i| Example { tokens: vec![1; i + 1], target: Target::Class(0) });
        let data = TaskData { examples: examples.collect(), classes: Some(vec![7, 8]) };
        let forward = |b: &Batch| -> Result<Output> {
            let p = b.targets.labels.len();
            Ok(Output { loss: 0.0, logits: Tensor::zeros((p, 2), candle_core::DType::F32, &Device::Cpu)?, side: None })
        };
        let r = evaluate(&forward, &data, &settings(2), Some(Box::new(Rows(0, 0)))).unwrap();
        assert_eq!(r.figures, [("batches", 3.0), ("rows", 5.0)]);
        assert!(describe(&r).ends_with("; 5 rows)"), "{}", describe(&r));
    }
}
