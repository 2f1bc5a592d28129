#!/usr/bin/env python3
"""Prints the directories (colon-separated) of the CUDA libraries a qtune CUDA binary loads on a GPU machine:
cuBLAS, nvrtc, cuRAND and the runtime (CUDA 13) from NVIDIA's PyPI wheels, which PyTorch's environment holds; the
driver's libcuda.so.1 is on the system's path. Used by scripts/gpu_check.sh and scripts/gpu_7b.sh."""
import glob
import os
import site
import sys

dirs = []
for d in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libnvrtc.so.13", "libcurand.so.10", "libcudart.so.13"):
        for p in glob.glob(os.path.join(d, "nvidia", "**", name), recursive=True):
            if os.path.dirname(p) not in dirs:
                dirs.append(os.path.dirname(p))
print(":".join(dirs))
