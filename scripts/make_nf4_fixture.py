#!/usr/bin/env python3
"""Write crates/qtune-quant/tests/fixtures/nf4_bnb.safetensors: NF4 (blocksize 64) quantization of fixed inputs,
produced by bitsandbytes itself on CPU (bitsandbytes.functional.quantize_4bit / dequantize_4bit), with and without
double quantization of the absmax statistics (compress_statistics). Format: see scripts/README.md.

Run:  .venv/bin/python scripts/make_nf4_fixture.py [--out PATH]
"""
import argparse
import logging
import os
import sys

logging.disable(logging.WARNING)  # bnb warns about an optional `kernels` package (only for gemm_4bit, unused here)

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F
from safetensors.torch import save_file

BLOCK = 64
DQ_BLOCK = 256
SEED = 20240607


def make_inputs():
    rng = np.random.default_rng(SEED)
    # Main input: 32768 values = 512 blocks of 64, in 8 segments of 4096 with different scales.
    scales = [0.02, 0.1, 0.5, 1.0, 2.0, 0.005, 5.0, 0.3]
    main = np.concatenate([rng.standard_normal(4096) * s for s in scales]).astype(np.float32)
    # A few large outliers (dominate their block's absmax; and skew the absmax statistics for double quant).
    for idx, val in [(5, 40.0), (1000, -25.0), (9000, 60.0), (17000, -100.0), (30001, 12.5)]:
        main[idx] = val
    # Edge cases: one all-zero block (absmax 0), one constant block, one block with exact +-absmax and zeros.
    main[64 * 100: 64 * 101] = 0.0
    main[64 * 101: 64 * 102] = 0.75
    blk = np.zeros(64, np.float32)
    blk[::3] = 1.5
    blk[1::3] = -1.5
    main[64 * 102: 64 * 103] = blk
    # Tail input: 2432 = 37*64 + 64 = 38 blocks of 64 -> its 38 absmax values are NOT a multiple of 256
    # (the double quantization has one partial block of 38).
    tail = (rng.standard_normal(2432) * 0.7).astype(np.float32)
    tail[77] = -9.0
    tail[2431] = 4.0
    return torch.from_numpy(main), torch.from_numpy(tail)


def quantize_case(x: torch.Tensor, suffix: str, out: dict, check: dict) -> None:
    n = x.numel()
    assert n % BLOCK == 0
    q_nodq, st_nodq = F.quantize_4bit(x, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    q_dq, st_dq = F.quantize_4bit(x, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    # The 4-bit codes are computed from the exact absmax in both cases (double quantization only affects the
    # stored absmax, i.e. dequantization).
    assert torch.equal(q_nodq, q_dq), "codes differ between compress_statistics True/False"
    deq_nodq = F.dequantize_4bit(q_nodq, quant_state=st_nodq)
    deq_dq = F.dequantize_4bit(q_dq, quant_state=st_dq)

    codes = q_nodq.reshape(-1).contiguous()
    assert codes.dtype == torch.uint8 and codes.numel() == n // 2
    absmax = st_nodq.absmax.reshape(-1).float().contiguous()
    assert absmax.numel() == n // BLOCK
    assert st_dq.nested and st_dq.state2 is not None
    dq_codes = st_dq.absmax.reshape(-1).contiguous()
    assert dq_codes.dtype == torch.uint8 and dq_codes.numel() == n // BLOCK
    st2 = st_dq.state2
    assert st2.blocksize == DQ_BLOCK, st2.blocksize
    dq_absmax2 = st2.absmax.reshape(-1).float().contiguous()
    assert dq_absmax2.numel() == -(-(n // BLOCK) // DQ_BLOCK)
    dq_offset = torch.as_tensor(st_dq.offset, dtype=torch.float32).reshape(1).contiguous()

    out["codes" + suffix] = codes
    out["absmax" + suffix] = absmax
    out["dq_codes" + suffix] = dq_codes
    out["dq_absmax2" + suffix] = dq_absmax2
    out["dq_offset" + suffix] = dq_offset
    out["dequant" + suffix] = deq_dq.reshape(-1).float().contiguous()
    out["dequant_nodq" + suffix] = deq_nodq.reshape(-1).float().contiguous()

    # ---- Cross-checks that pin down the documented algorithm (scripts/README.md) ----
    nf4 = st_nodq.code.float()
    dmap = st2.code.float()
    # nibble order: element 2i is the HIGH nibble of byte i, element 2i+1 the LOW nibble.
    idx = torch.empty(n, dtype=torch.int64)
    idx[0::2] = (codes >> 4).long()
    idx[1::2] = (codes & 0xF).long()
    # dequant_nodq = nf4[idx] * absmax[block]  (float32)
    ref_nodq = (nf4[idx].view(-1, BLOCK) * absmax.view(-1, 1)).reshape(-1)
    check["dequant_nodq formula exact" + suffix] = torch.equal(ref_nodq, out["dequant_nodq" + suffix])
    # absmax after double quantization: dmap[dq_codes[i]] * absmax2[i // 256] + offset (float32, in that order)
    nb = n // BLOCK
    a2 = dq_absmax2.repeat_interleave(DQ_BLOCK)[:nb]
    absmax_dq = dmap[dq_codes.long()] * a2 + dq_offset
    ref_dq = (nf4[idx].view(-1, BLOCK) * absmax_dq.view(-1, 1)).reshape(-1)
    check["dequant formula exact" + suffix] = torch.equal(ref_dq, out["dequant" + suffix])
    # offset = mean(absmax) (float32 torch mean)
    check["offset == absmax.mean()" + suffix] = torch.equal(dq_offset, absmax.mean().reshape(1))
    # absmax2 = max |absmax - offset| per 256 block
    centered = absmax - dq_offset
    pad = torch.nn.functional.pad(centered, (0, a2.numel() * 0 + (-nb) % DQ_BLOCK))
    check["absmax2 == blockwise max|absmax-offset|" + suffix] = torch.equal(
        dq_absmax2, pad.view(-1, DQ_BLOCK).abs().max(1).values)
    # NF4 codes: bucketize(x * (1/absmax), midpoints(nf4)), ties to the lower code (torch.bucketize, right=False)
    scaled = torch.clamp(x.view(-1, BLOCK) * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    mids = (nf4[:-1] + nf4[1:]) / 2
    check["nf4 code rule (bucketize x*(1/absmax) on midpoints)" + suffix] = torch.equal(
        torch.bucketize(scaled, mids).long(), idx)
    # double-quant codes: nearest dynamic-map entry to (absmax - offset) / absmax2 (bnb CPU C kernel)
    # bnb's CPU C kernel (quantize_block in csrc/common.cpp): normed = (absmax - offset) / absmax2 (a division),
    # idx = BinSearch "Direct2" lookup (meant to return the code to the left), then idx+1 if strictly closer.
    # That lookup is approximate, so a few codes are the neighbour of the true nearest one. Record how many and
    # require each to be an adjacent code at a near-tie (this is what a Rust test can assert: see README).
    normed = (centered / a2).clamp(-1, 1)
    dist = (normed[:, None] - dmap[None, :]).abs()
    nearest = dist.argmin(1)
    bnb_codes = dq_codes.long()
    mism = (nearest != bnb_codes).nonzero().flatten()
    check["dq codes != nearest dynamic-map entry (count)" + suffix] = int(mism.numel())
    ok = True
    worst = 0.0
    for i in mism.tolist():
        excess = (dist[i, bnb_codes[i]] - dist[i, nearest[i]]).item()
        worst = max(worst, excess)
        ok &= abs(int(bnb_codes[i]) - int(nearest[i])) == 1 and excess < 2e-5
    check["dq code mismatches are adjacent near-ties (excess < 2e-5)" + suffix] = bool(ok)
    check["dq code worst excess distance" + suffix] = f"{worst:.3g}"
    rel = ((out["dequant" + suffix] - x).norm() / x.norm()).item()
    rel_nodq = ((out["dequant_nodq" + suffix] - x).norm() / x.norm()).item()
    check["rel. L2 error dq / nodq" + suffix] = f"{rel:.5f} / {rel_nodq:.5f}"
    out["_nf4"] = nf4
    out["_dmap"] = dmap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "crates", "qtune-quant", "tests",
                                                   "fixtures", "nf4_bnb.safetensors"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, xt = make_inputs()
    out = {"input": x.contiguous(), "input_tail": xt.contiguous()}
    check = {}
    quantize_case(x, "", out, check)
    nf4_a, dmap_a = out.pop("_nf4"), out.pop("_dmap")
    quantize_case(xt, "_tail", out, check)
    nf4_b, dmap_b = out.pop("_nf4"), out.pop("_dmap")
    assert torch.equal(nf4_a, nf4_b) and torch.equal(dmap_a, dmap_b)
    assert torch.equal(dmap_a, F.create_dynamic_map(signed=True).float()), "double-quant map is not create_dynamic_map()"
    out["nf4_levels"] = nf4_a.contiguous()
    out["dynamic_map"] = dmap_a.contiguous()
    assert out["nf4_levels"].numel() == 16 and out["dynamic_map"].numel() == 256

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(out, args.out, metadata={"info": (
        f"bitsandbytes {bitsandbytes.__version__} CPU, quantize_4bit(quant_type='nf4', blocksize={BLOCK}); "
        f"double quant blocksize {DQ_BLOCK}; packed byte = (code[2i] << 4) | code[2i+1]; see scripts/README.md")})
    print(f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}: wrote {args.out} "
          f"({os.path.getsize(args.out)} bytes)")
    for k in sorted(out):
        print(f"  {k:20s} {str(out[k].dtype):14s} {list(out[k].shape)}")
    for k, v in check.items():
        print(f"  check: {k}: {v}")
    bad = [k for k, v in check.items() if v is False]
    if bad:
        print("FAILED checks:", bad, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
