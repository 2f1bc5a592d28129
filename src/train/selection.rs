//! Evaluation during training: the dev split every `--eval-every` steps, each result a line of `<out>/dev.jsonl`
//! (and a point of the report's plots), the best state kept in `<out>/best.safetensors`, optional early stopping,
//! and at the end the best state restored before the final evaluations and the export. The record of it all
//! ([`Selection`]) is part of a checkpoint, so a resumed run goes on exactly as an uninterrupted one.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The options of evaluation during training (read by the training loop only).
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "Evaluation during training")]
pub struct SelectionArgs {
    /// Evaluate the dev split every N steps (0: only before and after training); the best state is kept and
    /// restored at the end.
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Stop after this many dev evaluations in a row without a better score (0: never). Needs --eval-every.
    #[arg(long, default_value_t = 0)]
    pub early_stop: usize,
    /// Keep the last state at the end instead of restoring the best dev evaluation's.
    #[arg(long)]
    pub keep_last: bool,
}

impl SelectionArgs {
    pub fn check(&self) -> Result<()> {
        if self.early_stop > 0 && self.eval_every == 0 {
            return Err(Error::Option("--early-stop needs --eval-every".into()));
        }
        Ok(())
    }

    /// Whether the dev split is evaluated after `steps_done` steps.
    pub fn due(&self, steps_done: usize) -> bool {
        self.eval_every > 0 && steps_done.is_multiple_of(self.eval_every)
    }
}

/// One dev evaluation: after how many steps, and what it measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DevPoint {
    pub step: usize,
    pub accuracy: f64,
    pub loss: f64,
}

impl DevPoint {
    /// Whether `self` is better than `other`: by accuracy, then loss, when examples have answers (classification,
    /// multiple choice); by loss for language modelling, whose accuracy is per token.
    pub fn beats(&self, other: &DevPoint, by_accuracy: bool) -> bool {
        if by_accuracy && self.accuracy != other.accuracy {
            return self.accuracy > other.accuracy;
        }
        self.loss < other.loss
    }
}

/// Every dev evaluation of a run so far, the best one, and how many came since it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The evaluations in step order (the one before training at step 0).
    pub points: Vec<DevPoint>,
    /// The best evaluation after some training (the state before training is never restored).
    pub best: Option<DevPoint>,
    /// Evaluations since the best one.
    pub since_best: usize,
}

impl Selection {
    /// Records an evaluation; true when it is the new best (the caller then saves the state).
    pub fn record(&mut self, p: DevPoint, by_accuracy: bool) -> bool {
        self.points.push(p);
        if p.step == 0 {
            return false;
        }
        match self.best {
            Some(b) if !p.beats(&b, by_accuracy) => {
                self.since_best += 1;
                false
            }
            _ => {
                self.best = Some(p);
                self.since_best = 0;
                true
            }
        }
    }

    /// Whether `patience` evaluations in a row have not beaten the best (0: never stop).
    pub fn exhausted(&self, patience: usize) -> bool {
        patience > 0 && self.since_best >= patience
    }

    /// Writes `<out>/dev.jsonl`, one line per evaluation (replaced whole, so it always matches the checkpoint).
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut text = Vec::new();
        for p in &self.points {
            text.extend(serde_json::to_vec(p).map_err(|e| Error::Msg(e.to_string()))?);
            text.push(b'\n');
        }
        crate::io::write_bytes_atomic(&out.join("dev.jsonl"), &text)
    }
}

/// Where the best state is kept.
pub fn best_path(out: &Path) -> PathBuf {
    out.join("best.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(step: usize, accuracy: f64, loss: f64) -> DevPoint {
        DevPoint { step, accuracy, loss }
    }

    /// Against a hand-worked sequence: the best by accuracy (loss breaking ties), the state before training never
    /// the best, and patience counted from the best.
    #[test]
    fn selection_tracks_the_best_and_patience() {
        let mut s = Selection::default();
        assert!(!s.record(p(0, 0.9, 0.1), true), "step 0 is a point, never the best");
        assert!(s.record(p(10, 0.6, 0.7), true));
        assert!(s.record(p(20, 0.6, 0.6), true), "same accuracy, lower loss");
        assert!(!s.record(p(30, 0.55, 0.5), true));
        assert!(!s.exhausted(2) && s.exhausted(1) && !s.exhausted(0));
        assert!(!s.record(p(40, 0.6, 0.65), true));
        assert!(s.exhausted(2));
        assert_eq!(s.best, Some(p(20, 0.6, 0.6)));
        assert_eq!(s.points.len(), 5);
        // By loss (language modelling) the accuracy does not count.
        let mut s = Selection::default();
        s.record(p(10, 0.5, 1.0), false);
        assert!(s.record(p(20, 0.4, 0.9), false));
        assert!(SelectionArgs { early_stop: 2, ..Default::default() }.check().is_err());
    }
}
