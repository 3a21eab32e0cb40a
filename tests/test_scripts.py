"""Every training script end to end on tiny data it never downloads: the outputs, exact resume,
--generate, and running alone in an empty folder. What only the shared plumbing does (errors, the
decode cache, Ctrl-C, NaN, locks, notebooks) is tested once, in test_plumbing.py: the copies of that
block are identical (test_shared_code.py)."""
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from common import (CONDITIONAL_SCRIPTS, IMG, REPO, SCRIPTS, TINY, data_for, load, models_from,
                    run, tensors_equal)


def grid_size(n_images, nrow=8, size=IMG, padding=2):
    """Width and height of torchvision's make_grid for n images of size x size."""
    cols, rows = min(n_images, nrow), -(-n_images // nrow)
    return cols * (size + padding) + padding, rows * (size + padding) + padding


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_writes_every_output(script, tmp_path):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 6, "--log-every", 2, "--sample-every", 3,
        "--ckpt-every", 3, "--out", "out", "--device", "cpu")
    out = tmp_path / "out"
    for name in ["real.png", "samples/000003.png", "samples/000006.png", "last.pt", "log.csv",
                 "loss.png"]:
        assert (out / name).is_file(), name

    n_real = 18 if script in CONDITIONAL_SCRIPTS else 12
    assert Image.open(out / "real.png").size == grid_size(n_real)
    n_samples = 64 if script not in CONDITIONAL_SCRIPTS else 3 * 8
    assert Image.open(out / "samples" / "000006.png").size == grid_size(n_samples)

    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and rows[0].endswith(",img_per_s")
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]  # one row per logged step

    ckpt = load(out / "last.pt")
    for key in ["script", "step", "args", "G", "D", "opt_G", "opt_D", "fixed_noise", "rng"]:
        assert key in ckpt, key
    assert ckpt["script"] == script and ckpt["step"] == 6
    # the checkpoint's G and D load into models built from its flags, as a notebook user does it
    models_from(ckpt)


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_is_exact(script, tmp_path):
    """N steps in one go == N/2 steps, then --resume to N: every tensor of last.pt is identical."""
    data = data_for(script, tmp_path)
    common = ["--data", data, "--device", "cpu", "--seed", 3, "--log-every", 2, "--sample-every", 4]
    run(script, *common, "--steps", 8, "--out", "straight")
    run(script, *common, "--steps", 4, "--out", "split")
    halfway = load(tmp_path / "split" / "last.pt")
    run(script, "--steps", 8, "--out", "split", "--resume")     # the other flags: the checkpoint's
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert tensors_equal(a, b) == []
    differ = {".".join(d.split(".")[:2]) for d in tensors_equal(a, halfway)}
    assert {"ckpt.G", "ckpt.opt_D", "ckpt.rng"} <= differ        # the check can fail
    logged = [r.split(",")[0] for r in (tmp_path / "split" / "log.csv").read_text().splitlines()]
    assert logged[1:] == ["2", "4", "6", "8"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_writes_n_images(script, tmp_path):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 2, "--out", "train", "--device", "cpu")
    run(script, "--generate", 10, "--ckpt", tmp_path / "train" / "last.pt", "--out", "gen",
        "--device", "cpu")
    files = sorted((tmp_path / "gen").glob("*.png"))
    assert len(files) == 10
    if script not in CONDITIONAL_SCRIPTS:
        assert [f.name for f in files] == [f"{i:06d}.png" for i in range(10)]
    assert all(Image.open(f).size == (IMG, IMG) for f in files)


ALONE = """
import runpy, shutil, sys
from pathlib import Path
for name, flags in {runs!r}:
    folder = Path(name[:-3])
    folder.mkdir()
    shutil.copy(Path({repo!r}) / name, folder / name)
    sys.argv = [name, *flags]
    try:
        runpy.run_path(str(folder / name), run_name="__main__")
    except SystemExit as e:
        sys.exit(f"{{name}}: {{e.code}}")
    assert (Path("runs") / (name[:-3] + "-images") / "last.pt").is_file(), name  # by the data
"""


def test_every_script_runs_alone_in_an_empty_folder(tmp_path):
    """One file pasted anywhere (a notebook, a fresh folder) must run: no import from the
    repository (wgan.py and wgan_gp.py define their own fallbacks of the kernels). One process
    runs all eight, each from its own folder, with the repository off sys.path."""
    runs = [(s, [*TINY[s], "--data", str(data_for(s, tmp_path / s[:-3])), "--steps", "2",
                 "--device", "cpu"]) for s in SCRIPTS]
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    p = subprocess.run([sys.executable, "-c", ALONE.format(runs=runs, repo=str(REPO))], cwd=work,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "kernels" not in p.stdout                       # nothing said about a missing package
    for s in SCRIPTS:
        assert (work / "runs" / f"{s[:-3]}-images" / "last.pt").is_file()
    shutil.rmtree(work)
