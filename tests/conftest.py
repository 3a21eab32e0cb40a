"""Shared pytest setup. Without a CUDA device the Triton kernels run in Triton's interpreter: the
variable is read when `kernels` is imported (triton.jit decides then), so it is set here, before any
test module imports it. Every test runs in its own empty folder with its own decode cache. Torch
uses one CPU thread."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' models are tiny: a CPU thread pool costs them more in wake-ups than it gives, many
# times more on a machine whose cores are busy with other work. One thread here, and in the
# processes the tests start (scripts as a user runs them, torchrun, a Jupyter kernel).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path
