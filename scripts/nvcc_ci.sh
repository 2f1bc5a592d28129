#!/usr/bin/env bash
# CI's nvcc (`NVCC=scripts/nvcc_ci.sh`, set by .ci/run for its `cargo check --features cuda`): runs nvcc as asked,
# except on candle-kernels' GGUF MoE/MMQ static-library sources (llama.cpp's quantized matmuls compiled to machine
# code: qtune never calls them, and they take most of nvcc's time), which it compiles as an empty file into the same
# object. `cargo check` links nothing, so the check stays whole for qtune's code, its kernels and candle's PTX
# kernels; scripts/gpu_prepare.sh builds and links the real library.
args=("$@")
last=${args[$((${#args[@]} - 1))]}
case "$last" in
    *mmq_gguf/*.cu | */moe/*.cu | *mmvq_gguf.cu)
        for a in "${args[@]}"; do
            if [ "$a" = "-c" ]; then
                empty=$(mktemp --suffix=.cu)
                args[$((${#args[@]} - 1))]=$empty
                nvcc "${args[@]}"
                rc=$?
                rm -f "$empty"
                exit $rc
            fi
        done
        ;;
esac
exec nvcc "$@"
