"""Every training script end to end on tiny data it never has to download: outputs, exact resume,
--generate, bad input, Ctrl-C, NaN, running alone in an empty folder. Runs on a CPU in seconds."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from common import (CONDITIONAL_SCRIPTS, IMG, REPO, TINY, load_script, make_folder, run, run_subprocess,
                    tensors_equal)

SCRIPTS = sorted(TINY)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder, with its own decode cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def data_for(script, tmp_path):
    classes = ["cat", "dog", "owl"] if script in CONDITIONAL_SCRIPTS else None
    return make_folder(tmp_path / "images", n=6 if classes else 12, classes=classes)


def grid_size(n_images, nrow=8, size=IMG, padding=2):
    """Width and height of torchvision's make_grid for n images of size x size."""
    cols, rows = min(n_images, nrow), -(-n_images // nrow)
    return cols * (size + padding) + padding, rows * (size + padding) + padding


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_writes_every_output(script, tmp_path):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 6, "--log-every", 2, "--sample-every", 3, "--ckpt-every", 3,
        "--out", "out", "--device", "cpu")
    out = tmp_path / "out"
    for name in ["real.png", "samples/000003.png", "samples/000006.png", "last.pt", "log.csv", "loss.png"]:
        assert (out / name).is_file(), name

    n_real = 18 if script in CONDITIONAL_SCRIPTS else 12
    assert Image.open(out / "real.png").size == grid_size(n_real)
    n_samples = 64 if script not in CONDITIONAL_SCRIPTS else 3 * 8
    assert Image.open(out / "samples" / "000006.png").size == grid_size(n_samples)

    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,")
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]  # one row per logged step

    ckpt = load(out / "last.pt")
    for key in ["script", "step", "args", "G", "D", "opt_G", "opt_D", "fixed_noise", "rng"]:
        assert key in ckpt, key
    assert ckpt["script"] == script and ckpt["step"] == 6
    # the checkpoint's G loads into a freshly built generator, as a notebook user would do it
    module = load_script(script)
    args = module.parse_args([*TINY[script], "--channels", "3"])
    for flag in module.ARCH_FLAGS:
        setattr(args, flag, ckpt["args"][flag])
    if script in CONDITIONAL_SCRIPTS:
        args.n_classes = len(ckpt["classes"])
    G = module.build_models(args)[0]
    G.load_state_dict(ckpt["G"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_is_exact(script, tmp_path):
    """N steps in one go == N/2 steps, then --resume to N: every tensor of last.pt is identical."""
    data = data_for(script, tmp_path)
    common = ["--data", data, "--device", "cpu", "--seed", 3, "--log-every", 2, "--sample-every", 4]
    run(script, *common, "--steps", 8, "--out", "straight")
    run(script, *common, "--steps", 4, "--out", "split")
    halfway = load(tmp_path / "split" / "last.pt")
    run(script, *common, "--steps", 8, "--out", "split", "--resume")
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert tensors_equal(a, b) == []
    assert {"ckpt.G", "ckpt.opt_D", "ckpt.rng"} <= {d.split(".")[0] + "." + d.split(".")[1]
                                                    for d in tensors_equal(a, halfway)}  # the check can fail
    logged = [r.split(",")[0] for r in (tmp_path / "split" / "log.csv").read_text().splitlines()[1:]]
    assert logged == ["2", "4", "6", "8"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_writes_n_images(script, tmp_path):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 2, "--out", "train", "--device", "cpu")
    run(script, "--generate", 10, "--ckpt", tmp_path / "train" / "last.pt", "--out", "gen", "--device", "cpu")
    files = sorted((tmp_path / "gen").glob("*.png"))
    assert len(files) == 10
    if script not in CONDITIONAL_SCRIPTS:
        assert [f.name for f in files] == [f"{i:06d}.png" for i in range(10)]
    assert all(Image.open(f).size == (IMG, IMG) for f in files)


def error_of(script, *args):
    with pytest.raises(SystemExit) as e:
        run(script, *args)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith(f"{script}: error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_clear_line(script, tmp_path):
    assert "no such folder" in error_of(script, "--data", tmp_path / "missing", "--steps", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert "no images" in error_of(script, "--data", tmp_path / "empty", "--steps", 1)
    assert "--steps must be a positive integer" in error_of(script, "--steps", -5)
    assert "--batch-size" in error_of(script, "--batch-size", 0)
    assert "invalid int value" in error_of(script, "--steps", "ten")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error_of(script, "--device", "cuda", "--steps", 1)

    # a checkpoint written by another script, for --resume and for --generate
    other = next(s for s in sorted(TINY) if s != script)
    run(other, "--data", data_for(other, tmp_path / "o"), "--steps", 1, "--out", "other", "--device", "cpu")
    msg = error_of(script, "--data", data_for(script, tmp_path), "--steps", 2, "--out", "other", "--resume")
    assert f"written by {other}" in msg
    msg = error_of(script, "--generate", 2, "--ckpt", tmp_path / "other" / "last.pt")
    assert f"written by {other}" in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in error_of(script, "--generate", 2, "--ckpt", tmp_path / "junk.pt")
    assert "no checkpoint at" in error_of(script, "--generate", 2, "--ckpt", tmp_path / "nothing.pt")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_as_the_user_sees_it(script, tmp_path):
    """Through a real process: non-zero exit, exactly one line on stderr, no traceback. (One case per
    script: a process start costs seconds; test_bad_input_is_one_clear_line covers the rest in-process.)"""
    p = run_subprocess(REPO / script, "--data", tmp_path / "missing", cwd=tmp_path)
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith(f"{script}: error: ")
    assert "missing: no such folder" in p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_corrupt_image_is_skipped_and_counted(script, tmp_path, capsys):
    data = data_for(script, tmp_path)
    bad = next(data.rglob("*.png")).with_name("broken.png")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)   # a PNG header and nothing else
    run(script, "--data", data, "--steps", 2, "--out", "out", "--device", "cpu")
    err = capsys.readouterr().err
    assert "skipped 1 of" in err and "broken.png" in err
    assert (tmp_path / "out" / "last.pt").is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_second_run_uses_the_decode_cache(script, tmp_path, capsys):
    data = data_for(script, tmp_path)
    before = sorted(p.name for p in data.rglob("*"))
    run(script, "--data", data, "--steps", 1, "--out", "a", "--device", "cpu")
    assert "decoded" in capsys.readouterr().out
    run(script, "--data", data, "--steps", 1, "--out", "b", "--device", "cpu")
    out = capsys.readouterr().out
    assert "from the decode cache" in out and "decoded" not in out
    assert sorted(p.name for p in data.rglob("*")) == before  # nothing written into the data folder
    # a changed file invalidates the cache
    next(data.rglob("*.jpg")).unlink()
    run(script, "--data", data, "--steps", 1, "--out", "c", "--device", "cpu")
    assert "decoded" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_alone_in_an_empty_folder(script, tmp_path):
    """One file pasted anywhere (a notebook, a fresh folder) must run: no imports from the repository."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / script, alone / script)
    data = data_for(script, tmp_path)
    p = run_subprocess(alone / script, *TINY[script], "--data", data, "--steps", 2, "--device", "cpu",
                       cwd=alone, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (alone / "runs" / script[:-3] / "last.pt").is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_amp_and_compile_fall_back_on_cpu(script, tmp_path, capsys):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 2, "--out", "out", "--device", "cpu", "--amp", "--compile")
    out = capsys.readouterr().out
    assert "--amp" in out and "--compile" in out
    assert load(tmp_path / "out" / "last.pt")["step"] == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_saves_a_checkpoint(script, tmp_path):
    data = data_for(script, tmp_path)
    cmd = [sys.executable, str(REPO / script), *TINY[script], "--data", str(data), "--steps", "100000",
           "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "100000", "--device", "cpu"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:                    # wait until training has started
        line = p.stdout.readline()
        if line.startswith("[") or not line:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "stopped at step" in out
    ckpt = load(tmp_path / "runs" / script[:-3] / "last.pt")
    assert ckpt["step"] >= 1 and f"--resume" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(script, tmp_path, monkeypatch):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 2, "--out", "out", "--device", "cpu")
    good = load(tmp_path / "out" / "last.pt")
    module = load_script(script)
    real_sample = module.sample_real

    def poisoned(*a, **k):                           # from now on every real batch is NaN
        batch = real_sample(*a, **k)
        if isinstance(batch, tuple):
            return (batch[0] * float("nan"), *batch[1:])
        return batch * float("nan")

    monkeypatch.setattr(module, "sample_real", poisoned)
    msg = error_of(script, "--data", data, "--steps", 4, "--out", "out", "--device", "cpu", "--resume")
    assert "NaN/inf at step 3" in msg
    assert tensors_equal(load(tmp_path / "out" / "last.pt"), good) == []  # untouched


@pytest.mark.parametrize("script", SCRIPTS)
def test_arguments_inside_a_notebook(script, monkeypatch):
    """Jupyter starts the kernel with its own argv (-f kernel.json): a pasted script must use its defaults,
    and main(["--steps", ...]) must still take flags."""
    module = load_script(script)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1234.json"])
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel", type(sys)("ipykernel")))
    args = module.parse_args()
    assert args.data == "mnist" and args.out.endswith(script[:-3])
    assert module.parse_args(["--steps", "7"]).steps == 7
    monkeypatch.delitem(sys.modules, "ipykernel")
    with pytest.raises(SystemExit):                  # outside a notebook, the same argv is an error
        module.parse_args()
