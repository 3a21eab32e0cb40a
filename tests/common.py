"""Helpers for the tests: tiny image folders made on the spot, and running a script in this process
(fast: torch is imported once) or as a subprocess (to see exactly what a user sees)."""
import contextlib
import gzip
import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
IMG = 16                                              # every tiny run trains at 16x16

# Per script: flags that make a model small enough for a CPU step to take milliseconds.
# A new script joins every end-to-end test in test_scripts.py by adding a line here.
TINY = {
    "vanilla_gan.py": ["--hidden", "16", "--img-size", str(IMG), "--batch-size", "8"],
    "dcgan.py": ["--ngf", "8", "--ndf", "8", "--img-size", str(IMG), "--batch-size", "8"],
    "cgan.py": ["--ngf", "8", "--ndf", "8", "--embed-dim", "4", "--img-size", str(IMG),
                "--batch-size", "8"],
    "acgan.py": ["--ngf", "8", "--ndf", "8", "--img-size", str(IMG), "--batch-size", "8"],
    "wgan.py": ["--ngf", "8", "--ndf", "8", "--img-size", str(IMG), "--batch-size", "8",
                "--n-critic", "2", "--no-critic-warmup"],
    "wgan_gp.py": ["--ngf", "8", "--ndf", "8", "--img-size", str(IMG), "--batch-size", "8",
                   "--n-critic", "2"],
    "lsgan.py": ["--ngf", "8", "--ndf", "8", "--img-size", str(IMG), "--batch-size", "8"],
    "ebgan.py": ["--ngf", "8", "--ndf", "8", "--code-dim", "8", "--img-size", str(IMG),
                 "--batch-size", "8"],
}
SCRIPTS = sorted(TINY)
CONDITIONAL_SCRIPTS = {"cgan.py", "acgan.py"}       # scripts that need one subfolder per class


def load_script(name):
    """Import a script as a module (once) so that tests can call main(argv) and its functions."""
    mod_name = "script_" + name[:-3]
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, REPO / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


def run(script, *args):
    """Run a script's main() in this process with the tiny flags; SystemExit propagates."""
    return load_script(script).main([*TINY[script], *map(str, args)])


def run_subprocess(script_path, *args, cwd, timeout=300, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(script_path), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_of(script, *args):
    """The one-line error that a run of the script ends with (the test fails if it does not)."""
    with pytest.raises(SystemExit) as e:
        run(script, *args)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith(f"{script}: error: ") and "\n" not in msg, msg
    return msg


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def models_from(ckpt):
    """G and D rebuilt from a checkpoint's own script and flags, with its weights, as a notebook
    user does it (SPEC.md: the checkpoint)."""
    module = load_script(ckpt["script"])
    args = module.parse_args([])
    vars(args).update(ckpt["args"])                  # the models' shapes come from the checkpoint
    G, D = module.build_models(args)
    G.load_state_dict(ckpt["G"])
    D.load_state_dict(ckpt["D"])
    return G, D


def observe(module, monkeypatch, *observers):
    """Add functions f(run, stats) to the script's Run.observers for this test: each is called at
    the end of every step's run.log(**stats), with run.step that step and run.nets its models."""
    monkeypatch.setattr(module.Run, "observers", [*module.Run.observers, *observers])


def record_steps(module, monkeypatch):
    """The numbers that each training step logs, one {name: float} per step, in order."""
    steps = []
    observe(module, monkeypatch,
            lambda run, stats: steps.append({k: v.item() for k, v in stats.items()}))
    return steps


def make_image(path, rng, size):
    """A random picture: a coloured background with a bright rectangle, so images differ."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 120, 3, dtype=np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0:y0 + h // 2, x0:x0 + w // 2] = rng.integers(130, 256, 3, dtype=np.uint8)
    Image.fromarray(img).save(path)


def make_folder(root, n=12, classes=None, seed=0):
    """n images of mixed sizes and formats under root (or under root/<class>/ for each class)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (24, 48), (16, 16), (64, 64)]
    folders = [Path(root) / c for c in classes] if classes else [Path(root)]
    for k, folder in enumerate(folders):
        (folder / "nested").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sub = folder / "nested" if i % 3 == 0 else folder  # folders are searched recursively
            make_image(sub / f"img{k}_{i}.{'png' if i % 2 else 'jpg'}", rng, sizes[i % len(sizes)])
    return Path(root)


def data_for(script, root):
    """A tiny folder that the script trains on: flat, or with three class subfolders."""
    classes = ["cat", "dog", "owl"] if script in CONDITIONAL_SCRIPTS else None
    return make_folder(Path(root) / "images", n=6 if classes else 12, classes=classes)


def tensors_equal(a, b, path="ckpt"):
    """Compare two checkpoint trees (not their flags); returns the places where tensors differ."""
    if path == "ckpt.args":
        return []
    if isinstance(a, torch.Tensor):
        same = (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [path]
        return [d for k in a for d in tensors_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path]
        pairs = enumerate(zip(a, b))
        return [d for i, (x, y) in pairs for d in tensors_equal(x, y, f"{path}[{i}]")]
    return []                                        # plain values (args, step): the tests compare


def write_idx(path, array, magic=b"\0\0\x08"):
    """An MNIST-style IDX file (gzipped if the name ends in .gz)."""
    header = magic + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@contextlib.contextmanager
def another_run_holds(folder, cwd):
    """A process that holds the lock on `folder` (under cwd), as a run writing there does."""
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import fcntl, os, time; os.makedirs({str(folder)!r}, exist_ok=True); "
        f"f = open(os.path.join({str(folder)!r}, '.lock'), 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(300)")], cwd=cwd, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()
