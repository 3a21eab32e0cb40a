"""Shared pytest setup. Without a CUDA device the Triton kernels run in Triton's interpreter: the variable is read
when `kernels` is imported (triton.jit decides then), so it is set here, before any test module imports it."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
