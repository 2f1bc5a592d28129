//! The model: configuration, parameter naming and storage, layers as forward/backward pairs, the decoder,
//! loaders (HF directory, GGUF), the tokenizer and the HF exporter.
pub mod batch;
pub mod config;
pub mod export;
pub mod generate;
pub mod gguf_export;
pub mod gguf_tokenizer;
pub mod layers;
pub mod llama;
pub mod load;
pub mod params;
pub mod quantized;
#[cfg(feature = "cuda")]
pub mod quantized_gpu;
pub mod reader;
pub mod rope;
pub mod tokenizer;

pub use batch::{Batch, Choices, Packing, Targets, MAX_LEN, MAX_ROWS};
pub use config::{Arch, LlamaConfig};
pub use export::export_hf;
pub use llama::{GradSink, Keep, Llama, Output, Trace, Weights};
pub use load::{load_model, LoadedModel};
pub use params::{BlockParam, ParamId, ParamStore};
pub use tokenizer::Tok;
