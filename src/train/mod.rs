//! Training: what a method is to the loop ([`method`]), the two loops every method runs on ([`first_order`],
//! [`zeroth_order`]), gradient sinks, trained tensors and optimizers, LR schedules, the training loop ([`trainer`])
//! with evaluation ([`eval`]; during training, [`selection`]), its records ([`records`]) and folder ([`run_dir`]), and memory accounting. Nothing here knows a method by
//! name: the methods (`crate::methods`) sit above this layer and implement its traits.
pub mod eval;
pub mod first_order;
pub mod grads;
pub mod memory;
pub mod method;
pub mod optim;
pub mod records;
pub mod run_dir;
pub mod schedule;
pub mod selection;
pub mod trained;
pub mod trainer;
pub mod zeroth_order;

pub use grads::DenseGrads;
pub use method::{Figures, Method, OnNonFinite, StepStats};
