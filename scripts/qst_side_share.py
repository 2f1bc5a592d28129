#!/usr/bin/env python3
"""How far a trained QST side network reaches into the state the LM head reads, from its export's weights alone.

  qst_side_share.py RUN/model

The head reads h = α ⊙ norm_f(h_f) + (1 − α) ⊙ (W_up · norm_g(h_g) + b_up) (paper start; the code start's α is
σ(alpha)). Both norms are RMSNorms, so norm_g's output is g ⊙ x̂ with ‖x̂‖ = √s and norm_f's is g_f ⊙ x̂_f with
‖x̂_f‖ = √d, whatever the input. That bounds the two terms at every position:
  side term ≤ max|1 − α| · (σ_max(W_up diag g) · √s + ‖b_up‖)
  base term ≥ min|α ⊙ g_f| · √d
and, for x̂ with independent unit-variance entries, gives their typical norms
  side ≈ ‖(1 − α) ⊙ ‖rows of W_up diag g‖ , b_up‖,  base ≈ ‖α ⊙ g_f‖.
The base's final-norm weight g_f is read from the base model qst.json names (GGUF or safetensors), relative to the
directory the training ran in.
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def final_norm(path: Path) -> np.ndarray:
    if path.suffix == ".gguf":
        import gguf

        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name == "output_norm.weight":
                return np.array(t.data, dtype=np.float64)
        sys.exit(f"{path}: no output_norm.weight")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for f in files:
        t = load_file(str(f))
        if "model.norm.weight" in t:
            return t["model.norm.weight"].astype(np.float64)
    sys.exit(f"{path}: no model.norm.weight")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    model = Path(sys.argv[1])
    try:
        manifest = json.loads((model / "qst.json").read_text())
        side = {k: v.astype(np.float64) for k, v in load_file(str(model / "side.safetensors")).items()}
    except (OSError, ValueError) as e:
        sys.exit(f"{model}: not a QST export ({e})")
    gf = final_norm(Path(manifest["base_model"]))
    raw = side["alpha"]
    alpha = raw if manifest["start"] == "paper" else 1 / (1 + np.exp(-raw))
    w = side["upsample.weight"] * side["side.norm.weight"][None, :]
    b = side["upsample.bias"]
    s, d = w.shape[1], w.shape[0]
    side_bound = np.abs(1 - alpha).max() * (np.linalg.norm(w, 2) * np.sqrt(s) + np.linalg.norm(b))
    base_bound = np.abs(alpha * gf).min() * np.sqrt(d)
    side_typ = np.sqrt((((1 - alpha) ** 2) * ((w**2).sum(1) + b**2)).sum())
    base_typ = np.linalg.norm(alpha * gf)
    print(f"alpha: mean {alpha.mean():.3f}, min {alpha.min():.3f}, max {alpha.max():.3f}")
    print(f"upsample: |W| {np.linalg.norm(side['upsample.weight']):.3f}, |b| {np.linalg.norm(b):.3f}")
    print(f"every position: side term <= {side_bound:.3f}, base term >= {base_bound:.3f} (ratio <= {side_bound / base_bound:.4f})")
    print(f"typical: side term {side_typ:.3f}, base term {base_typ:.3f} (ratio {side_typ / base_typ:.4f})")


if __name__ == "__main__":
    main()
