//! Where the engine runs: the CPU, or a CUDA GPU when qtune is built with `--features cuda`
//! (`scripts/setup_cuda.sh` installs the compiler; no GPU is needed to build). The one `--device` option of every
//! command that runs a model is [`DeviceArgs`]; [`DeviceSpec::open`] turns it into candle's device, and
//! [`require_cpu`] is how a path that has no GPU kernels yet says so by name instead of running on the wrong device.
//! [`random`] is the first kernel with a twin on each device: the Philox streams (`cuda` holds the GPU launches).
//! `cuda_quant` holds the quantized formats on a GPU (INT8/INT4, NF4, QFT's hybrid weights and INT8 blocks) and
//! their kernels, each the CPU's arithmetic (checked on the host; not yet run on a GPU); `model::quantized_gpu` and
//! the methods' GPU ports build on them.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_quant;

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use qtune_quant::rng::{fill_gaussian, fill_uniform, RngKey};
use std::fmt;
use std::str::FromStr;

/// A device as the command line names it: `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// `cuda:N`: that GPU, in every process.
    Cuda(usize),
    /// `cuda`: the first GPU of a single process; under `mpirun`, each rank the GPU of its index on its machine
    /// (rank-to-GPU mapping: two ranks on a two-GPU machine use cuda:0 and cuda:1).
    CudaLocal,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::CudaLocal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("`{s}`: expected cpu, cuda or cuda:N (N a GPU's ordinal)")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::CudaLocal => write!(f, "cuda"),
        }
    }
}

/// Whether this binary has the CUDA backend (`--features cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// The spec naming `dev`.
    pub fn of(dev: &Device) -> Self {
        match dev.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceSpec::Cuda(gpu_id),
            _ => DeviceSpec::Cpu,
        }
    }

    /// Candle's device for this spec. A CUDA spec fails by name when the binary was built without CUDA or the GPU
    /// cannot be opened (no driver, no such ordinal).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::CudaLocal => {
                // A launcher that binds each rank to its own GPU (one visible per process) makes n % 1 = 0.
                let n = crate::dist::local_rank();
                let n = visible_gpus().filter(|&c| c > 0).map_or(n, |c| n % c);
                DeviceSpec::Cuda(n).open().map_err(|e| match e {
                    Error::Option(m) if n > 0 => Error::Option(format!(
                        "{m} (--device cuda under mpirun gives the machine's n-th rank GPU n, here {n}: start at most \
                         as many ranks per machine as it has GPUs, or name one with cuda:N)"
                    )),
                    e => e,
                })
            }
            DeviceSpec::Cuda(n) => {
                if !CUDA_BUILT {
                    return Err(Error::Option(format!(
                        "--device {self}: this qtune was built without CUDA; build it with \
                         `bash scripts/setup_cuda.sh && . .cuda/env.sh && cargo build --release --features cuda`"
                    )));
                }
                // candle's error carries a backtrace after its first line: the first line says why.
                Device::new_cuda(n).map_err(|e| {
                    let why = e.to_string().lines().next().unwrap_or("").to_string();
                    Error::Option(format!("--device {self}: cannot open the GPU: {why}"))
                })
            }
        }
    }
}

/// The `--device` option (train, eval, generate, bench, plan).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct DeviceArgs {
    /// Where the model, the batches and the method's state live: cpu, cuda (the first GPU) or cuda:N. CUDA needs a
    /// binary built with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}
crate::options::defaults_from_clap!(DeviceArgs);

/// The GPU's own name (`NVIDIA H100 80GB HBM3`), for reports; None on the CPU.
pub fn gpu_name(dev: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d.cuda_stream().context().name().ok();
    }
    let _ = dev;
    None
}

/// The device's name as reports print it: `cpu` or `cuda:N`.
pub fn name(dev: &Device) -> String {
    DeviceSpec::of(dev).to_string()
}

/// How many GPUs this process sees (None without CUDA, or when the driver cannot say).
fn visible_gpus() -> Option<usize> {
    #[cfg(feature = "cuda")]
    return candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().ok().map(|c| c as usize);
    #[cfg(not(feature = "cuda"))]
    None
}

/// The error of a GPU path reached in a binary built without CUDA (opening the device fails first, with the build
/// command; this names the device where a path is reached another way).
pub fn no_cuda(dev: &Device) -> Error {
    Error::Option(format!("--device {}: this qtune was built without CUDA", name(dev)))
}

/// Refuses a device other than the CPU: `what` names the path (a method, a quantized format) whose kernels exist on
/// the host only so far. Needs no GPU, so it is checked before one is opened.
pub fn require_cpu(spec: DeviceSpec, what: &str) -> Result<()> {
    if spec == DeviceSpec::Cpu {
        return Ok(());
    }
    Err(Error::Option(format!(
        "--device {spec}: {what} runs on the CPU only so far (its kernels have no CUDA version yet); use --device cpu"
    )))
}

/// What a random fill draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Draw {
    /// 24-bit uniforms in [0, 1): the same bits on every device.
    Uniform,
    /// Box–Muller normals of the same words: the same bits on every device (plain f32 arithmetic, qtune-quant's gauss.rs).
    Gaussian,
}

/// Elements `start ..` of the Philox stream `key` as an f32 tensor of `shape` on `dev`: on the CPU from
/// qtune-quant's fills, on a GPU from the same counters in a kernel (`kernels/rng.cu`), with no host round trip.
pub fn random(dev: &Device, key: &RngKey, start: u64, shape: &[usize], draw: Draw) -> Result<Tensor> {
    let n = shape.iter().product::<usize>();
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(cuda::philox_fill(d, key, start, n, draw)?.reshape(shape)?),
        _ => {
            let mut v = vec![0f32; n];
            match draw {
                Draw::Uniform => fill_uniform(key, start, &mut v),
                Draw::Gaussian => fill_gaussian(key, start, &mut v),
            }
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(dev)?)
        }
    }
}

/// `scale·x + Σ_k c_k·z_k` with z_k the Gaussian stream of `terms[k].0` (from element 0, x's shape): on a GPU in
/// one output buffer (`cuda::add_gaussians`); elsewhere through [`random`] (tests; the CPU's methods have their own
/// chunked loop).
pub fn add_gaussians(x: &Tensor, scale: f64, terms: &[(RngKey, f64)]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == candle_core::DType::F32 {
        let terms: Vec<(RngKey, f32)> = terms.iter().map(|&(k, c)| (k, c as f32)).collect();
        return cuda::add_gaussians(&x.contiguous()?, scale as f32, &terms);
    }
    let mut acc = (x * scale)?;
    for (key, coef) in terms {
        let z = random(x.device(), key, 0, x.dims(), Draw::Gaussian)?.to_dtype(x.dtype())?;
        acc = (acc + (z * *coef)?)?;
    }
    Ok(acc)
}

/// Free and total bytes of the GPU's memory (None on the CPU).
pub fn gpu_memory(dev: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = dev;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spellings the option accepts, and the ones it refuses with the expected form in the message.
    #[test]
    fn parses_cpu_cuda_and_ordinals() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::CudaLocal));
        assert_eq!(DeviceSpec::CudaLocal.to_string(), "cuda");
        assert_eq!("cuda:0".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!(DeviceArgs::default().device, DeviceSpec::Cpu);
    }

    /// Without the `cuda` feature, a CUDA device is refused by name with the build command; with it and no GPU
    /// (CI), opening fails with candle's reason instead of a panic.
    #[test]
    fn cuda_is_refused_by_name_when_unavailable() {
        match DeviceSpec::Cuda(0).open() {
            Ok(d) => assert!(CUDA_BUILT && !d.is_cpu()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("invalid option: --device cuda:0: "), "{msg}");
                assert!(CUDA_BUILT || msg.contains("--features cuda"), "{msg}");
            }
        }
        assert!(require_cpu(DeviceSpec::Cpu, "qft").is_ok());
        let e = require_cpu(DeviceSpec::Cuda(1), "qft").unwrap_err().to_string();
        assert!(e.contains("--device cuda:1: qft runs on the CPU only so far"), "{e}");
        assert_eq!(DeviceSpec::of(&Device::Cpu), DeviceSpec::Cpu);
    }

    /// On the CPU, `random` is qtune-quant's element-wise stream exactly (the GPU's twin is checked by tests/gpu.rs).
    #[test]
    fn random_on_the_cpu_is_the_elementwise_stream() {
        let key = RngKey::new(0x1234_5678_9abc, 7, 3);
        for (draw, f) in [
            (Draw::Uniform, qtune_quant::rng::uniform as fn(&RngKey, u64) -> f32),
            (Draw::Gaussian, qtune_quant::rng::gaussian),
        ] {
            let t = random(&Device::Cpu, &key, 5, &[3, 7], draw).unwrap();
            assert_eq!(t.dims(), &[3, 7]);
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want: Vec<f32> = (0..21).map(|j| f(&key, 5 + j)).collect();
            assert_eq!(got, want, "{draw:?}");
        }
    }
}
