//! Quantizers and quantized kernels for qtune's training states, working on plain row-major `f32` slices so the
//! main crate can wrap them for candle's CPU tensors now and CUDA later.
//!
//! - [`cpu`]: the CPU's vector and matrix features, detected at run time.
//! - [`rng`]: counter-based Philox RNG: uniform and Gaussian draws as pure functions of (key, element index).
//! - [`round`]: round-to-nearest and stochastic rounding.
//! - [`uniform`]: INT8/INT4, symmetric or asymmetric, per tensor / row / block; frozen-scale re-encoding.
//! - [`nf4`]: bitsandbytes' NF4 with double quantization, bit-exact with bitsandbytes.
//! - [`hybrid`]: QFT's dense-and-sparse weights: INT8 per row plus the top-p% outliers kept in f32 (CSR).
//! - [`int8`]: `x·Wᵀ` on the integer units: per-row INT8 activations × i8 weight codes (rten-gemm, VNNI/AVX2).
//! - [`matmul`]: `x·Wᵀ` and `dy·W` against any quantized weight, tile by tile on the `gemm` f32 kernels.
//! - [`weight`]: the [`QuantWeight`] trait the kernels use, and exact [`QuantBytes`] accounting.
// First, so its `multiversion!` macro is visible in the modules below.
#[macro_use]
mod simd;
mod gauss;

pub mod amx;
pub mod cpu;
pub mod error;
pub mod hybrid;
pub mod int8;
pub mod matmul;
pub mod nf4;
pub mod rng;
pub mod round;
pub mod uniform;
pub mod weight;

pub use cpu::CpuFeatures;
pub use error::{QuantError, Result};
pub use hybrid::HybridTensor;
pub use int8::{matmul_xw_int, matmul_xwt_int, matmul_xwt_mixed, IntWeight};
pub use matmul::{matmul_xw, matmul_xwt};
pub use nf4::Nf4Tensor;
pub use rng::RngKey;
pub use round::Rounding;
pub use uniform::{Bits, Granularity, IntTensor, QuantSpec};
pub use weight::{QuantBytes, QuantWeight};
