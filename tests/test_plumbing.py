"""The shared plumbing, tested once (its eight copies are identical: test_shared_code.py): bad input
as one line, the decode cache, Ctrl-C and SIGTERM, NaN/inf, --resume's flags, --out and its lock,
the log, notebooks. The scripts used are the smallest that show each behaviour; dcgan.py by default.
"""
import errno
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common import (REPO, another_run_holds, data_for, error_of, load, load_script, make_folder,
                    run, run_subprocess, tensors_equal, write_idx)

S = "dcgan.py"


@pytest.fixture
def data(tmp_path):
    return data_for(S, tmp_path)


def train(*args, script=S):
    return run(script, "--device", "cpu", *args)


# %% Bad input: one line, non-zero exit, no traceback
def test_bad_input_is_one_clear_line(tmp_path, data):
    assert "no such folder" in error_of(S, "--data", tmp_path / "missing", "--steps", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert "no images" in error_of(S, "--data", tmp_path / "empty", "--steps", 1)
    assert "is a file" in error_of(S, "--data", tmp_path / "empty" / "notes.txt")
    assert "--steps must be in 1..2,147,483,648, got -5" in error_of(S, "--steps", -5)
    assert "--batch-size" in error_of(S, "--batch-size", 0)
    assert "invalid int value: 'ten'" in error_of(S, "--steps", "ten")
    assert "--img-size must be" in error_of(S, "--img-size", 48)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error_of(S, "--device", "cuda", "--steps", 1)
    # a checkpoint written by another script, for --resume and for --generate
    run("lsgan.py", "--data", data, "--steps", 1, "--out", "other", "--device", "cpu")
    msg = error_of(S, "--data", data, "--steps", 2, "--out", "other", "--resume")
    assert "written by lsgan.py" in msg
    assert "written by lsgan.py" in error_of(S, "--generate", 2, "--ckpt", "other/last.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in error_of(S, "--generate", 2, "--ckpt", tmp_path / "junk.pt")
    assert "no checkpoint at" in error_of(S, "--generate", 2, "--ckpt", tmp_path / "nothing.pt")
    # a checkpoint of this script with another shape
    train("--data", data, "--steps", 1, "--out", "small", "--ngf", "4")
    msg = error_of(S, "--generate", 2, "--ckpt", "small/last.pt", "--ngf", 8)
    assert "the checkpoint's G does not fit this model" in msg


def test_absurd_numbers_are_refused(data):
    """(issue 13) 1e12 is not an integer; 10**12 images per batch or a 70-bit seed are refused
    before any memory is asked for."""
    assert "invalid int value: '1e12'" in error_of(S, "--batch-size", "1e12")
    assert "--batch-size" in error_of(S, "--data", data, "--batch-size", 10 ** 12)
    assert "--seed" in error_of(S, "--data", data, "--seed", 10 ** 21)
    assert "invalid int value" in error_of(S, "--seed", "1e21")
    assert "--batch-size must be at least 2" in error_of("vanilla_gan.py", "--batch-size", 1)


def test_misplaced_flags_are_refused(data):
    """(issue 13) --ckpt without --generate, and --label while training, were silently ignored."""
    assert "--ckpt goes with --generate" in error_of(S, "--data", data, "--ckpt", "x.pt")
    assert "--label goes with --generate" in error_of("cgan.py", "--label", 1)
    assert "unrecognized arguments: --label" in error_of(S, "--generate", 2, "--label", 1)


def test_bad_input_as_the_user_sees_it(tmp_path):
    """Through a real process: exit status 1, exactly one line on stderr, no traceback."""
    p = run_subprocess(REPO / S, "--data", tmp_path / "missing", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(f"{S}: error: ") and "missing: no such folder" in p.stderr


# %% --out: unwritable, taken, locked
def test_out_that_cannot_be_written_is_one_line(tmp_path, data):
    """(issue 13) an --out that is a file or sits under one: one line, before the data loads."""
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert "cannot write there" in error_of(S, "--data", data, "--out", out, "--steps", 1)
        # (round two) --resume reads the checkpoint first, before --out is created and locked
        assert "no checkpoint at" in error_of(S, "--data", data, "--out", out, "--resume")
    assert not (tmp_path / "cache").exists()                 # refused before anything was decoded
    train("--data", data, "--steps", 1, "--out", "ok")
    assert "cannot write there" in error_of(S, "--generate", 2, "--ckpt", "ok/last.pt",
                                            "--out", tmp_path / "file")


def test_a_second_run_never_overwrites_a_checkpoint(data):
    """(issue 13) without --resume, a folder that holds a run is refused, in one line."""
    train("--data", data, "--steps", 2, "--out", "run")
    before = load("run/last.pt")
    msg = error_of(S, "--data", data, "--steps", 2, "--out", "run")
    assert "--resume" in msg and "another --out" in msg
    assert tensors_equal(load("run/last.pt"), before) == []


def test_two_runs_on_one_folder(tmp_path, data):
    """(issue 13) a second run on a folder that another run is writing is refused; the lock of a
    process that ended (also by kill -9) is gone."""
    with another_run_holds("busy", tmp_path):
        msg = error_of(S, "--data", data, "--steps", 1, "--out", "busy")
        assert "another run is writing" in msg
    train("--data", data, "--steps", 1, "--out", "busy")    # the dead holder's lock is gone
    assert load("busy/last.pt")["step"] == 1


# %% --resume: the flags, the optimizer, the command that continues
def test_resume_takes_the_checkpoints_flags_and_explicit_ones(data):
    """(issue 13) --resume alone trains on the checkpoint's data with its flags; a flag given
    again (--lr) takes effect in the optimizers, and the checkpoint records it."""
    main = load_script(S).main                         # without the tiny flags of train()
    main(["--data", str(data), "--steps", "2", "--out", "run", "--batch-size", "4", "--lr", "3e-4",
          "--ngf", "4", "--ndf", "4", "--img-size", "16", "--device", "cpu"])
    main(["--steps", "3", "--out", "run", "--resume"])
    ckpt = load("run/last.pt")
    assert ckpt["args"]["data"] == str(data) and ckpt["args"]["batch_size"] == 4
    assert ckpt["args"]["ngf"] == 4 and ckpt["opt_G"]["param_groups"][0]["lr"] == 3e-4
    main(["--steps", "4", "--out", "run", "--resume", "--lr", "1e-5", "--betas", "0.4", "0.9"])
    ckpt = load("run/last.pt")
    for opt in ("opt_G", "opt_D"):
        assert ckpt[opt]["param_groups"][0]["lr"] == 1e-5
        assert tuple(ckpt[opt]["param_groups"][0]["betas"]) == (0.4, 0.9)
    assert ckpt["args"]["lr"] == 1e-5 and ckpt["step"] == 4
    assert "pass a larger --steps" in error_of(S, "--out", "run", "--resume")


def test_ctrl_c_prints_the_command_that_continues(tmp_path, data, monkeypatch, capsys):
    """(issue 13) the printed command holds the run's own flags (quoted) and --resume; run as
    printed, it continues the same run to the same end."""
    out = tmp_path / "my runs" / "a"
    flags = ["--data", str(data), "--batch-size", "4", "--steps", "6", "--out", str(out)]
    module = load_script(S)

    def interrupt_at_step_2(run, stats):
        if run.step == 2:                                    # during step 2: Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(module.Run, "observers", [interrupt_at_step_2])
    with pytest.raises(SystemExit) as e:
        train(*flags)
    assert e.value.code == 130
    printed = capsys.readouterr().out
    assert "stopped at step 2; continue with: python dcgan.py" in printed
    command = printed.split("continue with: ")[1].splitlines()[0]
    # (round two) the checkpoint holds every flag: the folder, the --device given, --resume
    assert command == f"python dcgan.py --out '{out}' --device cpu --resume"  # a space: quoted
    assert load(out / "last.pt")["step"] == 2
    monkeypatch.setattr(module.Run, "observers", [])
    import shlex
    argv = shlex.split(command)[2:]
    module.main(argv)
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 6 and ckpt["args"]["batch_size"] == 4
    # the notebook form
    monkeypatch.setattr(module, "NOTEBOOK", True)
    run_ = SimpleNamespace(folder=SimpleNamespace(path=Path("x y")), world=1,
                           args=module.parse_args(["--data", str(data), "--steps", "9"]))
    assert module.continue_command(run_) == "main(['--out', 'x y', '--resume'])"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint(sig, tmp_path, data):
    cmd = [sys.executable, str(REPO / S), "--ngf", "4", "--ndf", "4", "--img-size", "16",
           "--data", str(data), "--steps", "100000", "--log-every", "1", "--ckpt-every", "100000",
           "--sample-every", "100000", "--device", "cpu"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:                    # wait until training has started
        line = p.stdout.readline()
        if line.startswith("[") or not line:
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err                 # the shell's: 130 and (round two) 143
    assert "stopped at step" in out and "Traceback" not in err
    # the default --out of a folder of images: runs/<script>-<the folder's name>
    assert load(tmp_path / "runs" / "dcgan-images" / "last.pt")["step"] >= 1


def test_the_default_out_is_named_after_the_folder_as_typed(tmp_path, monkeypatch):
    """runs/<script>-<name>: the name the user gave (a link's own name, not its target's), with
    "." and a trailing "/" meaning the folder itself; MNIST alone gets runs/<script>."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    (tmp_path / "my photos").symlink_to(tmp_path / "faces")
    parse = load_script(S).parse_args
    assert parse(["--data", "my photos"]).out == "runs/dcgan-my_photos"
    assert parse(["--data", "faces/"]).out == "runs/dcgan-faces"
    monkeypatch.chdir(tmp_path / "faces")
    assert parse(["--data", "."]).out == "runs/dcgan-faces"
    assert parse([]).out == "runs/dcgan"
    assert parse(["--data", "cifar10"]).out == "runs/dcgan-cifar10"


# %% NaN and inf
def poison(module, monkeypatch):
    """From now on every real batch is NaN."""
    real_sample = module.sample_real

    def poisoned(*a, **k):
        batch = real_sample(*a, **k)
        return (batch[0] * float("nan"), *batch[1:]) if isinstance(batch, tuple) else batch * np.nan

    monkeypatch.setattr(module, "sample_real", poisoned)


@pytest.mark.parametrize("script", ["dcgan.py", "cgan.py"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(script, tmp_path, monkeypatch):
    data = data_for(script, tmp_path)
    run(script, "--data", data, "--steps", 2, "--out", "out", "--device", "cpu")
    good = load(tmp_path / "out" / "last.pt")
    poison(load_script(script), monkeypatch)
    msg = error_of(script, "--steps", 4, "--out", "out", "--resume")
    assert "NaN/inf at step 3" in msg and "out/last.pt" in msg
    assert tensors_equal(load(tmp_path / "out" / "last.pt"), good) == []  # untouched
    # (issue 13) a fresh run names no checkpoint (before: any last.pt found in --out)
    msg = error_of(script, "--data", data, "--steps", 4, "--out", "fresh", "--device", "cpu")
    assert "NaN/inf at step 1" in msg and "no checkpoint" in msg


def test_a_checkpoint_is_written_only_with_finite_weights(tmp_path, monkeypatch):
    """(issue 13) With --lr 1e8, G's weights became NaN in the update of a step whose losses
    (computed before the update) were still finite, and that step's last.pt held the NaN weights.
    Here the update of step 2 makes a weight NaN: the checkpoint of step 2 must not be written."""
    module = load_script("vanilla_gan.py")

    def nan_update_in_step_2(run, stats):
        if run.step == 2:                                    # the body of step 2, after its update
            with torch.no_grad():
                next(run.nets["G"].parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(module.Run, "observers", [nan_update_in_step_2])
    data = make_folder(tmp_path / "images", n=8)
    msg = error_of("vanilla_gan.py", "--data", data, "--device", "cpu", "--steps", 5,
                   "--ckpt-every", 1, "--out", "out")
    assert "a weight or an optimizer's state became NaN/inf at step 2" in msg
    assert "out/last.pt" in msg
    ckpt = load(tmp_path / "out" / "last.pt")
    assert ckpt["step"] == 1
    assert all(w.isfinite().all() for k in "GD" for w in ckpt[k].values() if w.is_floating_point())


# %% Checkpoints on a full disk
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    """(issue 13) torch.save fails half-way (ENOSPC): one line, no temporary file, last.pt as it
    was. (A real full disk is checked by hand; see the README.)"""
    train("--data", data, "--steps", 2, "--out", "out")
    before = load("out/last.pt")
    module = load_script(S)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.torch, "save", full_disk)
    msg = error_of(S, "--steps", 4, "--out", "out", "--resume")
    monkeypatch.setattr(module.torch, "save", real_save)
    assert "No space left on device" in msg and "last checkpoint is kept" in msg
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "tmp" in p.name) == []
    assert tensors_equal(load("out/last.pt"), before) == []


# %% The log
def test_a_damaged_log_never_stops_a_resume(tmp_path, data):
    """(issue 13) a blank line and a short row in log.csv made every later --resume crash."""
    train("--data", data, "--steps", 4, "--log-every", 1, "--out", "out")
    log = tmp_path / "out" / "log.csv"
    rows = log.read_text().splitlines()
    log.write_text("\n".join(rows[:2] + ["", "3,0.5"] + rows[3:]) + "\n")
    train("--steps", 6, "--out", "out", "--resume")
    steps = [r.split(",")[0] for r in log.read_text().splitlines()[1:]]
    assert steps == ["1", "3", "4", "5", "6"]              # the damaged rows are dropped


# %% Images in a folder
def test_corrupt_image_is_skipped_and_counted(tmp_path, data, capsys):
    bad = next(data.rglob("*.png")).with_name("broken.png")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)      # a PNG header and nothing else
    train("--data", data, "--steps", 2, "--out", "out")
    err = capsys.readouterr().err
    assert "skipped 1 of" in err and "broken.png" in err
    assert (tmp_path / "out" / "last.pt").is_file()


def test_16_bit_grey_pngs_keep_their_values(tmp_path):
    """(issue 13) 16-bit greyscale PNGs turned white: they are scaled to 8 bits."""
    folder = tmp_path / "grey16"
    folder.mkdir()
    ramp = (np.arange(16 * 16).reshape(16, 16) * 255).astype(np.uint16)  # 0 .. 65025
    for i in range(4):
        Image.fromarray(ramp).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    images = load_script(S).load_folder(load_script(S).parse_args(
        ["--data", str(folder), "--img-size", "16", "--channels", "1"]))[0]
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(images[0, 0]), expected)


def test_second_run_uses_the_decode_cache(tmp_path, data, capsys):
    before = sorted(p.name for p in data.rglob("*"))
    train("--data", data, "--steps", 1, "--out", "a")
    assert "decoded once" in capsys.readouterr().out
    train("--data", data, "--steps", 1, "--out", "b")
    out = capsys.readouterr().out
    assert "from the decode cache" in out and "decoded once" not in out
    assert sorted(p.name for p in data.rglob("*")) == before  # nothing written into the data
    # (issue 13) a changed file: decoded again, and the old cache goes; one per folder and size
    next(data.rglob("*.jpg")).unlink()
    train("--data", data, "--steps", 1, "--out", "c")
    assert "decoded once" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    train("--data", data, "--steps", 1, "--out", "d", "--img-size", 32)   # another size: its own
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_a_damaged_cache_is_decoded_again(tmp_path, data, capsys):
    """(issue 13) a truncated or garbage cache file: a warning, then decoding again."""
    train("--data", data, "--steps", 1, "--out", "a")
    cache = next((tmp_path / "cache").glob("*.npz"))
    for damage in (cache.read_bytes()[:100], b"garbage"):
        cache.write_bytes(damage)
        train("--data", data, "--steps", 1, "--out", f"b{len(damage)}")
        captured = capsys.readouterr()
        assert "is damaged" in captured.err and "decoded once" in captured.out
        assert np.load(cache)["images"].shape[0] == 12       # replaced by a good one


def test_an_interrupted_cache_write_leaves_nothing(tmp_path, data, monkeypatch):
    """(issue 13) a SIGTERM during the cache write left a .npz.tmp (212 MB at 256 px): the partial
    file goes; a stale one of a killed run is removed by the next write."""
    module = load_script(S)
    real_savez = np.savez

    def interrupted(f, **arrays):
        f.write(b"partial")
        # what the SIGTERM handler raises before training
        raise KeyboardInterrupt

    monkeypatch.setattr(module.np, "savez", interrupted)
    with pytest.raises(SystemExit) as e:
        train("--data", data, "--steps", 1, "--out", "a")
    assert e.value.code == 130
    monkeypatch.setattr(module.np, "savez", real_savez)
    assert list((tmp_path / "cache").iterdir()) == []
    train("--data", data, "--steps", 1, "--out", "b")
    cache = next((tmp_path / "cache").glob("*.npz"))
    stale = cache.with_name(f".{cache.name}.99999.tmp")
    stale.write_bytes(b"left by kill -9")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    next(data.rglob("*.jpg")).unlink()                   # a change: a new cache is written
    train("--data", data, "--steps", 1, "--out", "c")
    assert [p.name for p in (tmp_path / "cache").iterdir()] != [] and not stale.exists()


def test_a_class_of_unreadable_images_is_no_class(tmp_path, capsys):
    """(issue 13) a subfolder whose images are all unreadable counted as a class."""
    data = make_folder(tmp_path / "images", n=4, classes=["a", "b"])
    (data / "junk").mkdir()
    (data / "junk" / "x.png").write_bytes(b"not a png")
    run("cgan.py", "--data", data, "--steps", 1, "--out", "out", "--device", "cpu")
    assert load(tmp_path / "out" / "last.pt")["classes"] == ["a", "b"]
    assert "junk" in capsys.readouterr().err


def test_a_run_does_not_train_on_its_own_outputs(tmp_path):
    """(issue 13) --data . with --out inside it: the grids of earlier runs are not training data."""
    make_folder(tmp_path, n=6)
    train("--data", ".", "--steps", 1, "--out", "runs/a", "--sample-every", 1)
    train("--data", ".", "--steps", 1, "--out", "runs/b")
    assert len(load_script(S).load_folder(load_script(S).parse_args(
        ["--data", ".", "--out", "runs/b", "--img-size", "16"]))[0]) == 6


def test_amp_and_compile_fall_back_on_cpu(data, capsys):
    train("--data", data, "--steps", 2, "--out", "out", "--amp", "--compile")
    out = capsys.readouterr().out
    assert "--amp is for CUDA" in out and "--compile is for CUDA" in out
    assert load("out/last.pt")["step"] == 2


# %% MNIST files
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_files_are_read_where_they_lie(tmp_path, gz):
    """Fashion-MNIST in a folder that holds only its files (as ../shared/data or a Kaggle input)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", labels)
    raw.chmod(0o555)                                             # read-only, as a Kaggle input
    module = load_script("vanilla_gan.py")
    args = module.parse_args(["--data", "fashion-mnist", "--data-root", str(tmp_path / "root")])
    got, got_labels, classes = module.load_named(args)
    assert np.array_equal(got[:, 0].numpy(), images) and np.array_equal(got_labels, labels)
    assert classes[0] == "T-shirt/top" and len(classes) == 10
    dc = load_script("dcgan.py")
    args = dc.parse_args(["--data", "fashion-mnist", "--data-root", str(tmp_path / "root")])
    assert dc.load_named(args)[0].shape == (50, 1, 32, 32)      # DCGAN's MNIST-like default size
    raw.chmod(0o755)


def test_broken_idx_files_are_one_line(tmp_path):
    """(issue 13) truncated, not gzip, empty, or a label file shorter than the images'."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = np.zeros((20, 28, 28)), np.zeros(20)
    cases = {
        "truncated": lambda: (raw / "train-images-idx3-ubyte.gz").write_bytes(
            (raw / "train-images-idx3-ubyte.gz").read_bytes()[:50]),
        "not gzip": lambda: (raw / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes"),
        "empty": lambda: (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"")),
        "short labels": lambda: write_idx(raw / "train-labels-idx1-ubyte.gz", labels[:7]),
    }
    for name, damage in cases.items():
        write_idx(raw / "train-images-idx3-ubyte.gz", images)
        write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
        damage()
        msg = error_of(S, "--data", "mnist", "--data-root", tmp_path, "--steps", 1)
        assert "delete" in msg and str(raw) in msg, (name, msg)


def test_mnist_without_network_falls_back_and_leaves_no_litter(tmp_path, monkeypatch, capsys):
    """Offline, --data mnist trains on the bundled subset with one warning, and (issue 13) leaves
    no empty data/MNIST/raw behind."""
    module = load_script(S)
    real = module.torchvision.datasets.MNIST

    def offline(root, **kw):
        os.makedirs(os.path.join(root, "MNIST", "raw"), exist_ok=True)   # as torchvision does
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(module.torchvision.datasets, "MNIST", offline)
    train("--data", "mnist", "--data-root", "data", "--steps", 1, "--out", "out")
    monkeypatch.setattr(module.torchvision.datasets, "MNIST", real)
    warning = [line for line in capsys.readouterr().err.splitlines() if "mnist-mini" in line]
    assert len(warning) == 1 and "no network" in warning[0]
    assert load(tmp_path / "out" / "last.pt")["step"] == 1
    assert not (tmp_path / "data").exists()


# %% Notebooks (in this process; test_notebook.py runs a real Jupyter kernel)
def test_arguments_and_errors_inside_a_notebook(monkeypatch, tmp_path, capsys):
    """Jupyter starts the kernel with its own argv: a pasted script uses its defaults, main([...])
    still takes flags, and an error is one printed line, after which main() returns."""
    module = load_script(S)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1234.json"])
    monkeypatch.setattr(module, "NOTEBOOK", True)
    args = module.parse_args()
    assert args.data == "mnist" and args.out == "runs/dcgan"
    assert module.parse_args(["--steps", "7"]).steps == 7
    assert module.main(["--data", str(tmp_path / "missing")]) is None      # no exception
    assert capsys.readouterr().err.strip() == \
        f"dcgan.py: error: --data {tmp_path / 'missing'}: no such folder, and not a dataset name " \
        "(mnist, fashion-mnist, cifar10, mnist-mini)"
    monkeypatch.setattr(module, "NOTEBOOK", False)
    with pytest.raises(SystemExit):                  # outside a notebook, the same argv is an error
        module.parse_args()
