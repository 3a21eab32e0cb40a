"""Shared pytest setup. Without a CUDA device the Triton kernels run in Triton's interpreter: the
variable is read when `kernels` is imported (triton.jit decides then), so it is set here, before any
test module imports it. Every test runs in its own empty folder with its own decode cache."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path
