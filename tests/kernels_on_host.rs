//! qtune's CUDA kernels' arithmetic checked on a machine without a GPU: `kernels/rng.cu`'s device functions,
//! compiled as host C++ by g++ (`kernels/host/`: the CUDA intrinsics as plain IEEE operations, no contraction into
//! fused multiply-adds), must draw qtune-quant's CPU streams bit for bit: uniforms and Gaussians, at offsets that
//! cross a block, the 2³² boundary of the block counter, and every lane. Skipped, saying so, where g++ is missing;
//! on a GPU `tests/gpu.rs` checks the kernels themselves.
use qtune::quant::rng::{gaussian, uniform, RngKey};
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn rng_kernel_draws_the_cpu_streams_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("qtune-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("rng_dump");
    let built = Command::new("g++")
        .args(["-O2", "-ffp-contract=off", "-std=c++17", "kernels/host/rng_dump.cpp", "-o"])
        .arg(&exe)
        .status();
    match built {
        Err(e) => return eprintln!("skipped: no g++ ({e})"),
        Ok(s) => assert!(s.success(), "g++ failed on kernels/host/rng_dump.cpp"),
    }
    let cases: [(u64, u32, u32, u64, u64); 4] = [
        (0xdead_beef_1234, 11, 4, 0, 100_003),
        (1, 0, 0, 3, 4097),
        (u64::MAX, u32::MAX, 7, (1u64 << 34) - 5, 1000),
        (42, 3, 1, 1 << 40, 1000),
    ];
    let mut child = Command::new(&exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (seed, tensor, stream, start, n) in cases {
        writeln!(stdin, "{seed} {tensor} {stream} {start} {n}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let mut checked = 0usize;
    for (seed, tensor, stream, start, n) in cases {
        let key = RngKey::new(seed, tensor, stream);
        for i in start..start + n {
            let line = lines.next().expect("one line per element");
            let mut f = line.split(' ').map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()));
            let (u, g) = (f.next().unwrap(), f.next().unwrap());
            assert_eq!(u.to_bits(), uniform(&key, i).to_bits(), "uniform {i} of key {key:?}");
            assert_eq!(g.to_bits(), gaussian(&key, i).to_bits(), "gaussian {i} of key {key:?}: {g} vs the CPU's");
            checked += 1;
        }
    }
    eprintln!("{checked} elements equal bit for bit");
    let _ = std::fs::remove_dir_all(&dir);
}
