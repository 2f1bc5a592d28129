#!/usr/bin/env python3
"""Build the tiny random LLaMA fixtures and their float64 references.

Writes (deterministic, fixed seeds):
  tests/fixtures/tiny_llama/          tie_word_embeddings = true
  tests/fixtures/tiny_llama_untied/   tie_word_embeddings = false
each with config.json + model.safetensors (float32, written by transformers' save_pretrained) and
reference.safetensors (float64 logits / loss / gradients, see scripts/README.md).

Run:  .venv/bin/python scripts/make_tiny_llama.py [--out-root tests/fixtures]
"""
import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

SEED_WEIGHTS = 1234
SEED_INPUTS = 4321
BATCH, SEQ = 2, 12
PAD_ID = 0
PADDED_ROW, PADDED_LEN = 1, 7


def make_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-default init so logits are far from uniform: matrices N(0, 0.2^2), RMSNorm weights 1 + 0.1 N(0,1).
    Parameters are visited in named_parameters() order (tied weights appear once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32))


def make_rope_float64(model: LlamaForCausalLM, theta: float) -> None:
    """transformers computes RoPE cos/sin in float32 even for a float64 model (inv_freq is built in float32 and
    LlamaRotaryEmbedding.forward calls `.float()`), which limits a "float64" reference to ~1e-6. Replace the
    rotary module's forward with the same formula evaluated in float64."""
    rot = model.model.rotary_emb
    D = model.config.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rot.forward = forward


def patch_float32_upcasts(families=(("llama", "Llama"),)) -> None:
    """transformers' LLaMA also forces float32 in LlamaRMSNorm.forward (`.to(torch.float32)`) and in
    eager_attention_forward (`softmax(..., dtype=torch.float32)`), i.e. it DOWNCASTS a float64 model there. Replace
    both with the identical formulas evaluated in the input dtype, so the references are float64 end to end.
    `families`: (module, class prefix) pairs of the model families to patch (each has its own copies)."""
    import importlib
    from transformers.models.llama import modeling_llama as ml

    def rms_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = ml.repeat_kv(key, module.num_key_value_groups)
        value_states = ml.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
        return attn_output, attn_weights

    for module, prefix in families:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        getattr(mod, f"{prefix}RMSNorm").forward = rms_forward
        mod.eager_attention_forward = eager


def manual_forward(w: dict, cfg: LlamaConfig, ids: torch.Tensor) -> torch.Tensor:
    """Plain float64 LLaMA forward (what the Rust engine implements), used to cross-check transformers:
    RMSNorm (x * rsqrt(mean(x^2) + eps) * w), rotate-half RoPE with theta 100000 on head_dim 16, GQA (each KV head
    serves num_heads / num_kv_heads consecutive query heads), causal softmax attention scaled by 1/sqrt(head_dim),
    SwiGLU MLP down(silu(gate x) * up x), final norm, LM head (= embed_tokens when tied)."""
    w = {k: v.double() for k, v in w.items()}
    B, T = ids.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    theta = 100000.0

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x):  # x [B, h, T, D]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, KV, D).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, KV, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, -1)
        o = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def build(tied: bool, out_dir: str) -> None:
    cfg = make_config(tied)
    torch.manual_seed(SEED_WEIGHTS)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    init_weights(model, SEED_WEIGHTS)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "weights not tied"
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Keep only what the Rust side loads (save_pretrained may add generation_config.json).
    for extra in ("generation_config.json",):
        p = os.path.join(out_dir, extra)
        if os.path.exists(p):
            os.remove(p)

    # transformers 5 writes RoPE settings only as "rope_parameters": {"rope_theta": ..., "rope_type": "default"}.
    # Also write the legacy top-level keys (transformers 4.x format, still accepted by 5.x) so a loader that reads
    # either form finds rope_theta = 100000.0.
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cj = json.load(f)
    cj["rope_theta"] = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    cj.setdefault("torch_dtype", "float32")
    cj.setdefault("rope_scaling", None)
    with open(cfg_path, "w") as f:
        json.dump(dict(sorted(cj.items())), f, indent=2)
        f.write("\n")

    # Reload from disk so the references are computed on exactly the saved float32 weights.
    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    print(f"[{os.path.basename(out_dir)}] saved tensors: {len(saved)} ({'tied' if tied else 'untied'}); "
          f"lm_head.weight present: {'lm_head.weight' in saved}")
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    model = model.double().eval()
    rt = model.config.rope_parameters["rope_theta"] if hasattr(model.config, "rope_parameters") else model.config.rope_theta
    assert rt == 100000.0, rt
    make_rope_float64(model, rt)
    patch_float32_upcasts()
    for name, p in model.named_parameters():
        p.requires_grad_(True)

    g = torch.Generator().manual_seed(SEED_INPUTS)
    # ids in [3, 256): avoid pad/bos/eos ids so the unpadded case has no special meaning anywhere.
    input_ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.int64)

    # Case 1: full sequences. HF's ForCausalLMLoss upcasts logits with `.float()`, i.e. it would DOWNCAST float64
    # logits to float32, so the float64 loss is computed here with the same definition (mean next-token CE over the
    # B x (T-1) shifted positions) and only cross-checked against HF's labels=input_ids loss at f32 tolerance.
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    assert logits.dtype == torch.float64
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, cfg.vocab_size), input_ids[:, 1:].reshape(-1), reduction="mean")
    with torch.no_grad():
        hf_loss = model(input_ids=input_ids, labels=input_ids).loss
    assert abs(hf_loss.item() - loss.item()) < 1e-5 * max(1.0, loss.item()), (hf_loss.item(), loss.item())
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        grads["grad." + name] = p.grad.detach().clone().contiguous()

    # Case 2: right padding in row PADDED_ROW.
    input_ids_padded = input_ids.clone()
    attention_mask_padded = torch.ones(BATCH, SEQ, dtype=torch.int64)
    input_ids_padded[PADDED_ROW, PADDED_LEN:] = PAD_ID
    attention_mask_padded[PADDED_ROW, PADDED_LEN:] = 0
    with torch.no_grad():
        logits_padded = model(input_ids=input_ids_padded, attention_mask=attention_mask_padded).logits
        # Sanity: real positions of the padded row equal a forward over its real prefix alone.
        alone = model(input_ids=input_ids_padded[PADDED_ROW:PADDED_ROW + 1, :PADDED_LEN]).logits
        d = (logits_padded[PADDED_ROW, :PADDED_LEN] - alone[0]).abs().max().item()
        assert d < 1e-10, d
        d0 = (logits_padded[0] - logits[0]).abs().max().item()
        assert d0 < 1e-10, d0

    manual_logits = manual_forward(saved, cfg, input_ids)
    dm = (manual_logits - logits.detach()).abs().max().item()
    assert dm < 1e-10, f"hand-written forward disagrees with transformers: {dm}"

    ref = {
        "input_ids": input_ids.contiguous(),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1).contiguous(),
        "input_ids_padded": input_ids_padded.contiguous(),
        "attention_mask_padded": attention_mask_padded.contiguous(),
        "logits_padded": logits_padded.detach().contiguous(),
    }
    ref.update(grads)
    ref_path = os.path.join(out_dir, "reference.safetensors")
    # One metadata key only: safetensors writes metadata from a hash map, so several keys reorder between runs.
    save_file(ref, ref_path, metadata={"info": (
        "scripts/make_tiny_llama.py; float64 end to end (model.double(), eager attention, float64 RoPE/RMSNorm/"
        "softmax); loss = mean next-token cross-entropy over B*(T-1) positions (HF labels=input_ids); "
        f"padded: row {PADDED_ROW} real for first {PADDED_LEN} tokens, pad id {PAD_ID}")})
    gnorm = math.sqrt(sum(float((v ** 2).sum()) for v in grads.values()))
    print(f"[{os.path.basename(out_dir)}] loss={loss.item():.6f}  max|logit|={logits.abs().max().item():.4f}  "
          f"logit std={logits.std().item():.4f}  max|logit_padded(real)|="
          f"{logits_padded[PADDED_ROW, :PADDED_LEN].abs().max().item():.4f}  grad-norm={gnorm:.4f}  "
          f"n_grads={len(grads)}")
    for f in sorted(os.listdir(out_dir)):
        print(f"    {f}: {os.path.getsize(os.path.join(out_dir, f))} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-for-bit reproducible float64 sums
    build(True, os.path.join(args.out_root, "tiny_llama"))
    build(False, os.path.join(args.out_root, "tiny_llama_untied"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
