//! What every quantized matrix offers the kernels and the memory reports: its shape, dequantization of any
//! contiguous span of its row-major elements, and its exact storage bytes. One matmul implementation serves all
//! formats through this trait.

use std::ops::{Add, Range};

use rayon::prelude::*;

use crate::error::{check_len, check_span, QuantError, Result};
use crate::int8::IntWeight;

/// Exact storage of a quantized tensor, split the way memory reports show it. Counts the payload (`len ×
/// size_of`), not allocator slack or the few words of shape metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantBytes {
    /// Integer / NF4 codes (4-bit codes packed two per byte).
    pub codes: usize,
    /// Scales, zero offsets, block absmax (or their double-quantized codes and constants).
    pub scales: usize,
    /// f32 values of the sparse outliers.
    pub sparse_values: usize,
    /// CSR row pointers and column indices of the sparse outliers.
    pub sparse_indices: usize,
}

impl QuantBytes {
    pub fn total(&self) -> usize {
        self.codes + self.scales + self.sparse_values + self.sparse_indices
    }
}

impl Add for QuantBytes {
    type Output = QuantBytes;
    fn add(self, o: QuantBytes) -> QuantBytes {
        QuantBytes {
            codes: self.codes + o.codes,
            scales: self.scales + o.scales,
            sparse_values: self.sparse_values + o.sparse_values,
            sparse_indices: self.sparse_indices + o.sparse_indices,
        }
    }
}

/// Elements per rayon task when dequantizing a whole tensor.
const DEQUANT_CHUNK: usize = 1 << 16;

/// A rows × cols matrix stored in a quantized format (row-major element order).
pub trait QuantWeight: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;

    /// Dequantizes row-major elements `start .. start + out.len()` into `out`.
    fn dequantize_span(&self, start: usize, out: &mut [f32]) -> Result<()>;

    /// Exact storage bytes of the quantized representation.
    fn storage_bytes(&self) -> QuantBytes;

    /// This weight as the integer kernels read it ([`crate::int8`]), where its format allows that.
    fn as_int(&self) -> Option<&dyn IntWeight> {
        None
    }

    fn len(&self) -> usize {
        self.rows() * self.cols()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dequantizes whole rows `rows` into `out` (length `rows.len() × cols`).
    fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows() {
            return Err(QuantError::OutOfBounds { start: rows.start, end: rows.end, len: self.rows() });
        }
        check_len("dequantize_rows output", rows.len() * self.cols(), out.len())?;
        self.dequantize_span(rows.start * self.cols(), out)
    }

    /// Dequantizes the whole matrix into `out`, in parallel.
    fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        check_len("dequantize_into output", self.len(), out.len())?;
        out.par_chunks_mut(DEQUANT_CHUNK)
            .enumerate()
            .try_for_each(|(c, chunk)| self.dequantize_span(c * DEQUANT_CHUNK, chunk))
    }
}

/// Shared bounds check for `dequantize_span` implementations.
pub(crate) fn check_dequant_span(w: &(impl QuantWeight + ?Sized), start: usize, count: usize) -> Result<()> {
    check_span(start, count, w.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_add_and_total() {
        let a = QuantBytes { codes: 10, scales: 4, sparse_values: 0, sparse_indices: 0 };
        let b = QuantBytes { codes: 1, scales: 2, sparse_values: 3, sparse_indices: 4 };
        assert_eq!((a + b).total(), 24);
        assert_eq!((a + b).sparse_indices, 4);
    }
}
