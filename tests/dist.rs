//! Data parallelism end to end (the `mpi` feature; `cargo test --features mpi --test dist`, with Open MPI's
//! `mpirun` on the PATH: `scripts/setup_mpi.sh`). Each test runs the `qtune` binary under `mpirun -np 2` (two ranks
//! oversubscribing the cores) against one process training the same step with the same micro-batches, on the tiny
//! fixture model:
//! - every method: the same exported weights, bit for bit, except QFT (within a stated tolerance: each rank's
//!   gradient is rounded to INT8 once more before the sum); the bytes sent per step are what the method promises;
//! - a rank that dies ends the run with an error naming it, and the last checkpoint resumes on one rank or two;
//! - a run across two network namespaces joined by a veth pair (two hosts with their own addresses), when this
//!   machine lets the test make them (root), else skipped with the reason printed.
#![cfg(feature = "mpi")]
use std::path::Path;
use std::process::{Command, Output};

const TINY: &str = "tests/fixtures/tiny_llama";

mod common;
use common::lm_data as data;

/// `qtune train` on the lm data: `steps` steps of 2 micro-batches of 2 rows, written to `out`.
fn train_args(data: &Path, out: &Path, method: &[&str], steps: usize) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--model", TINY, "--task", "lm", "--data"].map(String::from).to_vec();
    a.push(data.display().to_string());
    a.extend(
        ["--train-size", "12", "--dev-size", "4", "--eval-size", "4", "--max-seq-len", "32", "--lr", "1e-3"]
            .map(String::from),
    );
    a.extend(["--batch-size", "2", "--grad-accum", "2", "--export", "hf", "--steps"].map(String::from));
    a.push(steps.to_string());
    a.extend(method.iter().map(|s| s.to_string()));
    a.push("--out".into());
    a.push(out.display().to_string());
    a
}

fn mpi_env(c: &mut Command) -> &mut Command {
    // Root in containers and CI; two ranks on however many cores there are.
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}

fn one(args: &[String], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qtune")).args(args).envs(env.iter().copied()).output().unwrap()
}

fn two(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("mpirun");
    mpi_env(&mut c).args(["-np", "2", "--oversubscribe", env!("CARGO_BIN_EXE_qtune")]).args(args);
    c.envs(env.iter().copied()).output().expect("mpirun on the PATH (scripts/setup_mpi.sh installs Open MPI)")
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// The exported weight files of a run, by name.
fn weights(run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(run.join("model"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} exported no weights", run.display());
    files.iter().map(|p| (p.file_name().unwrap().to_string_lossy().into(), std::fs::read(p).unwrap())).collect()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// Every tensor of two safetensors files, as f32 vectors by name.
fn tensors(bytes: &[u8]) -> Vec<(String, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Two ranks with one micro-batch each against one process with both: the same weights, bit for bit, for every
/// method but QFT; each rank sends what the method promises per step: zeroth-order 8 bytes (two f32 losses of its
/// micro-batch), FP32 first-order 4 bytes per trainable parameter (LoRA, QLoRA and QST: only the trained ones).
#[test]
fn two_ranks_train_exactly_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let methods: &[&[&str]] = &[
        &["--method", "full-adamw"],
        &["--method", "full-lion"],
        &["--method", "qat"],
        &["--method", "lora"],
        &["--method", "qlora"],
        &["--method", "qst"],
        &["--method", "mezo"],
        &["--method", "mezo", "--lora", "--directions", "2"],
        &["--method", "quzo"],
        &["--method", "quzo", "--bits", "4", "--lora"],
    ];
    for (i, m) in methods.iter().enumerate() {
        let (a, b) = (dir.path().join(format!("one{i}")), dir.path().join(format!("two{i}")));
        ok(&one(&train_args(&d, &a, m, 3), &[]), &format!("{m:?}, one process"));
        ok(&two(&train_args(&d, &b, m, 3), &[]), &format!("{m:?}, two ranks"));
        assert!(weights(&a) == weights(&b), "{m:?}: two ranks trained other weights than one process");
        let s = summary(&b);
        assert_eq!(s["ranks"], 2, "{m:?}");
        assert!(s["state_hash"].is_string(), "{m:?}: no state hash in the summary");
        let sent = s["sent_bytes_per_step"].as_f64().unwrap();
        let zo = m[1] == "mezo" || m[1] == "quzo";
        let directions = if m.contains(&"--directions") { 2.0 } else { 1.0 };
        // First-order: + 4 bytes for the micro-batch's loss, + 8 for the count of gradient tensors each rank checks
        // the others agree on.
        let expected = if zo { 8.0 * directions } else { 4.0 * s["trainable_params"].as_f64().unwrap() + 12.0 };
        assert_eq!(sent, expected, "{m:?}: bytes sent per step");
    }
    // Buckets of 1000 elements: the embedding (16384) goes in slices, the norms (64) share buckets, the MLP
    // matrices (10240) fill one each; the sums are elementwise, so the bits cannot change.
    let b = dir.path().join("small-buckets");
    ok(&two(&train_args(&d, &b, &["--method", "full-adamw"], 3), &[("QTUNE_DIST_BUCKET", "1000")]), "small buckets");
    assert!(weights(&dir.path().join("one0")) == weights(&b), "buckets of 1000 elements changed the result");
}

/// QFT sends its INT8 gradient blocks with their scales, about a quarter of the f32 bytes, and each rank's
/// gradient is rounded to INT8 (stochastically) once more before the sum, where one process adds the second
/// micro-batch's f32 gradient to the first's codes. So the weights differ by rounding noise: Lion steps by
/// ±lr·sign, and an entry whose momentum is near zero may take the other sign. Budget: under 5% of the entries
/// differ, and the difference is under 30% of the update's norm in every tensor (measured: 1-2% and 11-17%).
#[test]
fn qft_on_two_ranks_sends_a_quarter_and_stays_within_rounding_noise() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    ok(&one(&train_args(&d, &a, &["--method", "qft"], 3), &[]), "qft, one process");
    ok(&two(&train_args(&d, &b, &["--method", "qft"], 3), &[]), "qft, two ranks");
    let s = summary(&b);
    let f32_bytes = 4.0 * s["trainable_params"].as_f64().unwrap();
    let sent = s["sent_bytes_per_step"].as_f64().unwrap();
    assert!(sent < 0.27 * f32_bytes && sent > 0.25 * f32_bytes, "QFT sent {sent} bytes against {f32_bytes} in f32");
    let base = tensors(&std::fs::read(Path::new(TINY).join("model.safetensors")).unwrap());
    let (wa, wb) = (weights(&a), weights(&b));
    let (ta, tb) = (tensors(&wa[0].1), tensors(&wb[0].1));
    let (mut differ, mut total) = (0usize, 0usize);
    for (((name, x), (_, y)), (_, w0)) in ta.iter().zip(&tb).zip(&base) {
        let norm = |v: Vec<f32>| v.iter().map(|&e| (e as f64).powi(2)).sum::<f64>().sqrt();
        let update = norm(x.iter().zip(w0).map(|(a, b)| a - b).collect());
        let diff = norm(x.iter().zip(y).map(|(a, b)| a - b).collect());
        assert!(diff <= 0.3 * update, "{name}: two ranks differ by {diff}, the update is {update}");
        differ += x.iter().zip(y).filter(|(a, b)| a != b).count();
        total += x.len();
    }
    assert!((differ as f64) < 0.05 * total as f64, "{differ} of {total} entries differ");
}

/// A step's micro-batches must split evenly; QFT's fused variant cannot sum over ranks.
#[test]
fn impossible_splits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let mut args = train_args(&d, &dir.path().join("r"), &["--method", "mezo"], 2);
    let at = args.iter().position(|a| a == "--grad-accum").unwrap();
    args[at + 1] = "3".into();
    let o = two(&args, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--grad-accum 3 cannot be split evenly over 2 ranks"), "{err}");
    let args = train_args(&d, &dir.path().join("f"), &["--method", "qft", "--fused", "--clip", "0"], 2);
    let o = two(&args, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--fused"), "{err}");
}

/// A rank that dies (aborts after its third step: the checkpoint of step 2 is written, the one of step 4 is not) ends the
/// run on every rank, and mpirun names it; the checkpoint left behind is valid and resumes on one process to the
/// weights an uninterrupted run ends with. The other way round too: a one-process run that dies resumes on two
/// ranks to the same weights.
#[test]
fn a_dead_rank_ends_the_run_and_its_checkpoint_resumes_on_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    for m in [&["--method", "mezo"][..], &["--method", "full-adamw"][..]] {
        let run = |name: &str| {
            let mut a = train_args(&d, &dir.path().join(format!("{}{name}", m[1])), m, 6);
            a.extend(["--checkpoint-every", "2"].map(String::from));
            a
        };
        let whole = dir.path().join(format!("{}whole", m[1]));
        ok(&one(&run("whole"), &[]), "uninterrupted");

        let o = two(&run("a"), &[("QTUNE_DIE", "1:2")]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{m:?}: the run went on after rank 1 died");
        assert!(err.contains("process rank 1"), "{m:?}: mpirun did not name the dead rank:\n{err}");
        let mut resume = run("a");
        resume.push("--resume".into());
        let r = one(&resume, &[]);
        ok(&r, "resume on one process");
        assert!(String::from_utf8_lossy(&r.stderr).contains("at step 2"), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(weights(&whole) == weights(&dir.path().join(format!("{}a", m[1]))), "{m:?}: 2 ranks → 1");

        let o = one(&run("b"), &[("QTUNE_DIE", "0:4")]);
        assert!(!o.status.success());
        let mut resume = run("b");
        resume.push("--resume".into());
        ok(&two(&resume, &[]), "resume on two ranks");
        assert!(weights(&whole) == weights(&dir.path().join(format!("{}b", m[1]))), "{m:?}: 1 → 2 ranks");
    }
}

/// Network namespaces and a veth pair, removed on drop.
struct Hosts {
    ns: [String; 2],
}

impl Hosts {
    const ADDR: [&'static str; 2] = ["10.77.0.1", "10.77.0.2"];

    fn make() -> Result<Hosts, String> {
        let id = std::process::id() % 100_000;
        let h = Hosts { ns: [format!("qtune{id}a"), format!("qtune{id}b")] };
        let (va, vb) = (format!("qv{id}a"), format!("qv{id}b"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let o = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
        };
        ip(&["netns", "add", &h.ns[0]])?;
        ip(&["netns", "add", &h.ns[1]])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (k, v) in [&va, &vb].into_iter().enumerate() {
            ip(&["link", "set", v, "netns", &h.ns[k]])?;
            ip(&["-n", &h.ns[k], "addr", "add", &format!("{}/24", Self::ADDR[k]), "dev", v])?;
            ip(&["-n", &h.ns[k], "link", "set", v, "up"])?;
            ip(&["-n", &h.ns[k], "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    /// Brings host 0's end of the veth pair down or up.
    fn link(&self, up: bool) {
        let o = Command::new("ip").args(["-n", &self.ns[0], "-j", "link", "show"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let veth = v.as_array().unwrap().iter().find(|l| l["ifname"].as_str().unwrap().starts_with("qv")).unwrap();
        let name = veth["ifname"].as_str().unwrap();
        let state = if up { "up" } else { "down" };
        assert!(Command::new("ip").args(["-n", &self.ns[0], "link", "set", name, state]).status().unwrap().success());
    }

    /// Bytes host 0's end of the veth pair has sent.
    fn sent(&self) -> u64 {
        let o = Command::new("ip").args(["-n", &self.ns[0], "-s", "-j", "link", "show"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let veth = v.as_array().unwrap().iter().find(|l| l["ifname"].as_str().unwrap().starts_with("qv")).unwrap();
        veth["stats64"]["tx"]["bytes"].as_u64().unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Two hosts with their own network addresses: mpirun in the first namespace starts rank 1 in the second through
/// an rsh agent (`ip netns exec` where a cluster would use ssh), and the ranks talk over the veth pair only (TCP,
/// restricted to its subnet). The weights equal one process's, and the veth carried at least the gradients. Then
/// the network is cut in mid-run: every rank ends with an error naming it, and the last checkpoint resumes.
#[test]
fn two_hosts_joined_by_a_veth_pair() {
    let hosts = match Hosts::make() {
        Ok(h) => h,
        Err(why) => {
            eprintln!(
                "skipped: cannot make two network namespaces here ({why}); this test needs root with CAP_NET_ADMIN"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let agent = dir.path().join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\n# mpirun's rsh agent: [options] HOST COMMAND: run COMMAND in the namespace of HOST.\n\
             while [ \"${{1#-}}\" != \"$1\" ]; do shift; done\nhost=$1; shift\n\
             case $host in {a}) ns={na} ;; {b}) ns={nb} ;; *) echo \"agent: unknown host $host\" >&2; exit 1 ;; esac\n\
             exec ip netns exec $ns sh -c \"$*\"\n",
            a = Hosts::ADDR[0],
            b = Hosts::ADDR[1],
            na = hosts.ns[0],
            nb = hosts.ns[1]
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    let m = ["--method", "full-adamw"];
    ok(&one(&train_args(&d, &a, &m, 3), &[]), "one process");
    let before = hosts.sent();
    let mpirun = |args: Vec<String>| {
        let subnet = "10.77.0.0/24";
        let mut c = Command::new("ip");
        mpi_env(&mut c).args(["netns", "exec", &hosts.ns[0], "mpirun", "-np", "2", "--host"]);
        c.arg(format!("{}:1,{}:1", Hosts::ADDR[0], Hosts::ADDR[1]));
        c.args(["--mca", "plm_rsh_agent"]).arg(&agent);
        c.args(["--mca", "oob_tcp_if_include", subnet, "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include"]);
        c.arg(subnet).arg(env!("CARGO_BIN_EXE_qtune")).args(args);
        c
    };
    ok(&mpirun(train_args(&d, &b, &m, 3)).output().unwrap(), "two hosts");
    assert!(weights(&a) == weights(&b), "two hosts trained other weights than one process");
    let s = summary(&b);
    let gradients = 3.0 * s["sent_bytes_per_step"].as_f64().unwrap();
    let on_wire = (hosts.sent() - before) as f64;
    assert!(on_wire >= gradients, "the veth carried {on_wire} bytes, less than the {gradients} of gradients");

    // The network between the hosts is cut in mid-run: each rank's collective waits --dist-timeout (5 s) and the
    // rank ends with an error naming it (rank 0's reaches us at once; rank 1's only once the link is back). (mpirun itself cannot reach the other host's daemon until the link is
    // back; its TCP keepalive would take minutes, so the test brings the link up once both ranks are gone.)
    let cut = dir.path().join("cut");
    let mut args = train_args(&d, &cut, &m, 1_000_000);
    // A checkpoint every step: the cut may come while the ranks wait for rank 0 to write one.
    args.extend(["--dist-timeout", "5", "--checkpoint-every", "1"].map(String::from));
    let log = std::fs::File::create(dir.path().join("cut.err")).unwrap();
    let mut child = mpirun(args).stdout(std::process::Stdio::null()).stderr(log).spawn().unwrap();
    let lines = || std::fs::read_to_string(cut.join("log.jsonl")).map_or(0, |t| t.lines().count());
    let t0 = std::time::Instant::now();
    while lines() < 10 {
        assert!(t0.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    hosts.link(false);
    // Both ranks' processes (command lines starting with the binary) must end within the timeout and a margin.
    let ranks_alive = || {
        let pat = format!("^{} train .*{}", env!("CARGO_BIN_EXE_qtune"), cut.display());
        Command::new("pgrep").args(["-f", &pat]).output().unwrap().stdout.iter().filter(|&&c| c == b'\n').count()
    };
    let t1 = std::time::Instant::now();
    while ranks_alive() > 0 {
        assert!(t1.elapsed().as_secs() < 60, "a rank still runs 60 s after the network was cut");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    hosts.link(true);
    assert!(!child.wait().unwrap().success(), "mpirun reported success after the cut");
    let err = std::fs::read_to_string(dir.path().join("cut.err")).unwrap();
    let msg = "error on rank 0 of 2: no answer from the other ranks for 5 s";
    assert!(err.contains(msg), "`{msg}` missing from:\n{err}");
    // The checkpoint left behind resumes (on one process), 5 steps on.
    let mut resume = train_args(&d, &cut, &m, lines() + 5);
    resume.push("--resume".into());
    ok(&one(&resume, &[]), "resume after the cut");
}

/// Evaluation is shared out: each rank scores every second batch and the ranks combine counts, losses and answers.
/// Every example's answer and loss equals one process's (the batches are the same, only on other ranks), and so do
/// the accuracies and the mean losses (the batches' losses are added in the split's order, as one process adds them).
#[test]
fn two_ranks_share_the_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::choice_data(dir.path(), 24);
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--model", TINY, "--task", "choice", "--data"].map(String::from).to_vec();
        a.push(data.display().to_string());
        a.extend(
            ["--train-size", "8", "--dev-size", "7", "--eval-size", "9", "--eval-batch-size", "2"].map(String::from),
        );
        a.extend(
            ["--method", "lora", "--steps", "2", "--batch-size", "2", "--grad-accum", "2", "--out"].map(String::from),
        );
        a.push(out.display().to_string());
        a
    };
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    ok(&one(&args(&a), &[]), "one process");
    ok(&two(&args(&b), &[]), "two ranks");
    let read = |p: &Path| std::fs::read_to_string(p.join("predictions.jsonl")).unwrap();
    assert_eq!(read(&a), read(&b), "the answers differ");
    assert_eq!(read(&b).lines().count(), 7 + 9);
    let (sa, sb) = (summary(&a), summary(&b));
    for k in
        ["dev_accuracy_before", "dev_accuracy_after", "eval_accuracy", "eval_acc_norm", "dev_loss_after", "eval_loss"]
    {
        assert_eq!(sa[k], sb[k], "{k}");
    }
}

/// Ctrl-C reaching one rank only (here SIGINT to rank 1's process) stops every rank after the same step: the ranks
/// agree on the flag each step, rank 0 checkpoints, every rank ends without aborting, and the checkpoint resumes on
/// one process to the weights of an uninterrupted run.
#[test]
fn an_interrupt_on_one_rank_stops_all_at_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    // A constant learning rate: the interrupted run's --steps (a million) must not change the schedule.
    let m = ["--method", "full-adamw", "--schedule", "constant"];
    let run = dir.path().join("int");
    let mut child = {
        let mut c = Command::new("mpirun");
        mpi_env(&mut c).args(["-np", "2", "--oversubscribe", env!("CARGO_BIN_EXE_qtune")]);
        c.args(train_args(&d, &run, &m, 1_000_000)).stdout(std::process::Stdio::null());
        c.stderr(std::fs::File::create(dir.path().join("int.err")).unwrap()).spawn().unwrap()
    };
    let lines = || std::fs::read_to_string(run.join("log.jsonl")).map_or(0, |t| t.lines().count());
    let t0 = std::time::Instant::now();
    while lines() < 5 {
        assert!(t0.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Rank 1: the process of this run whose environment says so.
    let rank1 = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            has(&cmd, run.to_str().unwrap().as_bytes()) && has(&cmd, b"train") && has(&env, b"OMPI_COMM_WORLD_RANK=1\0")
        })
        .expect("rank 1's process");
    assert!(Command::new("kill").args(["-INT", &rank1.to_string()]).status().unwrap().success());
    assert!(!child.wait().unwrap().success(), "an interrupted run reports failure");
    let err = std::fs::read_to_string(dir.path().join("int.err")).unwrap();
    // Rank 0 says so, once; no rank aborts (they stopped at the same step and finalise MPI as usual).
    assert_eq!(err.matches("interrupted after step").count(), 1, "{err}");
    assert!(!err.contains("MPI_ABORT"), "{err}");
    let steps = lines();
    let mut resume = train_args(&d, &run, &m, steps + 2);
    resume.push("--resume".into());
    let r = one(&resume, &[]);
    ok(&r, "resume");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains(&format!("at step {steps}")),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let whole = dir.path().join("whole");
    ok(&one(&train_args(&d, &whole, &m, steps + 2), &[]), "uninterrupted");
    assert!(weights(&whole) == weights(&run), "the resumed run differs from an uninterrupted one");
}
