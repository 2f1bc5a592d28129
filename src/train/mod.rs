//! Training: gradient sinks, optimizers, LR schedules, the training loop, memory accounting and run reports.
pub mod grads;
pub mod memory;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use grads::DenseGrads;
