#!/usr/bin/env python3
"""Build tiny random fixtures of the other model families qtune runs, with float64 references from transformers.

Writes (deterministic, fixed seeds), each with config.json + model.safetensors (float32, save_pretrained) and
reference.safetensors (float64 logits / loss / every parameter gradient, the layout tests/parity.rs reads):
  tests/fixtures/tiny_qwen2/          Qwen2ForCausalLM: q/k/v biases, tied head
  tests/fixtures/tiny_mistral/        MistralForCausalLM: sliding_window 5 (< the 12-token inputs), untied
  tests/fixtures/tiny_llama3/         LlamaForCausalLM, rope_scaling llama3 (every frequency regime present)
  tests/fixtures/tiny_llama_dynamic/  LlamaForCausalLM, rope_scaling dynamic, inputs longer than the context

The reference pass is float64 end to end: transformers' RMSNorm and eager attention upcast to float32, and its RoPE
computes the (scaled) inverse frequencies in float32, so those three are replaced by the same formulas in float64;
the float64 frequencies are first checked against transformers' own float32 ones (1e-6 relative).

Run:  .venv/bin/python scripts/make_tiny_families.py [--out-root tests/fixtures]
"""
import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_llama import patch_float32_upcasts  # noqa: E402  (the float64 RMSNorm and eager attention)
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

SEED_WEIGHTS = 2024
SEED_INPUTS = 4321
BATCH, SEQ = 2, 12
PAD_ID = 0
PADDED_ROW, PADDED_LEN = 1, 7
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1,
              eos_token_id=2, pad_token_id=PAD_ID)

FAMILIES = {
    "tiny_qwen2": (Qwen2Config, Qwen2ForCausalLM,
                   dict(COMMON, rope_theta=1000000.0, max_position_embeddings=64, tie_word_embeddings=True,
                        use_sliding_window=False), None),
    "tiny_mistral": (MistralConfig, MistralForCausalLM,
                     dict(COMMON, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                          sliding_window=5), None),
    # original context 16 and wavelengths 2π/θ^(-2i/8) for θ = 500000: 6.3, 168, 4467, 1.2e5 against the
    # bounds 16/4 = 4 and 16/1 = 16 would put all in one regime; θ = 10 gives 6.3, 11.2, 19.9, 35.3: kept, ramped
    # (11.2 lies in [4, 16]), divided, divided.
    "tiny_llama3": (LlamaConfig, LlamaForCausalLM,
                    dict(COMMON, rope_theta=10.0, max_position_embeddings=64, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=16)), None),
    # max_position_embeddings 8 < SEQ: the dynamic base stretch applies at the 12-token inputs.
    "tiny_llama_dynamic": (LlamaConfig, LlamaForCausalLM,
                           dict(COMMON, rope_theta=10000.0, max_position_embeddings=8, tie_word_embeddings=True,
                                rope_scaling=dict(rope_type="dynamic", factor=2.0)), None),
}


def inv_freq_f64(cfg: dict, seq_len: int) -> torch.Tensor:
    """transformers' RoPE initializers (default, dynamic, llama3), in float64."""
    D = cfg["head_dim"]
    theta = cfg["rope_theta"]
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", "default")
    if kind == "dynamic":
        maxp = cfg["max_position_embeddings"]
        n = max(seq_len, maxp)
        theta = theta * ((rs["factor"] * n / maxp) - (rs["factor"] - 1)) ** (D / (D - 2))
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    if kind == "llama3":
        old = rs["original_max_position_embeddings"]
        lo, hi, f = rs["low_freq_factor"], rs["high_freq_factor"], rs["factor"]
        wl = 2 * math.pi / inv
        out = torch.where(wl > old / lo, inv / f, inv)
        smooth = (old / wl - lo) / (hi - lo)
        sm = (1 - smooth) * out / f + smooth * out
        medium = ~(wl < old / hi) & ~(wl > old / lo)
        inv = torch.where(medium, sm, out)
    return inv


def patch_float64(model, cfg: dict) -> None:
    """Replace the float32 upcasts (RMSNorm, eager softmax) and the float32 RoPE with float64 formulas."""
    patch_float32_upcasts((("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2")))

    rot = model.model.rotary_emb
    # transformers' own frequencies (float32, after its dynamic update for SEQ positions) against ours.
    with torch.no_grad():
        rot(torch.zeros(1, dtype=torch.float32), torch.arange(SEQ)[None, :])
    inv = inv_freq_f64(cfg, SEQ)
    err = ((rot.inv_freq.double() - inv).abs() / inv).max().item()
    assert err < 1e-6, f"float64 RoPE frequencies differ from transformers' by {err:e}"
    assert getattr(rot, "attention_scaling", 1.0) == 1.0

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rot.forward = forward


def build(name: str, out_root: str) -> None:
    cfg_cls, model_cls, kw, _ = FAMILIES[name]
    out_dir = os.path.join(out_root, name)
    cfg = cfg_cls(**kw, torch_dtype="float32")
    torch.manual_seed(SEED_WEIGHTS)
    model = model_cls(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(SEED_WEIGHTS)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # projection biases: large enough that dropping them shows
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cj = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump(dict(sorted(cj.items())), f, indent=2)
        f.write("\n")

    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    model = model_cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").double().eval()
    patch_float64(model, kw)
    for p in model.parameters():
        p.requires_grad_(True)

    gi = torch.Generator().manual_seed(SEED_INPUTS)
    input_ids = torch.randint(3, kw["vocab_size"], (BATCH, SEQ), generator=gi, dtype=torch.int64)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    assert logits.dtype == torch.float64
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, kw["vocab_size"]), input_ids[:, 1:].reshape(-1), reduction="mean")
    loss.backward()
    grads = {"grad." + n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()}

    ids_padded = input_ids.clone()
    mask_padded = torch.ones(BATCH, SEQ, dtype=torch.int64)
    ids_padded[PADDED_ROW, PADDED_LEN:] = PAD_ID
    mask_padded[PADDED_ROW, PADDED_LEN:] = 0
    with torch.no_grad():
        logits_padded = model(input_ids=ids_padded, attention_mask=mask_padded).logits

    # What each family's difference does to the logits: the fixture must not pass by accident.
    with torch.no_grad():
        plain = model_cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
        if name == "tiny_qwen2":
            for layer in plain.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
        elif name == "tiny_mistral":
            plain = model_cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager",
                                              sliding_window=None).eval()
        else:
            plain = model_cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager",
                                              rope_parameters=dict(rope_type="default",
                                                                   rope_theta=kw["rope_theta"])).eval()
        effect = (plain(input_ids=input_ids).logits.double() - logits).abs().max().item()
    assert effect > 1e-2, f"{name}: the family's difference changes the logits by only {effect:e}"

    ref = {
        "input_ids": input_ids.contiguous(),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1).contiguous(),
        "input_ids_padded": ids_padded.contiguous(),
        "attention_mask_padded": mask_padded.contiguous(),
        "logits_padded": logits_padded.detach().contiguous(),
    }
    ref.update(grads)
    save_file(ref, os.path.join(out_dir, "reference.safetensors"), metadata={"info": (
        f"scripts/make_tiny_families.py {name}; float64 end to end; loss = mean next-token cross-entropy over "
        f"B*(T-1) positions; padded: row {PADDED_ROW} real for first {PADDED_LEN} tokens, pad id {PAD_ID}")})
    print(f"[{name}] {len(saved)} tensors, loss={loss.item():.6f}, max|logit|={logits.abs().max().item():.3f}, "
          f"the family's difference moves the logits by {effect:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", default=list(FAMILIES))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name in args.only:
        build(name, args.out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
