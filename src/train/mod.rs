//! Training: gradient sinks, optimizers, LR schedules, the training loop, memory accounting and run reports.
pub mod grads;
pub mod optim;
pub mod schedule;

pub use grads::DenseGrads;
