#!/usr/bin/env python3
"""Round trips of qtune's exports through the Python tools (what scripts/exports.sh runs).

  check_exports.py hf DIR --reference FIXTURE_DIR [--round f32|bf16|f16] [--tol T]
      transformers loads DIR (one file or a sharded index) with no missing/unexpected tensor; its logits on the
      fixture's input_ids against transformers' own model of the fixture with every weight rounded to the export's
      type (torch's casts): max |export - ref| / max |ref|. The error against the fixture's float64 reference is
      printed too (for bf16/f16 it is the format's own rounding, not the export's).
  check_exports.py gguf FILE --reference FIXTURE_DIR [--round f16|q8_0] [--tol T]
      the `gguf` package reads FILE (tensor count and types); transformers' GGUF loader builds the model from it;
      its logits against transformers' model of the fixture with each matrix rounded as llama.cpp would (f16 cast,
      or the gguf package's own Q8_0 quantize/dequantize; norms and biases f32).
  check_exports.py llamacpp FILE --reference FIXTURE_DIR [--tol T]
      llama.cpp itself (llama-cpp-python) loads FILE and evaluates the fixture's input_ids; its logits against the
      fixture's float64 reference (llama.cpp computes partly in f16: this is a loose check that it runs the model
      qtune wrote: Q/K layout, biases, RoPE factors).
  check_exports.py peft BASE ADAPTER MERGED [--tol T] [--gguf FILE]
      peft loads ADAPTER onto BASE (an HF dir, or a .gguf transformers dequantizes: the base qtune trained on);
      its logits on a fixed prompt against transformers' load of MERGED (qtune's merged HF export). With --gguf,
      the run's GGUF export too: its logits against MERGED, and its tokenizer's ids against MERGED's.
Prints one line per check ("ok" or "FAIL") with the measured error; exit 1 if any check failed.
"""
import argparse
import logging
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("transformers").setLevel(logging.ERROR)

PROMPTS = ["The capital of France is Paris. The capital of Germany is", "Question: is water wet?\nAnswer:"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def report(name: str, err: float, tol: float) -> bool:
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative logit error {err:.2e} (tolerance {tol:.0e})")
    return ok


def fixture_logits(model, fixture: str):
    from safetensors.torch import load_file
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"]).logits
    return out, ref["logits"]


def rounded(fixture: str, kind: str, matrices_only: bool):
    """transformers' model of `fixture` with its weights rounded to `kind` (in place, then back to f32)."""
    model = load_hf(fixture)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if matrices_only and p.dim() < 2:
                continue
            if kind in ("bf16", "f16"):
                p.copy_(p.to(torch.bfloat16 if kind == "bf16" else torch.float16).float())
            elif kind == "q8_0":
                import gguf
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    return model


def load_hf(d: str):
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in info.get("missing_keys", []) if not (tied and k == "lm_head.weight")]
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise SystemExit(f"FAIL {d}: missing {missing[:5]} unexpected {unexpected[:5]}")
    return model.eval()


def load_gguf(path: str):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                                dtype=torch.float32, attn_implementation="eager").eval()


def llamacpp_logits(path: str, ids: list) -> torch.Tensor:
    """llama.cpp's logits at every position of `ids` (a fresh context each time)."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, logits_all=True, n_ctx=max(64, len(ids)), verbose=False, n_threads=2)
    llm.eval(ids)
    return torch.tensor(llm.scores[:len(ids)])


def gguf_summary(path: str) -> str:
    from gguf import GGUFReader
    r = GGUFReader(path)
    kinds = sorted({t.tensor_type.name for t in r.tensors})
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    return f"{len(r.tensors)} tensors ({', '.join(kinds)}), architecture {arch}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["hf", "gguf", "llamacpp", "peft"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--reference")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--round", default="f32", choices=["f32", "bf16", "f16", "q8_0"])
    ap.add_argument("--gguf")
    ap.add_argument("--gguf-tol", type=float, default=5e-2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    ok = True
    if a.mode == "llamacpp":
        from safetensors.torch import load_file
        ref = load_file(os.path.join(a.reference, "reference.safetensors"))
        for row in range(ref["input_ids"].shape[0]):
            got = llamacpp_logits(a.paths[0], ref["input_ids"][row].tolist())
            ok &= report(f"{a.paths[0]} (llama.cpp) row {row} vs the fixture's float64 logits",
                         rel(got, ref["logits"][row]), a.tol)
    elif a.mode in ("hf", "gguf"):
        if a.mode == "gguf":
            print(f"     {a.paths[0]}: the gguf package reads {gguf_summary(a.paths[0])}")
        model = load_hf(a.paths[0]) if a.mode == "hf" else load_gguf(a.paths[0])
        got, f64 = fixture_logits(model, a.reference)
        want, _ = fixture_logits(rounded(a.reference, a.round, a.mode == "gguf"), a.reference)
        print(f"     against the fixture's float64 logits: {rel(got, f64):.2e} (the {a.round} format's own error)")
        loader = "transformers" if a.mode == "hf" else "transformers GGUF loader"
        ok &= report(f"{a.paths[0]} ({loader}) vs the fixture rounded to {a.round}", rel(got, want), a.tol)
    else:
        from peft import PeftModel
        base_path, adapter, merged_dir = a.paths
        base = load_gguf(base_path) if base_path.endswith(".gguf") else load_hf(base_path)
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        merged = load_hf(merged_dir)
        tok = AutoTokenizer.from_pretrained(merged_dir)
        prompts = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
        with torch.no_grad():
            want = [merged(input_ids=ids).logits[0] for ids in prompts]
            for ids, w in zip(prompts, want):
                ok &= report(f"peft({os.path.basename(base_path)} + adapter), {len(ids[0])} tokens, vs the merged "
                             f"export", rel(peft_model(input_ids=ids).logits[0], w), a.tol)
            with peft_model.disable_adapter():
                plain = peft_model(input_ids=prompts[0]).logits[0]
            print(f"     the adapter moves the base's logits by {rel(want[0], plain):.2e} relative (not a no-op)")
            folded = peft_model.merge_and_unload().eval()
            for ids, w in zip(prompts, want):
                ok &= report(f"peft merge_and_unload, {len(ids[0])} tokens, vs the merged export",
                             rel(folded(input_ids=ids).logits[0], w), a.tol)
        if a.gguf:
            print(f"     {a.gguf}: the gguf package reads {gguf_summary(a.gguf)}")
            g = load_gguf(a.gguf)
            gtok = AutoTokenizer.from_pretrained(os.path.dirname(a.gguf), gguf_file=os.path.basename(a.gguf))
            same = all(gtok(p).input_ids == tok(p).input_ids for p in PROMPTS)
            print(f"{'ok  ' if same else 'FAIL'} {a.gguf}: transformers' GGUF tokenizer gives the HF export's ids")
            ok &= same
            from llama_cpp import Llama
            llm = Llama(model_path=a.gguf, vocab_only=True, verbose=False)
            same = all(llm.tokenize(p.encode(), add_bos=False, special=True) == tok(p).input_ids for p in PROMPTS)
            print(f"{'ok  ' if same else 'FAIL'} {a.gguf}: llama.cpp's tokenizer gives the HF export's ids")
            ok &= same
            q8 = rounded(merged_dir, "q8_0", True)
            with torch.no_grad():
                for ids, w in zip(prompts, want):
                    got = g(input_ids=ids).logits[0]
                    ok &= report(f"{a.gguf} (transformers GGUF loader) vs the merged export rounded to q8_0",
                                 rel(got, q8(input_ids=ids).logits[0]), a.tol)
                    print(f"     against the unrounded merged export: {rel(got, w):.2e} (Q8_0's own error)")
                    lc = llamacpp_logits(a.gguf, ids[0].tolist())
                    agree = (lc.argmax(-1) == w.argmax(-1)).float().mean().item()
                    print(f"     llama.cpp (Q8_0 weights and activations): {rel(lc, w):.2e} from the merged export, "
                          f"next-token argmax agreeing at {agree:.0%} of {len(ids[0])} positions")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
