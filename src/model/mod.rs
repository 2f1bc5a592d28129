//! The model: configuration, parameter naming and storage, layers as forward/backward pairs, the decoder,
//! loaders (HF directory, GGUF), the tokenizer and the HF exporter.
pub mod config;
pub mod layers;
pub mod llama;
pub mod load;
pub mod params;
pub mod quantized;
pub mod rope;
pub mod tokenizer;

pub use config::{Arch, LlamaConfig};
pub use llama::{Batch, Choices, GradSink, Keep, Llama, Output, Packing, Targets, Trace, Weights, MAX_LEN, MAX_ROWS};
pub use load::{export_hf, load_model, LoadedModel};
pub use params::{BlockParam, ParamId, ParamStore};
pub use tokenizer::Tok;
