//! Data parallelism across processes: the [`Collective`] interface the training loops call, the process's world
//! ([`world`]), and the few reductions built on it.
//!
//! One world per process, as MPI has it: `main` calls [`init`] once, which joins MPI's world when the process was
//! started by `mpirun` (and the binary was built with the `mpi` feature) or stays a world of one. The loops read it
//! through [`world`] rather than through an argument, since no method may ever talk to a second one.
//!
//! Every reduction is an all-gather followed by a sum in rank order, on every rank: the result is the same bits on
//! every rank and in every run, whatever algorithm the MPI library picks for its own reductions (MPI's MPI_SUM on
//! floats may associate differently from one rank, size or library version to the next). A ring all-gather sends
//! (N − 1)·S bytes per rank against 2(N − 1)/N·S for a ring all-reduce: the same at N = 2, twice as much at large N.
//! [`sent_bytes`] counts what this rank sends, (N − 1)·S per all-gather of S bytes.
//!
//! The data split: a step draws its `--grad-accum` micro-batches as one process would; rank r of N runs micro-batches
//! r·G/N .. (r+1)·G/N ([`my_micro_batches`]), so every N trains on the same batches and a checkpoint resumes on any
//! N that divides G. The zeroth-order methods then give the same bits on any N; the first-order ones when each rank
//! runs one micro-batch (else the gradient's float sum is associated differently).
#[cfg(feature = "mpi")]
mod mpi;

use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The collective operations data parallelism needs. Implemented by MPI ([`init`]) and by the world of one; a GPU
/// backend (NCCL) would implement the same.
pub trait Collective: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `send` (the same length on every rank), concatenated in rank order into `recv` (ranks × the
    /// length of `send`).
    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// Waits for every rank.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank's process (after this one printed why).
    fn abort(&self, code: i32) -> !;
}

/// A world of one process.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();
static SENT: AtomicU64 = AtomicU64::new(0);
/// When the collective in progress began (ms after [`START`], plus one; 0: none), for the watchdog.
static BUSY_SINCE: AtomicU64 = AtomicU64::new(0);
static START: OnceLock<std::time::Instant> = OnceLock::new();

/// Options of data-parallel runs (read by `crate::dist` alone).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "Several ranks (mpirun)")]
pub struct DistArgs {
    /// End the run when a collective has waited this many seconds for the other ranks: one of them died without
    /// mpirun noticing, or cannot be reached (a cut network would otherwise hang every rank for TCP's timeouts).
    /// Must exceed the time rank 0 takes to write a checkpoint (the others wait for it). 0: wait for ever.
    #[arg(long, default_value_t = 600)]
    pub dist_timeout: u64,
}
crate::options::defaults_from_clap!(DistArgs);

/// Milliseconds on a monotonic clock, from 1.
fn now_ms() -> u64 {
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

/// Runs the collective `f` under the watchdog's eye.
fn watched<T>(f: impl FnOnce() -> T) -> T {
    BUSY_SINCE.store(now_ms(), Ordering::Relaxed);
    let r = f();
    BUSY_SINCE.store(0, Ordering::Relaxed);
    r
}

/// Starts the watchdog of `args.dist_timeout` (with several ranks): a thread that ends this process, naming its
/// rank, when one collective has waited longer. mpirun then ends the other ranks it can reach; those it cannot reach
/// end by their own watchdogs.
pub fn watch(args: &DistArgs) {
    let w = world();
    if w.size() == 1 || args.dist_timeout == 0 {
        return;
    }
    let (limit, rank, size) = (args.dist_timeout * 1000, w.rank(), w.size());
    now_ms();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let since = BUSY_SINCE.load(Ordering::Relaxed);
        if since != 0 && now_ms().saturating_sub(since) > limit {
            eprintln!(
                "error on rank {rank} of {size}: no answer from the other ranks for {} s (--dist-timeout): one of them \
                 died or cannot be reached; ending the run (the last checkpoint stays valid: continue with --resume)",
                limit / 1000
            );
            // At once, without exit handlers: the main thread is inside MPI, whose own handlers could wait on the
            // network that is gone.
            unsafe { libc::_exit(1) };
        }
    });
}

/// The process's world: MPI's after [`init`] joined it, else a world of one.
pub fn world() -> &'static dyn Collective {
    WORLD.get_or_init(|| Box::new(Single)).as_ref()
}

/// Bytes this rank has sent through the collectives so far.
pub fn sent_bytes() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// Keeps MPI initialised while it lives (dropping it finalises MPI).
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<::mpi::environment::Universe>,
}

/// The number of processes `mpirun` (Open MPI, or a PMI launcher) says it started, if it started this one.
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"].iter().find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// This process's index among the ranks on its machine, as the launcher says (Open MPI, MPICH/PMI, Slurm); 0 when
/// it was not started by one. `get` reads an environment variable.
pub fn local_rank_from(get: impl Fn(&str) -> Option<String>) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| get(k)?.trim().parse().ok())
        .unwrap_or(0)
}

/// [`local_rank_from`] of this process's environment (`--device cuda` gives each rank the GPU of this index).
pub fn local_rank() -> usize {
    local_rank_from(|k| std::env::var(k).ok())
}

/// Joins the world this process was started in. Call once, first thing in `main`, before any thread pool starts:
/// with several ranks on one machine it gives each rank its share of the cores (`RAYON_NUM_THREADS`, unless set).
pub fn init() -> Result<Guard> {
    let Some(n) = launched_size().filter(|&n| n > 1) else {
        return Ok(Guard {
            #[cfg(feature = "mpi")]
            _universe: None,
        });
    };
    #[cfg(feature = "mpi")]
    {
        let local = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|s| s.parse::<usize>().ok()).unwrap_or(n);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            std::env::set_var("RAYON_NUM_THREADS", (cores / local.max(1)).max(1).to_string());
        }
        let (universe, comm) = mpi::Mpi::init()?;
        if comm.size() != n {
            return Err(Error::Msg(format!("mpirun started {n} processes but MPI's world has {}", comm.size())));
        }
        WORLD.set(Box::new(comm)).map_err(|_| Error::Msg("dist::init called twice".into()))?;
        abort_on_panic();
        Ok(Guard { _universe: Some(universe) })
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::Option(format!(
        "started by mpirun as one of {n} processes, but this qtune was built without MPI: \
         cargo build --release --features mpi (scripts/setup_mpi.sh installs what it needs)"
    )))
}

/// Waits for every rank, under the watchdog.
pub fn barrier() -> Result<()> {
    watched(|| world().barrier())
}

/// Waits for every rank while rank 0 writes a file, under the watchdog like any collective: a network cut while
/// rank 0 writes a checkpoint must not hang the others (so `--dist-timeout` must exceed a checkpoint's writing time).
pub fn wait_for_root() -> Result<()> {
    barrier()
}

/// Whether `flag` is set on any rank (one byte each).
pub fn any(flag: bool) -> Result<bool> {
    if world().size() == 1 {
        return Ok(flag);
    }
    Ok(gather_bytes(&[flag as u8])?.iter().any(|&b| b != 0))
}

/// With several ranks, a panic on one rank ends them all (MPI_Abort) instead of leaving the others waiting in a
/// collective. Call once after [`init`].
pub fn abort_on_panic() {
    if world().size() == 1 {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let w = world();
        eprintln!("error on rank {} of {}: panicked; ending every rank", w.rank(), w.size());
        w.abort(101);
    }));
}

/// Every rank sees rank 0's files in `dir` (checkpoints and the best state are written by rank 0 and read by all):
/// rank 0 writes a token there, and a rank that cannot read it back fails now rather than at the end of the run.
pub fn check_shared_dir(dir: &std::path::Path) -> Result<()> {
    let w = world();
    if w.size() == 1 {
        return Ok(());
    }
    let probe = dir.join(".ranks-probe");
    let token = format!("{}", std::process::id() as u64 * 1_000_003 + now_ms());
    let token = String::from_utf8(gather_varied(if w.rank() == 0 { token.as_bytes() } else { b"" })?.remove(0))
        .map_err(|e| Error::Msg(e.to_string()))?;
    if w.rank() == 0 {
        std::fs::write(&probe, &token).map_err(|e| Error::file(&probe, format!("cannot write: {e}")))?;
    }
    barrier()?;
    let seen = std::fs::read_to_string(&probe).ok();
    let missing = any(seen.as_deref() != Some(token.as_str()))?;
    barrier()?;
    if w.rank() == 0 {
        let _ = std::fs::remove_file(&probe);
    }
    if missing {
        return Err(Error::file(
            dir,
            "some rank cannot see rank 0's files here: a data-parallel run needs --out on a filesystem every rank \
             shares (checkpoints and the best state are written by rank 0 and read by all)",
        ));
    }
    Ok(())
}

/// Whether this rank writes the run's files (logs, checkpoints, exports, summaries).
pub fn is_root() -> bool {
    world().rank() == 0
}

/// The micro-batches of a step of `total` this rank runs: a contiguous share, the same size on every rank.
pub fn my_micro_batches(total: usize) -> Result<std::ops::Range<usize>> {
    let w = world();
    let (r, n) = (w.rank(), w.size());
    if !total.is_multiple_of(n) {
        return Err(Error::Option(format!(
            "--grad-accum {total} cannot be split evenly over {n} ranks: give a multiple of {n} \
             (each rank runs --grad-accum / ranks micro-batches of --batch-size rows)"
        )));
    }
    let per = total / n;
    Ok(r * per..(r + 1) * per)
}

/// Every rank's `send` (the same length everywhere), concatenated in rank order: ranks × `send.len()` values.
pub fn gather_f32(send: &[f32]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; send.len() * world().size()];
    // f32 has no padding and every byte pattern is some u8: the slices are viewed as bytes without a copy.
    let (s, r) = unsafe {
        (
            std::slice::from_raw_parts(send.as_ptr().cast::<u8>(), send.len() * 4),
            std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 4),
        )
    };
    gather_into(s, r)?;
    // Bytes travel in the machine's order; every rank of a run is the same architecture (x86_64, little-endian).
    Ok(out)
}

/// Every rank's bytes, concatenated in rank order.
pub fn gather_bytes(send: &[u8]) -> Result<Vec<u8>> {
    let mut out = vec![0u8; send.len() * world().size()];
    gather_into(send, &mut out)?;
    Ok(out)
}

/// [`Collective::all_gather`] in pieces MPI's 32-bit counts can carry, counted in [`sent_bytes`].
fn gather_into(send: &[u8], recv: &mut [u8]) -> Result<()> {
    let w = world();
    let n = w.size();
    if n == 1 {
        recv.copy_from_slice(send);
        return Ok(());
    }
    SENT.fetch_add(((n - 1) * send.len()) as u64, Ordering::Relaxed);
    watched(|| gather_pieces(w, send, recv))
}

fn gather_pieces(w: &dyn Collective, send: &[u8], recv: &mut [u8]) -> Result<()> {
    let n = w.size();
    // MPI counts are i32, the receive buffer's too: ranks × piece stays below 2³¹ bytes.
    let piece_len = (1usize << 28).min(i32::MAX as usize / n);
    if send.len() <= piece_len {
        return w.all_gather(send, recv);
    }
    let mut got = vec![0u8; piece_len * n];
    for (p, piece) in send.chunks(piece_len).enumerate() {
        let got = &mut got[..piece.len() * n];
        w.all_gather(piece, got)?;
        for (r, part) in got.chunks(piece.len()).enumerate() {
            let at = r * send.len() + p * piece_len;
            recv[at..at + piece.len()].copy_from_slice(part);
        }
    }
    Ok(())
}

/// `buf` ← Σ_r buf_r over the ranks, added in rank order ((buf_0 + buf_1) + buf_2 …): the same bits on every rank,
/// and what one process gets adding its micro-batches' gradients in turn.
pub fn sum_f32(buf: &mut [f32]) -> Result<()> {
    if world().size() == 1 {
        return Ok(());
    }
    let all = gather_f32(buf)?;
    let mut ranks = all.chunks_exact(buf.len());
    buf.copy_from_slice(ranks.next().expect("rank 0"));
    for r in ranks {
        buf.iter_mut().zip(r).for_each(|(b, x)| *b += x);
    }
    Ok(())
}

/// The mean of every rank's values in global order (rank 0's first), added as one process adds a step's micro-batch
/// losses: `Σ_k l_k / n` in f32, k ascending. With one rank it is the mean of `local`.
pub fn mean_in_order(local: &[f32]) -> Result<f32> {
    let all = gather_f32(local)?;
    let n = all.len() as f32;
    Ok(all.iter().fold(0f32, |acc, &l| acc + l / n))
}

/// `v` ← Σ_r v_r over the ranks, added in rank order.
pub fn sum_f64(v: &mut [f64]) -> Result<()> {
    if world().size() == 1 {
        return Ok(());
    }
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let all = gather_bytes(&bytes)?;
    v.iter_mut().for_each(|x| *x = 0.0);
    for rank in all.chunks_exact(bytes.len().max(1)) {
        for (x, b) in v.iter_mut().zip(rank.chunks_exact(8)) {
            *x += f64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
    }
    Ok(())
}

/// Every rank's bytes, of any length, one vector per rank in rank order (the lengths travel first).
pub fn gather_varied(send: &[u8]) -> Result<Vec<Vec<u8>>> {
    let lens = gather_u64(send.len() as u64)?;
    let max = *lens.iter().max().unwrap_or(&0) as usize;
    let mut padded = send.to_vec();
    padded.resize(max, 0);
    let all = gather_bytes(&padded)?;
    Ok(lens.iter().enumerate().map(|(r, &l)| all[r * max..r * max + l as usize].to_vec()).collect())
}

/// Each rank's `value`, in rank order (a hash, a count: to check the ranks agree).
pub fn gather_u64(value: u64) -> Result<Vec<u64>> {
    let all = gather_bytes(&value.to_le_bytes())?;
    Ok(all.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
}

/// Fails unless every rank holds the same `value` (named `what` in the error, with each rank's value).
pub fn check_agree(value: u64, what: &str) -> Result<()> {
    let all = gather_u64(value)?;
    if all.iter().all(|&v| v == all[0]) {
        return Ok(());
    }
    let each: Vec<String> = all.iter().enumerate().map(|(r, v)| format!("rank {r}: {v:016x}")).collect();
    Err(Error::Msg(format!("the ranks disagree on {what}: {}", each.join(", "))))
}

/// Fault injection for the tests of a rank's death: `QTUNE_DIE=RANK:STEP` makes rank RANK abort (as a crash would:
/// no cleanup, no MPI finalize) once step STEP (0-based) is done and checkpointed.
pub fn maybe_die(step: usize) {
    let Ok(spec) = std::env::var("QTUNE_DIE") else { return };
    let parsed = spec.split_once(':').and_then(|(r, s)| Some((r.parse::<usize>().ok()?, s.parse::<usize>().ok()?)));
    if parsed == Some((world().rank(), step)) {
        eprintln!("QTUNE_DIE={spec}: rank {} aborts after step {step}", world().rank());
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launchers' local-rank variables, in order of preference; 0 without any (or with garbage).
    #[test]
    fn local_rank_comes_from_the_launcher() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(local_rank_from(env(&[])), 0);
        assert_eq!(local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])), 3);
        assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", "2"), ("MPI_LOCALRANKID", "1")])), 1);
        assert_eq!(local_rank_from(env(&[("PMI_LOCAL_RANK", "x")])), 0);
    }

    /// In a world of one every reduction is the identity, and the mean is the one-process mean of the step's
    /// micro-batch losses (the zeroth-order loop's old `Σ l_k / n`, same bits).
    #[test]
    fn world_of_one_reductions_are_identities() {
        let mut v = vec![1.5f32, -2.0, 3.25];
        sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0, 3.25]);
        let l = [0.1f32, 0.7, 0.3];
        let old = l.iter().fold(0f32, |a, &x| a + x / 3.0);
        assert_eq!(mean_in_order(&l).unwrap().to_bits(), old.to_bits());
        assert_eq!(my_micro_batches(4).unwrap(), 0..4);
        check_agree(42, "a value").unwrap();
        assert_eq!(sent_bytes(), 0, "a world of one sends nothing");
    }
}
