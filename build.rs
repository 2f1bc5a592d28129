//! With the `cuda` feature, compiles qtune's own CUDA kernels (`kernels/*.cu`) to PTX with nvcc
//! (`scripts/setup_cuda.sh` installs it; no GPU needed), into OUT_DIR, where `device::cuda` embeds them. PTX for
//! compute capability $CUDA_COMPUTE_CAP (default 80: the driver compiles it for any newer GPU when it loads it).
//! Without the feature this does nothing, so a CPU build needs no CUDA toolkit.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["rng", "quant"] {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            // No contraction into fused multiply-adds beyond those the kernels write out (__fmaf_rn): the kernels
            // repeat the CPU's arithmetic operation by operation.
            .args(["--ptx", "-O3", "-std=c++17", "--fmad=false", &format!("-arch=compute_{cap}"), &src, "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("{nvcc}: {e} (the cuda feature needs nvcc: bash scripts/setup_cuda.sh)"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
