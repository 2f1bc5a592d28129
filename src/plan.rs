//! `qtune plan` and `qtune train --plan`: the memory a method needs for a model config and a run's batches (full
//! rows of a batch size and sequence length, or the run's own row lengths), without loading any weight. It counts with the engine's own accounting — the quantized formats' exact storage
//! (`planned_bytes`, equal to `storage_bytes` of the real tensors), the traces' saved activations and the scratch
//! bounds the methods report ([`block_activation_elems`], [`block_scratch_bytes`]) — and adds what a process holds
//! beyond that count, in three phases whose maximum is the peak:
//! - load: f32 methods hold the f32 model; quantized methods the quantized model plus the largest matrix as read
//!   (taken as 2 bytes per element, bf16) and in f32 while it is quantized;
//! - train: model state + saved activations + scratch, each at its largest over the training batches; a
//!   zeroth-order step also holds one forward's intermediates;
//! - evaluation: model state (optimizer states included: evaluation runs before and after training) + one
//!   inference forward's intermediates at the largest evaluation batch.
//!
//! plus [`RUNTIME_BYTES`] for the process itself. Validated against measured peak RSS (tests/plan.rs, README).
use crate::data::{Batcher, Splits};
use crate::methods::{lora::LoraConfig, qst, quzo, Group, MethodKind, MethodOptions, Storage};
use crate::model::{Batch, Keep, LlamaConfig, ParamId, MAX_LEN, MAX_ROWS};
use crate::train::eval::eval_batches;
use crate::train::memory::{block_activation_elems, block_scratch_bytes, human, Breakdown};
use crate::train::trainer::{check_batching, next_micro_batches, TrainConfig};
use crate::{Error, Result};
use candle_core::Device;

/// What the process holds beyond the planned buffers: code, allocator and thread pools, tokenizer and task data.
/// Measured on the README's machine: `qtune eval` (SmolLM2-135M from its GGUF, with its 49k-token tokenizer, on
/// BoolQ) peaks 110 MiB above its weights and its largest forward; a tiny model with a tiny tokenizer, 12 MiB.
pub const RUNTIME_BYTES: usize = 110 << 20;

/// Model configs the planner knows by name (HF `config.json` files in `configs/`).
pub const NAMED_CONFIGS: &[(&str, &str)] = &[
    ("smollm2-135m", include_str!("../configs/smollm2-135m.json")),
    ("llama-2-7b", include_str!("../configs/llama-2-7b.json")),
    ("llama-2-13b", include_str!("../configs/llama-2-13b.json")),
    ("llama-2-70b", include_str!("../configs/llama-2-70b.json")),
];

/// A named config, or the config of a `config.json`, HF directory or GGUF file (its header only).
pub fn resolve_config(model: &str) -> Result<LlamaConfig> {
    if let Some((_, json)) = NAMED_CONFIGS.iter().find(|(n, _)| *n == model) {
        return LlamaConfig::from_hf_json(json, std::path::Path::new(model));
    }
    let path = std::path::Path::new(model);
    if path.extension().is_some_and(|e| e == "json") {
        return LlamaConfig::from_hf_file(path);
    }
    if !path.exists() {
        let names: Vec<&str> = NAMED_CONFIGS.iter().map(|c| c.0).collect();
        return Err(Error::file(path, format!("not found (and not a known config: {})", names.join(", "))));
    }
    Ok(crate::model::load::read_header(path)?.cfg)
}

/// One batch as the planner sees it: the real length of each row (padding is never computed, see
/// [`crate::model::Packing`]) and the loss positions the head reads.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BatchShape {
    pub lengths: Vec<usize>,
    pub positions: usize,
}

impl BatchShape {
    pub fn of(b: &Batch) -> BatchShape {
        BatchShape { lengths: b.lengths.clone(), positions: b.targets.positions.len() }
    }

    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    pub fn longest(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }
}

/// The batches a plan is for.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Every training (micro-)batch of the run; the train phase takes each count at its largest over them.
    pub train: Vec<BatchShape>,
    /// Every evaluation batch (none: the run does not evaluate).
    pub eval: Vec<BatchShape>,
    /// Label words of a classification task (the loss reads the head at one position per sequence, over these
    /// words); None: language modelling (the whole vocabulary at each loss position).
    pub classes: Option<usize>,
}

impl Shape {
    /// Full rows: training batches of `batch` × `seq` tokens and evaluation batches of `eval_batch` × `seq` (none
    /// when 0), with the head at every position for language modelling: the most any data of this shape can need
    /// (`qtune plan`; `qtune train --plan` plans the run's own batches).
    pub fn full(batch: usize, seq: usize, eval_batch: usize, classes: Option<usize>) -> Result<Shape> {
        if batch == 0 || seq == 0 || batch.max(eval_batch) > MAX_ROWS || seq > MAX_LEN {
            return Err(Error::Option(format!(
                "plan: batch {batch}, evaluation batch {eval_batch} and sequence length {seq}: a batch needs 1 to \
                 {MAX_ROWS} rows of 1 to {MAX_LEN} tokens"
            )));
        }
        let rows =
            |b: usize| BatchShape { lengths: vec![seq; b], positions: if classes.is_some() { b } else { b * seq } };
        let eval = if eval_batch == 0 { vec![] } else { vec![rows(eval_batch)] };
        Ok(Shape { train: vec![rows(batch)], eval, classes })
    }

    /// (loss positions P, logits per position C) of a batch.
    fn head(&self, cfg: &LlamaConfig, b: &BatchShape) -> (usize, usize) {
        (b.positions, self.classes.unwrap_or(cfg.vocab_size))
    }
}

/// A method's planned memory, by phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub method: String,
    pub params: usize,
    /// What the engine counts at a training step's peak (model state, saved activations, scratch).
    pub counted: Breakdown,
    /// Intermediates of the largest forward that keeps nothing (evaluation, or a zeroth-order step's forward).
    pub forward: usize,
    pub load: usize,
    pub train: usize,
    pub eval: usize,
    pub runtime: usize,
    /// runtime + max(load, train, eval): the predicted peak RSS.
    pub peak: usize,
    /// The training batch that needs the most (none: no training step). The train phase takes each count at its
    /// largest over all the batches, which is at least this batch's.
    pub train_batch: Option<BatchShape>,
}

/// Saved activations of a backward through the base ([`crate::model::llama::Trace::bytes`]).
fn trace_bytes(cfg: &LlamaConfig, s: &Shape, b: &BatchShape, keep: Keep) -> usize {
    let per_block =
        if keep == Keep::Inputs { b.tokens() * cfg.hidden_size } else { block_activation_elems(cfg, &b.lengths, true) };
    let (p, c) = s.head(cfg, b);
    4 * (cfg.num_hidden_layers * per_block + p * (2 * cfg.hidden_size + 1 + c))
}

/// Intermediates of one forward that keeps nothing: one block's activations, the longest row's attention scores
/// [H, T, T] beside its probabilities (attention runs row by row), and the logits the loss reads.
fn forward_bytes(cfg: &LlamaConfig, s: &Shape, b: &BatchShape) -> usize {
    let (t, (p, c)) = (b.longest(), s.head(cfg, b));
    4 * (block_activation_elems(cfg, &b.lengths, false) + cfg.num_attention_heads * t * t + p * c)
}

/// What a training batch adds to a method's model state.
enum BatchCost {
    /// A backward through the base: its trace and a block's backward scratch.
    Base,
    /// QST: the side network's trace and the larger of the base forward's and a side block's scratch.
    Side(Box<LlamaConfig>, qst::QstConfig),
    /// Zeroth-order: fixed scratch, and one forward's intermediates (no trace).
    Forward(usize),
}

/// Plans `method` (with the options `train` would get) on `cfg` for `shape`.
pub fn plan(cfg: &LlamaConfig, method: MethodKind, o: &MethodOptions, shape: &Shape) -> Result<Plan> {
    for b in shape.train.iter().chain(&shape.eval) {
        let (rows, t) = (b.lengths.len(), b.longest());
        if rows == 0 || b.lengths.contains(&0) || rows > MAX_ROWS || t > MAX_LEN {
            return Err(Error::Option(format!(
                "plan: a batch of {rows} rows, the longest {t} tokens: a batch needs 1 to {MAX_ROWS} rows of 1 to \
                 {MAX_LEN} tokens"
            )));
        }
    }
    let n = cfg.num_params();
    let largest_matrix =
        ParamId::all(cfg).into_iter().filter(|id| id.is_matrix()).map(|id| id.numel(cfg)).max().unwrap_or(0);
    let keep = o.first_order.keep();
    // The model state is the method's own count (the one its steps report); what a batch adds depends on how the
    // method trains.
    let state = method.planned_state(cfg, o)?;
    let storage = method.storage(o)?;
    let cost = match method {
        _ if method.is_zeroth_order() && o.zo.lora => BatchCost::Forward(
            4 * LoraConfig { r: o.lora.lora_r, alpha: o.lora.lora_alpha, seed: 0 }.trainable_params(cfg),
        ),
        MethodKind::Mezo => BatchCost::Forward(4 * largest_tensor(cfg)),
        MethodKind::Quzo => BatchCost::Forward(quzo::update_scratch_bytes(cfg)),
        MethodKind::Qst => {
            let q = o.qst.config(keep, 0);
            BatchCost::Side(Box::new(qst::side_config(cfg, q.r, q.side_heads)?), q)
        }
        _ => BatchCost::Base,
    };
    // The integer path's scratch (QuZO's default, QFT's option): a forward's largest matmul (activation codes,
    // one weight panel, its i32 sums), and for QFT also the input gradient's (dy with W's scales folded in, its
    // codes, the i32 sums; the hybrid weight's INT8 codes are read in place).
    let int8 = method.reads(o.zo.lora, Group::Compute) && o.compute.of(method, o.zo.lora).is_int();
    let int8_bytes = |b: &BatchShape| -> usize {
        use qtune_quant::int8::{input_grad_scratch_bytes, scratch_bytes};
        let m = b.lengths.len() * b.longest();
        let backward = !method.is_zeroth_order();
        let mats = ParamId::all(cfg).into_iter().filter(|id| id.is_matrix()).map(|id| id.shape(cfg));
        let each = mats.map(|s| {
            let fwd = scratch_bytes(m, s[0], s[1]);
            if backward {
                fwd.max(input_grad_scratch_bytes(m, s[0], s[1], true))
            } else {
                fwd
            }
        });
        if int8 {
            each.max().unwrap_or(0)
        } else {
            0
        }
    };
    // A training batch's count (activations and scratch beside the model state) and the forward it also holds.
    let batch_count = |b: &BatchShape| -> (Breakdown, usize) {
        let (activations, scratch, forward) = match &cost {
            BatchCost::Base => {
                (trace_bytes(cfg, shape, b, keep), block_scratch_bytes(cfg, &b.lengths, keep, 4) + int8_bytes(b), 0)
            }
            BatchCost::Side(side, q) => (
                qst::trace_bytes(cfg, side, q, &b.lengths, shape.head(cfg, b)),
                qst::scratch_bytes(cfg, side, keep, &b.lengths),
                0,
            ),
            BatchCost::Forward(scratch) => (0, *scratch, forward_bytes(cfg, shape, b) + int8_bytes(b)),
        };
        (Breakdown { activations, scratch, ..state }, forward)
    };
    // Over the run's batches, the largest of each count, as the engine reports a run (its activations and its
    // scratch may peak in different batches); none (an evaluation-only run): the model state alone.
    let (mut counted, mut forward_train, mut train_batch) = (state, 0, None::<(usize, &BatchShape)>);
    for b in &shape.train {
        let (c, f) = batch_count(b);
        counted = counted.max(c);
        forward_train = forward_train.max(f);
        if train_batch.is_none_or(|(most, _)| c.total() + f > most) {
            train_batch = Some((c.total() + f, b));
        }
    }
    let forward_eval = shape.eval.iter().map(|b| forward_bytes(cfg, shape, b)).max().unwrap_or(0);
    // f32 methods hold the f32 model; quantized ones the quantized model plus the largest matrix as read (bf16)
    // and in f32 while it is quantized.
    let load = match storage {
        Storage::F32 => 4 * n,
        _ => storage.model_bytes(cfg)? + (2 + 4) * largest_matrix,
    };
    let train = counted.total() + forward_train;
    let eval = counted.model_state() + forward_eval;
    Ok(Plan {
        method: method.run_name(o),
        params: n,
        counted,
        forward: forward_train.max(forward_eval),
        load,
        train,
        eval,
        runtime: RUNTIME_BYTES,
        peak: RUNTIME_BYTES + load.max(train).max(eval),
        train_batch: train_batch.map(|(_, b)| b.clone()),
    })
}

/// The largest parameter tensor (MeZO's one perturbed copy).
fn largest_tensor(cfg: &LlamaConfig) -> usize {
    ParamId::all(cfg).into_iter().map(|id| id.numel(cfg)).max().unwrap_or(0)
}

/// The batches a run with `cfg` draws, as the memory planner sees them: every step's training micro-batches (from
/// the first step) and the evaluation batches of the dev and eval splits (none when the run evaluates nothing).
/// The batches are drawn as the run draws them, on `dev`.
pub fn plan_shape(splits: &Splits, cfg: &TrainConfig, dev: &Device) -> Result<Shape> {
    check_batching(splits, cfg)?;
    let mut batcher = Batcher::new(splits.train.examples.len(), cfg.seed);
    let mut train = Vec::new();
    for _ in 0..cfg.steps {
        train.extend(next_micro_batches(&mut batcher, splits, cfg, 0..cfg.grad_accum, dev)?.iter().map(BatchShape::of));
    }
    let mut eval = Vec::new();
    for data in [&splits.dev, &splits.eval].into_iter().filter(|_| !cfg.skip_eval) {
        for b in eval_batches(data, cfg.eval_batch_size, cfg.max_seq_len, cfg.pad_id, dev.clone(), (0, 1)) {
            eval.push(BatchShape::of(&b?.1));
        }
    }
    Ok(Shape { train, eval, classes: splits.train.classes.as_ref().map(Vec::len) })
}

/// The plans as a Markdown table (sizes in GiB, model state also in bytes per parameter).
pub fn table(plans: &[Plan]) -> String {
    let gib = |b: usize| format!("{:.2}", b as f64 / (1u64 << 30) as f64);
    let mut s = String::from(
        "| method | weights | gradients | optimizer | model state (B/param) | activations | scratch | forward | load | train | eval | predicted peak |\n",
    );
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for p in plans {
        let c = &p.counted;
        s += &format!(
            "| {} | {} | {} | {} | {} ({:.2}) | {} | {} | {} | {} | {} | {} | **{}** |\n",
            p.method,
            gib(c.weights),
            gib(c.gradients),
            gib(c.optimizer),
            gib(c.model_state()),
            c.model_state() as f64 / p.params as f64,
            gib(c.activations),
            gib(c.scratch),
            gib(p.forward),
            gib(p.load),
            gib(p.train),
            gib(p.eval),
            gib(p.peak),
        );
    }
    match plans.first().map(|p| p.runtime) {
        Some(0) => s += "\nGiB; predicted peak = max(load, train, eval).\n",
        Some(r) => s += &format!("\nGiB; predicted peak = max(load, train, eval) + {} runtime.\n", human(r)),
        None => {}
    }
    s
}

#[cfg(test)]
mod tests {
    //! The planner's count equals what each method counts during a real step (exactly, byte for byte), on the
    //! tiny model, for every method and the options that change memory.
    use super::*;
    use crate::methods::{qst::Downsample, RunContext};
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::quantized::Source;
    use crate::model::{Batch, Llama, ParamStore, Targets};
    use crate::train::optim::OptimizerKind;
    use crate::train::{Method, OnNonFinite};
    use candle_core::{DType, Device, Tensor};

    fn options() -> MethodOptions {
        let mut o = MethodOptions::default();
        o.qft.outlier_fraction = 0.05;
        o.qst.side_r = 2;
        o.qst.adapter_rank = 4;
        o.lora.lora_r = 2;
        o.lora.lora_alpha = 4.0;
        o
    }

    /// `options()` changed by `f`.
    fn with(f: impl FnOnce(&mut MethodOptions)) -> MethodOptions {
        let mut o = options();
        f(&mut o);
        o
    }

    fn build(method: MethodKind, params: &ParamStore, o: &MethodOptions) -> Box<dyn Method> {
        let ctx = RunContext::cpu(0, OnNonFinite::Stop, 1);
        method.build(o, Source::Params(params.clone()), &ctx).unwrap()
    }

    /// The plan for a batch's own row lengths is what the engine counts on it, on a full batch and on a padded one
    /// (padding is never computed); the full-row plan bounds the padded batch.
    #[test]
    fn plan_counts_what_the_engine_counts() {
        let padded = batch(true);
        let (rows, t) = padded.ids.dims2().unwrap();
        let b = Batch {
            ids: Tensor::new(&[[3u32, 7, 1, 30, 12, 5], [9, 2, 2, 17, 31, 8]], &Device::Cpu).unwrap(),
            lengths: vec![t; rows],
            targets: Targets { positions: vec![5, 11], ..padded.targets.clone() },
        };
        let shape = Shape::full(rows, t, rows, Some(3)).unwrap();
        let padded_shape = Shape { train: vec![BatchShape::of(&padded)], eval: vec![], classes: Some(3) };
        // Language modelling: the whole vocabulary at each of the padded batch's 8 loss positions.
        let lm = batch(false);
        let lm_shape = Shape { train: vec![BatchShape::of(&lm)], eval: vec![], classes: None };
        assert_eq!(shape.train, vec![BatchShape::of(&b)]);
        use MethodKind as M;
        let o = options();
        let cases: Vec<(MethodKind, MethodOptions)> = vec![
            (M::FullAdamw, o.clone()),
            (M::FullLion, o.clone()),
            (M::FullAdamw, with(|o| o.first_order.recompute = true)),
            (M::Qat, with(|o| o.bits.bits = 4)),
            (M::Qft, o.clone()),
            (M::Qft, with(|o| (o.qft.fused, o.first_order.clip) = (true, 0.0))),
            (M::Lora, o.clone()),
            (M::Qlora, with(|o| o.optimizer.optimizer = OptimizerKind::Lion)),
            (M::Qst, o.clone()),
            (M::Qst, with(|o| o.first_order.recompute = true)),
            (M::Qst, with(|o| o.qst.downsample = Downsample::Linear)),
            (M::Qst, with(|o| o.qst.downsample = Downsample::Lora)),
            (M::Qst, with(|o| o.qst.downsample = Downsample::MaxPool)),
            (M::Mezo, o.clone()),
            (M::Quzo, o.clone()),
            (M::Quzo, with(|o| o.bits.bits = 4)),
            (M::Mezo, with(|o| o.zo.lora = true)),
            (M::Quzo, with(|o| (o.zo.lora, o.bits.bits) = (true, 4))),
        ];
        for tied in [true, false] {
            let cfg = tiny_config(tied);
            let model = Llama::new(cfg.clone());
            let params = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
            for (method, o) in &cases {
                let method = *method;
                let mut m = build(method, &params, o);
                let counted = m.step(&model, std::slice::from_ref(&b), 1e-3).unwrap().memory;
                let p = plan(&cfg, method, o, &shape).unwrap();
                assert_eq!(
                    p.counted, counted,
                    "{} (tied {tied}, {:?}, {:?})",
                    p.method, o.first_order, o.qst.downsample
                );
                let less = build(method, &params, o).step(&model, std::slice::from_ref(&padded), 1e-3).unwrap().memory;
                assert_eq!(plan(&cfg, method, o, &padded_shape).unwrap().counted, less, "{} padded", p.method);
                let lm_counted =
                    build(method, &params, o).step(&model, std::slice::from_ref(&lm), 1e-3).unwrap().memory;
                assert_eq!(plan(&cfg, method, o, &lm_shape).unwrap().counted, lm_counted, "{} lm", p.method);
                assert!(
                    less.activations < counted.activations || counted.activations == 0,
                    "{}: padded {} against full {}",
                    p.method,
                    less.activations,
                    counted.activations
                );
                assert!(less.scratch <= counted.scratch, "{}", p.method);
                // The planned state (which the step reported) against the bytes of the tensors the method holds after
                // its step: the weights and the optimizer states it created (every gradient has been applied).
                let held = m.held_bytes();
                assert_eq!((p.counted.weights, p.counted.optimizer), (held.weights, held.optimizer), "{}", p.method);
                assert_eq!(held.gradients, 0, "{}: gradients left after the update", p.method);
                assert!(p.peak >= p.runtime + p.train.max(p.eval), "{}", p.method);
            }
        }
    }

    /// Named configs resolve; LLaMA-2-7B has its 6.74 B parameters.
    #[test]
    fn named_configs_resolve() {
        let c = resolve_config("llama-2-7b").unwrap();
        assert_eq!(c.num_params(), 6_738_415_616);
        assert_eq!(resolve_config("llama-2-70b").unwrap().num_params(), 68_976_648_192);
        assert!(resolve_config("no-such-model").is_err());
    }
}
