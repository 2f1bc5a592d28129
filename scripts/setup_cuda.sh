#!/usr/bin/env bash
# Installs what `cargo build --release --features cuda` needs on a machine with no GPU and no CUDA toolkit, from
# the registries this project reaches (PyPI), into .cuda/ (or $QTUNE_CUDA_DIR), and writes .cuda/env.sh:
#   bash scripts/setup_cuda.sh && . .cuda/env.sh && cargo build --release --features cuda --target-dir target/cuda
#
# - The CUDA 13.0 compiler (nvcc, cicc, ptxas), its headers and the CUDA runtime from NVIDIA's wheels. 13.0 because
#   the device machines' driver (580) is CUDA 13.0: the driver compiles the PTX that candle's and qtune's kernels ship
#   as, and it refuses PTX from a newer compiler than itself.
# - Link stubs: candle builds cudarc with `dynamic-linking`, so the binary links against libcuda (the driver, never
#   on a machine without a GPU), nvrtc, curand, cublas and cublasLt. The stubs define every function cudarc declares
#   for them, under the real libraries' sonames, so the binary asks for the real ones when it runs on a GPU machine
#   (the driver's libcuda.so.1; the others from the CUDA 13 wheels, e.g. PyTorch's: scripts/gpu_check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${QTUNE_CUDA_DIR:-$PWD/.cuda}
PY=$D/py
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
        nvidia-cuda-cccl==13.0.85)
mkdir -p "$D"
if [ ! -x "$PY/nvidia/cu13/bin/nvcc" ]; then
    echo "setup_cuda: installing ${WHEELS[*]} into $PY"
    python3 -m pip --version >/dev/null 2>&1 || {
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3-pip
    }
    # --target installs beside the system's packages, never into them (PIP_BREAK_SYSTEM_PACKAGES: Debian's marker)
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check --no-deps --target "$PY" \
        "${WHEELS[@]}"
fi
CU=$PY/nvidia/cu13
# The wheels spread the toolkit over their own folders; nvcc wants one root with bin/, include/, lib64/ and nvvm/.
# cccl's headers (libcu++'s nv/target, cub, thrust) go beside the others.
[ -d "$CU/include/nv" ] || cp -r "$CU/include/cccl/"* "$CU/include/"
[ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"
ln -sf libcudart.so.13 "$CU/lib/libcudart.so"
"$CU/bin/nvcc" --version | tail -2

# Link stubs from cudarc's declarations (the cudarc that Cargo.lock pins).
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(awk '/^name = "cudarc"/{getline; print $3}' Cargo.lock | tr -d '"')" 2>/dev/null | head -1 || true)
if [ -z "$CUDARC" ]; then
    cargo fetch --locked >/dev/null
    CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(awk '/^name = "cudarc"/{getline; print $3}' Cargo.lock | tr -d '"')" | head -1)
fi
STUBS=$CU/lib/stubs  # cudarc searches $CUDA_ROOT/lib/stubs
mkdir -p "$STUBS"
stub() { # module, library name, soname
    local src=$STUBS/$2.c
    grep -oE '^\s+fn [A-Za-z_0-9]+\(' "$CUDARC/src/$1/sys/mod.rs" | sed -E 's/^\s+fn ([A-Za-z_0-9]+)\(/int \1(void) { return 999; }/' | sort -u > "$src"
    cc -shared -fPIC -o "$STUBS/lib$2.so" -Wl,-soname,"$3" "$src"
    ln -sf "lib$2.so" "$STUBS/$3"
}
stub driver cuda libcuda.so.1
stub nvrtc nvrtc libnvrtc.so.13
stub curand curand libcurand.so.10
stub cublas cublas libcublas.so.13
stub cublaslt cublasLt libcublasLt.so.13
echo "setup_cuda: link stubs for $(ls "$STUBS"/*.so | xargs -n1 basename | tr '\n' ' ')from $CUDARC"

cat > "$D/env.sh" <<EOF
# Source before \`cargo build --features cuda\` (written by scripts/setup_cuda.sh).
export CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_TOOLKIT_ROOT_DIR=$CU
export PATH=$CU/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
EOF
echo "setup_cuda: wrote $D/env.sh (compute capability ${CUDA_COMPUTE_CAP:-90}: H100/H200)"
