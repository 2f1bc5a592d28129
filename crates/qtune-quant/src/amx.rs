//! AMX-INT8 matrix products: `acc (m×n) = Σ_c (a[i, c] − zero)·B[c, j]` on Intel's tile units (TDPBSSD), where
//! the CPU has them and Linux grants this process the tile state. [`crate::int8`] calls it in place of rten-gemm's
//! VNNI kernel when [`available`] says so.
//!
//! Tiles (palette 1): eight registers of 16 rows × 64 bytes. One TDPBSSD multiplies a 16×64 i8 tile of A by a
//! 64×16 i8 tile of B held in "VNNI" order (16 rows of 16 columns × 4 consecutive k) into 16×16 i32 sums.
//!
//! - A is the activation codes made signed (`a − zero`, which lies in −127..=127), rows padded to a multiple of 32
//!   and k to a multiple of 64 with zeros, read by the tile loads in place (stride: the padded k).
//! - B is packed once per call into 16-column blocks, each a run of 64-k tiles of 1 KiB ([`PackedB`]).
//! - The kernel keeps a 32×32 block of sums in four tiles (two A tiles × two B tiles, the remaining four registers),
//!   as oneDNN's does. Work is split into row chunks whose A fits in L2 times column chunks (32–256 columns, at
//!   least 8 tasks per thread where the shape allows), in parallel; a B block is read from memory once per row chunk.
//!   Whole 32×32 blocks are stored straight into the output; edge blocks go through a local block.
//!
//! Every step has a scalar twin that follows the tiles' definition element by element ([`Engine::Emulated`]), so the
//! packing and blocking are tested on every machine; on an AMX machine the tests compare the tiles with it bit for
//! bit. Set `QTUNE_NO_AMX=1` to run the VNNI kernel on an AMX machine (for comparisons).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

/// Bytes of k per tile row, and rows per tile.
const TK: usize = 64;
const TR: usize = 16;
/// Output block of one kernel call: 2×2 tiles.
const BLK: usize = 32;
/// Bytes of A a row chunk may hold, to stay in L2 while each B block streams past it.
const A_CHUNK_BYTES: usize = 1 << 20;
/// Output columns per parallel task, at most (fewer where that gives each thread several tasks).
const COL_CHUNK: usize = 256;

/// Which implementation multiplies the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The tile instructions (only where [`available`]).
    Amx,
    /// Scalar code with the tiles' semantics: the reference for the packing and the tile kernel.
    Emulated,
}

/// Whether AMX-INT8 can run in this process: the CPU has it, `QTUNE_NO_AMX` is not set, and Linux granted the tile
/// data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once).
pub fn available() -> bool {
    ENABLED.load(Ordering::Relaxed) && granted()
}

/// The CPU has AMX-INT8, `QTUNE_NO_AMX` is unset, and the OS granted the tile state (whether or not enabled).
pub fn granted() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        crate::CpuFeatures::detect().amx_int8 && std::env::var_os("QTUNE_NO_AMX").is_none() && request_tile_state()
    })
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the tiles off (or back on) for this process: benchmarks compare them with the VNNI kernel in one run.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it changes only this process's permitted xsave state.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// B (k×n, `B[c, j] = b[c·sc + j·sj]`) in tile order: for each 16-column block, `kp/64` tiles of 16 rows r × 16
/// columns j × 4 bytes t holding `B[64·kb + 4r + t, 16·nb + j]`; zeros beyond k and n.
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    /// k rounded up to 64, n rounded up to 32.
    pub kp: usize,
    pub np: usize,
    pub data: Vec<i8>,
}

impl PackedB {
    pub fn pack(b: &[i8], k: usize, n: usize, sc: usize, sj: usize) -> PackedB {
        let (kp, np) = (round_up(k.max(1), TK), round_up(n.max(1), BLK));
        let mut data = vec![0i8; kp * np];
        // One 16-column block per task: kp×16 bytes.
        data.par_chunks_mut(kp * TR).enumerate().for_each(|(nb, blk)| {
            let cols = TR.min(n.saturating_sub(nb * TR));
            if cols == 0 {
                return; // padding beyond n: zeros
            }
            if sc == 1 && cols == TR {
                // W's rows: each tile row takes 4 contiguous bytes from each of the 16 columns' rows, so it is
                // written whole, from 16 sequential streams (k's tail, if any, is zero-padded by `take`).
                let src: Vec<&[i8]> = (0..TR).map(|j| &b[(nb * TR + j) * sj..(nb * TR + j) * sj + k]).collect();
                for (q, row) in blk.chunks_exact_mut(TK).enumerate() {
                    let (kb, r) = (q / TR, q % TR);
                    let c0 = kb * TK + 4 * r;
                    if c0 + 4 <= k {
                        for (j, dst) in row.chunks_exact_mut(4).enumerate() {
                            dst.copy_from_slice(&src[j][c0..c0 + 4]);
                        }
                    } else {
                        for (j, dst) in row.chunks_exact_mut(4).enumerate() {
                            dst.iter_mut().zip(src[j].iter().skip(c0)).for_each(|(d, &v)| *d = v);
                        }
                    }
                }
                return;
            }
            if sj == 1 {
                // W itself (dy·W): a tile row interleaves 4 consecutive rows of W, 16 contiguous bytes from each.
                for (q, row) in blk.chunks_exact_mut(TK).enumerate() {
                    let c0 = (q / TR) * TK + 4 * (q % TR);
                    for t in 0..4.min(k.saturating_sub(c0)) {
                        let src = &b[(c0 + t) * sc + nb * TR..(c0 + t) * sc + nb * TR + cols];
                        for (j, &v) in src.iter().enumerate() {
                            row[4 * j + t] = v;
                        }
                    }
                }
                return;
            }
            for j in 0..cols {
                let col = nb * TR + j;
                for c in 0..k {
                    let (kb, r, t) = (c / TK, (c % TK) / 4, c % 4);
                    blk[kb * TK * TR + r * TK + 4 * j + t] = b[c * sc + col * sj];
                }
            }
        });
        PackedB { k, n, kp, np, data }
    }

    /// The tiles of 16-column block `nb`.
    fn block(&self, nb: usize) -> &[i8] {
        &self.data[nb * self.kp * TR..(nb + 1) * self.kp * TR]
    }
}

/// Bytes of [`pack_a`]'s copy of an m×k A plus a [`PackedB`] of a k×n B (the memory planner's count).
pub fn packed_bytes(m: usize, n: usize, k: usize) -> usize {
    let kp = round_up(k.max(1), TK);
    (round_up(m.max(1), BLK) + round_up(n.max(1), BLK)) * kp
}

/// The one zero point [`pack_a`] takes: `a − 128` is an i8 for every u8 code a (with any other zero point some
/// code's difference is not).
pub const ZERO: u8 = 128;

/// A (m×k u8 with zero point [`ZERO`]) as signed codes, rows padded to 32 and k to 64: returns (codes, mp, kp).
pub fn pack_a(a: &[u8], m: usize, k: usize) -> (Vec<i8>, usize, usize) {
    let (mp, kp) = (round_up(m.max(1), BLK), round_up(k.max(1), TK));
    let mut out = vec![0i8; mp * kp];
    out.par_chunks_mut(kp).zip(a.par_chunks(k.max(1))).for_each(|(o, a)| {
        o.iter_mut().zip(a).for_each(|(o, &a)| *o = (a ^ ZERO) as i8);
    });
    (out, mp, kp)
}

/// `acc (m×n) = A·B` for packed operands, with `engine`'s tiles. `acc` is row-major m×n.
pub fn gemm_packed(engine: Engine, a: &[i8], m: usize, kp: usize, b: &PackedB, acc: &mut [i32]) {
    let n = b.n;
    assert!(engine == Engine::Emulated || granted(), "AMX tiles used where the CPU or OS does not grant them");
    assert_eq!(kp, b.kp);
    assert!(a.len() >= round_up(m.max(1), BLK) * kp && acc.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    let rows_chunk = round_up((A_CHUNK_BYTES / kp).max(BLK), BLK).min(round_up(m, BLK));
    // At least 8 tasks per thread where the shape allows, so that uneven tasks still balance.
    let row_chunks = m.div_ceil(rows_chunk);
    let per_task = n * row_chunks / (8 * rayon::current_num_threads());
    let col_chunk = round_up(per_task.max(1), BLK).min(COL_CHUNK);
    let tasks: Vec<(usize, usize)> =
        (0..m).step_by(rows_chunk).flat_map(|i0| (0..n).step_by(col_chunk).map(move |j0| (i0, j0))).collect();
    let out = SharedOut(acc.as_mut_ptr());
    tasks.par_iter().for_each(|&(i0, j0)| {
        let out = &out;
        let mut tiles = Tiles::start(engine);
        let mut c = [0i32; BLK * BLK];
        for jb in (j0..(j0 + col_chunk).min(n)).step_by(BLK) {
            let (b0, b1) = (b.block(jb / TR), b.block(jb / TR + 1));
            for ib in (i0..(i0 + rows_chunk).min(m)).step_by(BLK) {
                let a = &a[ib * kp..(ib + BLK) * kp];
                // SAFETY (both branches): tasks own disjoint (row chunk × column chunk) rectangles of acc, and every
                // write stays inside its task's rectangle and inside m×n; a whole block is stored in place.
                if ib + BLK <= m && jb + BLK <= n {
                    unsafe { tiles.block(a, kp, b0, b1, out.0.add(ib * n + jb), n) };
                    continue;
                }
                unsafe { tiles.block(a, kp, b0, b1, c.as_mut_ptr(), BLK) };
                for r in 0..BLK.min(m - ib) {
                    let cols = BLK.min(n - jb);
                    unsafe { std::ptr::copy_nonoverlapping(c[r * BLK..].as_ptr(), out.0.add((ib + r) * n + jb), cols) };
                }
            }
        }
    });
}

/// `acc` as a pointer the parallel tasks share (each writes its own rectangle).
struct SharedOut(*mut i32);
// SAFETY: see gemm_packed: the rectangles the tasks write are disjoint.
unsafe impl Sync for SharedOut {}

/// The tile configuration of one thread for the duration of a task.
struct Tiles {
    engine: Engine,
}

/// ldtilecfg's 64-byte operand: palette 1; every tile 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> TileConfig {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&(TK as u16).to_le_bytes());
            cfg[48 + t] = TR as u8;
        }
        TileConfig(cfg)
    }
}

impl Tiles {
    fn start(engine: Engine) -> Tiles {
        if engine == Engine::Amx {
            let cfg = TileConfig::all_full();
            // SAFETY: `available()` was checked by the caller (the OS granted the tile state); the operand is a
            // valid 64-byte palette-1 configuration.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            }
        }
        Tiles { engine }
    }

    /// `c (32×32, rows `stride` i32 apart) = A_rows(32 × kp) · [B block b0 | B block b1]`.
    ///
    /// # Safety
    /// `c` must be valid for writes of 32 rows of 32 i32 at `stride` (≥ 32) i32 apart, and no one else may access
    /// them meanwhile.
    unsafe fn block(&mut self, a: &[i8], kp: usize, b0: &[i8], b1: &[i8], c: *mut i32, stride: usize) {
        match self.engine {
            Engine::Emulated => emulated_block(a, kp, b0, b1, c, stride),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tiles were configured in `start`; a holds 32 rows of kp bytes, b0/b1 kp/64 tiles of 1 KiB;
            // c as the caller promised.
            Engine::Amx => amx_block(a, kp, b0, b1, c, stride),
            #[cfg(not(target_arch = "x86_64"))]
            Engine::Amx => unreachable!("AMX exists on x86_64 only"),
        }
    }
}

/// The tile state is released when a task ends, however it ends (a panic included), so a rayon worker never keeps
/// it (the OS saves and restores 8 KiB of tile data at every switch while it is live).
impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.engine == Engine::Amx {
            // SAFETY: releases this thread's tile state, configured in `start`.
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

/// TDPBSSD's definition: `C[r, j] += Σ_{q<16, t<4} A[r, 4q + t]·B[q, 4j + t]`, over kp/64 tile pairs, stored as
/// [`Tiles::block`] stores (same safety contract).
unsafe fn emulated_block(a: &[i8], kp: usize, b0: &[i8], b1: &[i8], out: *mut i32, stride: usize) {
    let mut c = [0i32; BLK * BLK];
    for kb in 0..kp / TK {
        for (half, b) in [b0, b1].into_iter().enumerate() {
            let bt = &b[kb * TK * TR..(kb + 1) * TK * TR];
            for r in 0..BLK {
                let at = &a[r * kp + kb * TK..r * kp + (kb + 1) * TK];
                for j in 0..TR {
                    let mut s = 0i32;
                    for q in 0..TR {
                        for t in 0..4 {
                            s = s.wrapping_add(at[4 * q + t] as i32 * bt[q * TK + 4 * j + t] as i32);
                        }
                    }
                    // The tiles' i32 sums wrap (past k ≈ 133,000 at full-scale codes); so does their twin.
                    c[r * BLK + half * TR + j] = c[r * BLK + half * TR + j].wrapping_add(s);
                }
            }
        }
    }
    for r in 0..BLK {
        std::ptr::copy_nonoverlapping(c[r * BLK..].as_ptr(), out.add(r * stride), BLK);
    }
}

/// The four output tiles tmm0..3 (rows 0–15 / 16–31 × columns of b0 / b1), A tiles tmm4–5, B tiles tmm6–7.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_block(a: &[i8], kp: usize, b0: &[i8], b1: &[i8], c: *mut i32, stride: usize) {
    use std::arch::asm;
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    let (a0, a1) = (a.as_ptr(), a.as_ptr().add(TR * kp));
    for kb in 0..kp / TK {
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbssd tmm0, tmm4, tmm6",
            "tdpbssd tmm1, tmm4, tmm7",
            "tdpbssd tmm2, tmm5, tmm6",
            "tdpbssd tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(kb * TK),
            a1 = in(reg) a1.add(kb * TK),
            b0 = in(reg) b0.as_ptr().add(kb * TK * TR),
            b1 = in(reg) b1.as_ptr().add(kb * TK * TR),
            sa = in(reg) kp,
            sb = in(reg) TK,
            options(nostack, readonly),
        );
    }
    let (p, s) = (c as *mut u8, stride * 4);
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) p,
        c01 = in(reg) p.add(TR * 4),
        c10 = in(reg) p.add(TR * s),
        c11 = in(reg) p.add(TR * s + TR * 4),
        s = in(reg) s,
        options(nostack),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn reference(a: &[u8], zero: u8, m: usize, k: usize, b: &[i8], n: usize, sc: usize, sj: usize) -> Vec<i32> {
        let mut out = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| (a[i * k + c] as i32 - zero as i32) * b[c * sc + j * sj] as i32).sum();
            }
        }
        out
    }

    fn codes(len: usize, seed: u64) -> Vec<u64> {
        (0..len as u64).map(|i| i.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40).collect()
    }

    /// Shapes that are not multiples of the tiles (k and n and m tails), and both B layouts (W's rows as the
    /// columns, x·Wᵀ; and W itself, dy·W), with the codes' extremes (0 and 255 around the zero of 128, −128..=127).
    fn check(engine: Engine) {
        for &(m, k, n) in &[(1, 1, 1), (33, 70, 17), (64, 576, 96), (40, 129, 161), (70, 64, 32)] {
            let zero = ZERO;
            let a: Vec<u8> = codes(m * k, 1).iter().map(|&v| v as u8).collect();
            let w: Vec<i8> = codes(n * k, 2).iter().map(|&v| v as u8 as i8).collect();
            let (ap, _, kp) = pack_a(&a, m, k);
            for (sc, sj) in [(1, k), (n, 1)] {
                let b = PackedB::pack(&w, k, n, sc, sj);
                let mut acc = vec![7i32; m * n];
                gemm_packed(engine, &ap, m, kp, &b, &mut acc);
                assert_eq!(acc, reference(&a, zero, m, k, &w, n, sc, sj), "{engine:?} m {m} k {k} n {n} sc {sc}");
            }
        }
    }

    /// The tiles' definition, with this module's packing and blocking, equals the scalar i32 sum bit for bit.
    #[test]
    fn emulated_tiles_equal_the_scalar_reference() {
        check(Engine::Emulated);
    }

    /// On an AMX machine, the tile instructions equal the same reference bit for bit (skipped elsewhere).
    #[test]
    fn amx_tiles_equal_the_scalar_reference() {
        if !granted() {
            eprintln!("skipped: no AMX-INT8 here ({})", crate::CpuFeatures::detect());
            return;
        }
        check(Engine::Amx);
    }
}
