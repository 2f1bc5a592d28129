#!/usr/bin/env bash
# Installs what data-parallel qtune needs (Debian/Ubuntu): Open MPI (mpirun and the library), libclang for the `mpi`
# crate's bindings, and iproute2 for the two-host test's network namespaces. Then build with
#   cargo build --release --features mpi
# and run with
#   mpirun -np 2 target/release/qtune train ...
set -euo pipefail
need=()
# mpicc comes with libopenmpi-dev (the headers and the library the mpi crate links).
{ command -v mpirun && command -v mpicc; } >/dev/null || need+=(openmpi-bin libopenmpi-dev)
# bindgen loads libclang.so (or libclang-N.so): libclang-cpp.so, which llvm-N-dev brings, is a different library.
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
    echo "setup_mpi: Open MPI, libclang and iproute2 are installed"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup_mpi: installing ${need[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
