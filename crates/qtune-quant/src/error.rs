//! The crate's error type: every fallible entry point returns `Result<_, QuantError>` instead of panicking on
//! bad shapes or parameters, so the trainer can report which tensor was wrong.

/// What went wrong, with the numbers needed to see why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch { what: &'static str, expected: usize, got: usize },

    #[error("invalid shape {rows}x{cols}: {reason}")]
    InvalidShape { rows: usize, cols: usize, reason: &'static str },

    #[error("invalid block size {block}: {reason}")]
    InvalidBlockSize { block: usize, reason: &'static str },

    #[error("unsupported bit width {0}: only 8 and 4 are implemented")]
    UnsupportedBits(u32),

    #[error("outlier fraction {0} is not in [0, 1)")]
    InvalidFraction(f64),

    #[error("elements {start}..{end} are out of bounds for a tensor of {len} elements")]
    OutOfBounds { start: usize, end: usize, len: usize },

    #[error("no integer path for this weight: {0}")]
    NoIntegerPath(&'static str),

    #[error("integer GEMM failed: {0}")]
    Gemm(String),
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// Checks that a buffer has the length its shape implies.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch { what, expected, got })
    }
}

/// Checks a rows×cols shape and returns its element count (overflow is an error, not a wrap).
pub(crate) fn check_shape(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(QuantError::InvalidShape { rows, cols, reason: "element count overflows usize" })
}

/// Checks that `start..end` lies inside a tensor of `len` elements.
pub(crate) fn check_span(start: usize, count: usize, len: usize) -> Result<()> {
    match start.checked_add(count) {
        Some(end) if end <= len => Ok(()),
        _ => Err(QuantError::OutOfBounds { start, end: start.saturating_add(count), len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_is_wrong() {
        let e = check_len("data", 12, 10).unwrap_err();
        assert_eq!(e.to_string(), "data: expected 12 elements, got 10");
        let e = check_span(8, 4, 10).unwrap_err();
        assert_eq!(e.to_string(), "elements 8..12 are out of bounds for a tensor of 10 elements");
        assert!(check_shape(usize::MAX, 2).is_err());
        assert_eq!(check_shape(3, 4), Ok(12));
        assert!(check_span(usize::MAX, 2, 10).is_err());
    }
}
