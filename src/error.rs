//! The crate's typed error. Every message names the file or option at fault and the problem.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}:{line}: {msg}")]
    Line { path: PathBuf, line: usize, msg: String },
    #[error("invalid option: {0}")]
    Option(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("numerical fault: {0}")]
    Numerical(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Msg(String),
    /// The run stopped on Ctrl-C or SIGTERM after checkpointing (every rank returns it at the same step).
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
    pub fn line(path: impl Into<PathBuf>, line: usize, msg: impl std::fmt::Display) -> Self {
        Error::Line { path: path.into(), line, msg: msg.to_string() }
    }
}

/// A quantized kernel's error (qtune-quant's), as the engine reports it.
pub fn quant_err(e: qtune_quant::QuantError) -> Error {
    Error::Msg(format!("quantized kernel: {e}"))
}
