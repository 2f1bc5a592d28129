//! Quantizers (placeholder; built by the quant core).
pub mod rng;
