#!/usr/bin/env python3
"""Check a model directory exported by qtune (config.json + model.safetensors [+ tokenizer.json]) with transformers.

  check_export.py DIR [--reference FILE] [--prompt TEXT] [--tol 1e-4] [--new-tokens 8]

1. Loads DIR with AutoModelForCausalLM.from_pretrained(DIR, dtype=float32) and, if DIR has a tokenizer
   (tokenizer.json / tokenizer_config.json), AutoTokenizer.from_pretrained(DIR).
2. Runs a forward on a fixed prompt (tokenized; without a tokenizer: fixed ids 0..11 mod vocab) and prints the
   greedy next tokens (ids, and text when a tokenizer exists).
3. With --reference FILE (safetensors with `input_ids` int [B,T] or [T] and `logits` float [B,T,V] or [T,V], as written
   by the Rust tool), runs the model on those input_ids (plus `attention_mask` if the file has one) and compares:
   max relative error = max|hf - ref| / max|hf| (over all positions, or only positions where attention_mask is 1).
   Fails (exit 1) above --tol (default 1e-4). Also prints the max absolute error and argmax agreement.
Exit codes: 0 ok; 1 logits mismatch; 2 load/format error.
"""
import argparse
import logging
import os
import sys

PROMPT = "The capital of France is"


def fail(msg: str, code: int = 2) -> int:
    print(f"check_export: FAIL: {msg}", file=sys.stderr)
    return code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--reference", help="safetensors with input_ids and logits written by the Rust tool")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed (default 1e-4)")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors import safe_open
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    d = args.dir
    for f in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(d, f)) and not (
                f == "model.safetensors" and os.path.isfile(os.path.join(d, "model.safetensors.index.json"))):
            return fail(f"{d}: missing {f}")
    try:
        model, load_info = AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - report any load error clearly
        return fail(f"transformers could not load {d}: {type(e).__name__}: {e}")
    model.eval()
    # Loading must not leave any parameter randomly initialised (a missing or misnamed tensor) or ignore one.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in load_info.get("missing_keys", []) if not (tied and k == "lm_head.weight")]
    bad = {k: sorted(v)[:10] for k, v in load_info.items()
           if v and k in ("unexpected_keys", "mismatched_keys", "error_msgs")}
    if missing or bad:
        return fail(f"weights do not match the config: missing={sorted(missing)[:10]} {bad}")
    cfg = model.config
    nparams = sum(p.numel() for p in model.parameters())
    print(f"loaded {d}: {type(model).__name__}, {nparams} parameters, layers={cfg.num_hidden_layers} "
          f"hidden={cfg.hidden_size} vocab={cfg.vocab_size} tied={getattr(cfg, 'tie_word_embeddings', None)}")

    tok = None
    if any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tok = AutoTokenizer.from_pretrained(d)
        except Exception as e:  # noqa: BLE001
            return fail(f"tokenizer in {d} could not be loaded: {type(e).__name__}: {e}")
        print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens")
    else:
        print("tokenizer: none in DIR (using fixed token ids)")

    if tok is not None:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    else:
        ids = (torch.arange(12, dtype=torch.int64) % cfg.vocab_size).unsqueeze(0)
    gen = []
    cur = ids
    with torch.no_grad():
        logits = model(input_ids=cur).logits
        if not torch.isfinite(logits).all():
            return fail("non-finite logits on the fixed prompt", 1)
        for _ in range(args.new_tokens):
            nxt = int(model(input_ids=cur).logits[0, -1].argmax())
            gen.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    shown = f" {tok.decode(gen)!r}" if tok is not None else ""
    print(f"prompt ids={ids[0].tolist()} -> greedy {args.new_tokens}: {gen}{shown}")

    if args.reference:
        if not os.path.isfile(args.reference):
            return fail(f"reference file {args.reference} not found")
        with safe_open(args.reference, "pt") as f:
            keys = set(f.keys())
            if not {"input_ids", "logits"} <= keys:
                return fail(f"{args.reference} must contain input_ids and logits (has {sorted(keys)})")
            ref_ids = f.get_tensor("input_ids").to(torch.int64)
            ref_logits = f.get_tensor("logits").to(torch.float64)
            mask = f.get_tensor("attention_mask").to(torch.int64) if "attention_mask" in keys else None
        if ref_ids.dim() == 1:
            ref_ids = ref_ids.unsqueeze(0)
        if ref_logits.dim() == 2:
            ref_logits = ref_logits.unsqueeze(0)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
        B, T = ref_ids.shape
        if tuple(ref_logits.shape) != (B, T, cfg.vocab_size):
            return fail(f"reference logits shape {list(ref_logits.shape)} != [{B}, {T}, {cfg.vocab_size}]")
        with torch.no_grad():
            hf = model(input_ids=ref_ids, attention_mask=mask).logits.to(torch.float64)
        sel = (mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool))
        diff = (hf - ref_logits).abs()[sel]
        scale = hf.abs()[sel].max().item()
        max_abs = diff.max().item()
        rel = max_abs / max(scale, 1e-30)
        agree = (hf.argmax(-1) == ref_logits.argmax(-1))[sel].float().mean().item()
        print(f"reference {args.reference}: B={B} T={T}; max|hf|={scale:.4f} max abs err={max_abs:.3e} "
              f"max rel err={rel:.3e} (tol {args.tol:g}); argmax agreement {agree * 100:.1f}%")
        if not (rel <= args.tol):
            return fail(f"logits differ: max relative error {rel:.3e} > {args.tol:g}", 1)
    print("check_export: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
