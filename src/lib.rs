//! qtune: fine-tune LLaMA-family models with a fraction of the memory ordinary fine-tuning needs.
//!
//! The crate is laid out the way a training step flows:
//! - [`model`]: the LLaMA-family decoder as forward/backward layer pairs, its loaders (GGUF, HF) and exporter.
//! - [`data`]: tasks (label-word classification, causal LM on prompt/completion pairs), splits and batching.
//! - [`train`]: what a method is to the training loop, the first- and zeroth-order loops, optimizers, LR schedules,
//!   the training loop with evaluation and run records, memory accounting.
//! - [`dist`]: data parallelism across processes (MPI), the collective interface the loops call.
//! - [`methods`]: the fine-tuning methods, each implementing the loops' traits, with its own options.
//! - [`plan`], [`bench`], [`report`]: the memory planner, the benchmark and the run reports, above the methods.
//! - [`device`]: where the engine runs (`--device cpu|cuda[:N]`).
//! - [`io`]: crash-safe file output.
//! - the quantizers and quantized kernels live in the `qtune-quant` crate, re-exported as [`quant`].
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod fuzzing;
pub mod io;
pub mod methods;
pub mod model;
pub mod options;
pub mod plan;
pub mod report;
pub mod train;

pub use error::{Error, Result};
pub use qtune_quant as quant;
