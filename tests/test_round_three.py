"""Nothing lost, round three: --generate never replaces a file, a run resumes only on its own data,
a checkpoint's flags go through the command line's parser, and the rough edges a newcomer met. Each
test names its case of the round-three probe; each failed on the code before it."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import (CONDITIONAL_SCRIPTS, REPO, SCRIPTS, TINY, another_run_holds, data_for,
                    error_of, load, load_script, make_folder, run, run_subprocess, write_idx)

S = "dcgan.py"


def train(*args, script=S):
    return run(script, "--device", "cpu", *args)


def files(folder):
    """Every file under the folder and its bytes: equal before and after means nothing changed."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run of every script on its tiny data, made once; tests copy what they change."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        m.setenv("GAN_CACHE_DIR", str(root / "cache"))
        for script in SCRIPTS:
            data = data_for(script, root / script[:-3])
            train("--data", data, "--steps", 2, "--log-every", 1, "--out",
                  root / script[:-3] / "run", script=script)
    return root


# %% (1, 2, 17, 24) --generate
@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_never_replaces_a_file(script, runs, tmp_path):
    """(1) A folder of the user's own 000001.png ... passed the old guard (no *000000.png) and was
    overwritten; so were a run's sample grids. Now any name it would write refuses it, in one
    line that names a free folder, before anything is written."""
    ckpt = runs / script[:-3] / "run" / "last.pt"
    frames = tmp_path / "frames"
    frames.mkdir()
    first = "1_000001.png" if script in CONDITIONAL_SCRIPTS else "000001.png"
    Image.new("RGB", (4, 4), "red").save(frames / first)
    before = files(frames)
    msg = error_of(script, "--generate", 6, "--ckpt", ckpt, "--out", frames, "--device", "cpu")
    assert f"holds {first} already" in msg and f"--out {frames}-2" in msg, msg
    assert files(frames) == before
    run(script, "--generate", 6, "--ckpt", ckpt, "--out", f"{frames}-2", "--device", "cpu")
    assert len(list(Path(f"{frames}-2").glob("*.png"))) == 6


def test_generate_never_replaces_the_sample_grids(runs, tmp_path):
    """(1) --generate N --out RUN/samples replaced the grids, named by step (000002.png here)."""
    x = Path(shutil.copytree(runs / "dcgan" / "run", tmp_path / "x"))
    before = files(x)
    assert "holds 000002.png already" in error_of(S, "--generate", 3, "--ckpt", x / "last.pt",
                                                  "--out", x / "samples")
    assert files(x) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_generates_on_one_folder(script, runs, tmp_path):
    """(2) Two --generate runs on one --out both said "wrote", and the folder held only the second
    run's. --generate takes the lock: while another run holds the folder it is refused, and
    after the first one the names it wrote refuse the second."""
    ckpt = runs / script[:-3] / "run" / "last.pt"
    with another_run_holds("gen", tmp_path):
        assert "another run is writing to gen" in error_of(script, "--generate", 2, "--ckpt", ckpt,
                                                           "--out", "gen")
    run(script, "--generate", 2, "--ckpt", ckpt, "--out", "gen", "--device", "cpu")
    before = files(tmp_path / "gen")
    assert "already" in error_of(script, "--generate", 2, "--ckpt", ckpt, "--out", "gen")
    assert files(tmp_path / "gen") == before


def test_generate_has_a_folder_of_its_own(runs, tmp_path):
    """(24) Without --out, --generate wrote its PNGs among the run's checkpoints; now into
    <run>/generated/."""
    x = Path(shutil.copytree(runs / "dcgan" / "run", tmp_path / "x"))
    train("--generate", 3, "--ckpt", x / "last.pt")
    assert sorted(p.name for p in (x / "generated").glob("*.png")) == \
        ["000000.png", "000001.png", "000002.png"]
    assert {p.name for p in x.glob("*.png")} <= {"real.png", "loss.png"}  # none among the run's


def test_generate_writes_each_image_whole(runs, tmp_path, monkeypatch):
    """(17) A full disk left a 0-byte PNG: images are written to a temporary file and renamed."""
    module = load_script(S)

    def full_disk(tensor, fp, *args, **kw):
        Path(fp).write_bytes(b"\x89PNG")                    # a part, then no space
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_image", full_disk)
    msg = error_of(S, "--generate", 2, "--ckpt", runs / "dcgan" / "run" / "last.pt", "--out", "gen")
    assert "No space left on device" in msg
    assert not (tmp_path / "gen").exists()                  # no PNG, whole or in part


# %% (3, 19) log.csv
@pytest.mark.parametrize("script", SCRIPTS)
def test_one_damaged_cell_keeps_the_rest_of_the_log(script, runs, tmp_path):
    """(3) One empty cell in log.csv, then --resume, left only the new rows: read_log returned []
    on any ValueError. Now the damaged row alone is dropped, and the file is kept as
    log.csv.damaged."""
    x = Path(shutil.copytree(runs / script[:-3] / "run", tmp_path / "x"))
    header, row1, row2 = (x / "log.csv").read_text().splitlines()
    damaged = "\n".join([header, row1, row2.replace(",", ",,", 1).replace(",,", ",", 1)
                         .rsplit(",", 1)[0] + ","]) + "\n"       # its last cell emptied
    (x / "log.csv").write_text(damaged)
    train("--resume", x / "last.pt", "--steps", 3, "--log-every", 1, script=script)
    steps = [line.split(",")[0] for line in (x / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "3"]
    assert (x / "log.csv.damaged").read_text() == damaged
    (x / "log.csv").write_text(header + "\n" + ",".join(["3"] + [""] * header.count(",")) + "\n")
    train("--resume", x / "last.pt", "--steps", 4, "--log-every", 1, script=script)  # all damaged
    assert (x / "log.csv").read_text().splitlines()[0] == header      # a new file, with its header


def test_log_rows_are_appended_and_loss_png_drawn_with_the_grids(tmp_path, monkeypatch):
    """(19) log.csv and loss.png were rewritten in full at every log line (a 200,000-row log: 57 s
    for 20 steps). Now a row is appended (the file is the same file after a resume), and
    loss.png is drawn when a grid is written."""
    module = load_script(S)
    drawn = []
    monkeypatch.setattr(module, "plot", lambda rows, *a: drawn.append(len(rows)))
    data = make_folder(tmp_path / "images", n=12)
    train("--data", data, "--steps", 4, "--log-every", 1, "--sample-every", 2, "--out", "x")
    inode = os.stat(tmp_path / "x" / "log.csv").st_ino
    train("--steps", 8, "--log-every", 1, "--sample-every", 2, "--out", "x", "--resume")
    assert os.stat(tmp_path / "x" / "log.csv").st_ino == inode
    rows = (tmp_path / "x" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", *map(str, range(1, 9))]
    assert drawn == [2, 4, 6, 8]                            # at each grid, with the rows so far


def test_a_full_disk_keeps_the_log_whole(runs, tmp_path, monkeypatch):
    """(19) A disk that takes half of a row: the row is cut back, the earlier rows are kept, the
    run warns and trains on."""
    module = load_script(S)
    x = Path(shutil.copytree(runs / "dcgan" / "run", tmp_path / "x"))
    before, real_open = (x / "log.csv").read_text(), open

    class HalfWrites:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            return self.f.write(data[:len(data) // 2])

    def full_disk(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return HalfWrites(f) if mode == "ab" else f

    monkeypatch.setattr(module, "open", full_disk, raising=False)
    train("--resume", x / "last.pt", "--steps", 4, "--log-every", 1)
    assert (x / "log.csv").read_text() == before and load(x / "last.pt")["step"] == 4


# %% (4, 5) a run resumes on its own data
def test_relative_paths_are_kept_absolute(tmp_path, monkeypatch):
    """(4) A run started with --data ../data/small, resumed from another folder, trained on that
    folder's ../data/small. Now the checkpoint holds absolute paths; the run goes on with its
    images; changed images are refused in one line, unless --data is typed."""
    (tmp_path / "a" / "work").mkdir(parents=True)
    (tmp_path / "b" / "work").mkdir(parents=True)
    make_folder(tmp_path / "a" / "data" / "small", n=12)
    make_folder(tmp_path / "b" / "data" / "small", n=7, seed=1)
    monkeypatch.chdir(tmp_path / "a" / "work")
    train("--data", "../data/small", "--steps", 2, "--out", tmp_path / "run")
    monkeypatch.chdir(tmp_path / "b" / "work")
    train("--resume", tmp_path / "run" / "last.pt", "--steps", 3)
    ckpt = load(tmp_path / "run" / "last.pt")
    assert ckpt["args"]["data"] == str(tmp_path / "a" / "data" / "small")
    assert ckpt["args"]["images"] == 12
    make_folder(tmp_path / "a" / "data" / "small" / "more", n=2, seed=2)   # two more images
    msg = error_of(S, "--resume", tmp_path / "run" / "last.pt", "--steps", 4)
    assert "(12 images); this is" in msg and "(14 images)" in msg and "give --data" in msg
    train("--resume", tmp_path / "run" / "last.pt", "--steps", 4, "--data",
          tmp_path / "a" / "data" / "small")                # typed: the user's decision
    assert load(tmp_path / "run" / "last.pt")["args"]["images"] == 14


def test_the_full_mnist_is_never_swapped_for_the_subset(tmp_path, monkeypatch, capsys):
    """(4, 23) With --data mnist --data-root ./data, a resume from elsewhere fell back from the
    full MNIST to the bundled 10,000-image subset with a warning only. Now it is refused; and
    offline the data line says mnist-mini, with the network's reason in the warning."""
    module = load_script(S)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 100))
    train("--data", "mnist", "--data-root", "data", "--steps", 1, "--out", "run")
    shutil.rmtree(tmp_path / "data")

    def offline(root, **kw):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(module.torchvision.datasets, "MNIST", offline)
    capsys.readouterr()
    msg = error_of(S, "--resume", "run/last.pt", "--steps", 2)
    assert "trained on mnist (100 images); this is mnist-mini (10,000 images)" in msg
    err = capsys.readouterr().err
    assert "Name or service not known" in err               # the reason, not an empty one
    train("--data", "mnist", "--steps", 1, "--out", "offline")
    out = capsys.readouterr().out
    assert "data: mnist-mini, 10000 images" in out


def test_two_folders_of_one_name_never_share_a_run(tmp_path):
    """(5) --data /a/small and then --data /b/small both default to runs/dcgan-small; the refusal
    said "add --resume", which continued run A on data B. Now it names the other data and a free
    folder; the same folder typed again is told to add --resume, and both do what they say."""
    make_folder(tmp_path / "a" / "small", n=12)
    make_folder(tmp_path / "b" / "small", n=7, seed=1)
    train("--data", tmp_path / "a" / "small", "--steps", 1)
    before = files(tmp_path / "runs" / "dcgan-small")
    msg = error_of(S, "--data", tmp_path / "b" / "small", "--steps", 1)
    assert f"holds a run already: on {tmp_path / 'a' / 'small'}; give another --out, e.g. --out " \
        "runs/dcgan-small-2" in msg and "--resume" not in msg
    assert files(tmp_path / "runs" / "dcgan-small") == before
    train("--data", tmp_path / "b" / "small", "--steps", 1, "--out", "runs/dcgan-small-2")
    assert "add --resume" in error_of(S, "--data", tmp_path / "a" / "small", "--steps", 2)
    train("--data", tmp_path / "a" / "small", "--resume", "--steps", 2)
    ckpt = load(tmp_path / "runs" / "dcgan-small" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["data"] == str(tmp_path / "a" / "small")
    assert load(tmp_path / "runs" / "dcgan-small-2" / "last.pt")["args"]["images"] == 7


# %% (6, 7, 8, 9) tracebacks
@pytest.mark.parametrize("flag", ["--out", "--data", "--resume", "--ckpt", "--data-root"])
def test_names_too_long_are_one_line(flag):
    """(6) A path component over 255 characters gave an OSError traceback from Path.exists()."""
    extra = ["--generate", "1"] if flag == "--ckpt" else ["--data", "mnist"] * (flag ==
                                                                                "--data-root")
    msg = error_of(S, flag, "x" * 300, *extra)
    assert "File name too long" in msg
    assert "File name too long" in error_of(S, "--out", "/".join(["y" * 200] * 25))


def test_out_of_memory_is_one_line(tmp_path, monkeypatch):
    """(7) Running out of memory while the images were read ended in a traceback (or, without a
    limit, in the kernel's OOM killer with no word): one line, with what to do."""
    module = load_script(S)

    def no_memory(*a, **kw):
        raise MemoryError("Unable to allocate 9.96 GiB")

    monkeypatch.setattr(module, "decode_folder", no_memory)
    msg = error_of(S, "--data", make_folder(tmp_path / "images"), "--steps", 1)
    assert "MemoryError: Unable to allocate 9.96 GiB; a smaller --img-size?" in msg


def test_a_name_that_is_not_utf8_prints(tmp_path):
    """(8) A folder name that is not UTF-8, with a strict stdout encoding: a UnicodeEncodeError
    traceback from a print. Now such a name prints escaped."""
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    make_folder(folder, n=6)
    flags = [*TINY[S], "--device", "cpu", "--steps", 1, "--data", folder, "--out", "out"]
    res = run_subprocess(REPO / S, *flags, cwd=tmp_path, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "caf\\udce9" in res.stdout or "caf\\xe9" in res.stdout


def test_ctrl_c_while_torch_loads(tmp_path):
    """(9) Ctrl-C during `import torch` printed Python's KeyboardInterrupt traceback. Now the
    process ends as Ctrl-C ends it (status 130 in a shell), with nothing printed. (A sitecustomize
    makes the import of torch take seconds, so that the signal lands in it on any machine.)"""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(
        "import sys, time\n"
        "class Slow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        time.sleep(30) if name == 'torch' else None\n"
        "sys.meta_path.insert(0, Slow())\n")
    p = subprocess.Popen([sys.executable, str(REPO / S), "--help"], cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "slow")})
    time.sleep(3)                                           # (inside the import of torch now)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode in (-signal.SIGINT, 130) and err == "", err


# %% (10, 11) a checkpoint's flags, read by the command line's parser
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoints_flags_are_parsed_as_typed(script, runs, tmp_path):
    """(10) Flags of a hand-edited or older checkpoint: channels='3' was a TypeError, img_size=16.0
    blamed the images. Now they go through the parser: '3' means 3, as typed; a 100.0 is refused
    as --latent-dim 100.0 would be, in one line that names the checkpoint."""
    ckpt = load(runs / script[:-3] / "run" / "last.pt")
    ckpt["args"]["channels"] = str(ckpt["args"]["channels"])
    torch.save(ckpt, tmp_path / "str.pt")
    run(script, "--generate", 2, "--ckpt", tmp_path / "str.pt", "--out", "gen", "--device", "cpu")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 2
    ckpt["args"]["latent_dim"] = float(ckpt["args"]["latent_dim"])
    torch.save(ckpt, tmp_path / "float.pt")
    for how in (["--generate", 2, "--ckpt", tmp_path / "float.pt"],
                ["--resume", tmp_path / "float.pt", "--out", "new", "--steps", 4]):
        msg = error_of(script, *how)
        assert f"{tmp_path / 'float.pt'} holds a flag that would be refused" in msg
        assert f"--latent-dim: invalid int value: '{ckpt['args']['latent_dim']}'" in msg


@pytest.mark.parametrize("script", sorted(CONDITIONAL_SCRIPTS))
def test_the_classes_come_from_their_names(script, runs, tmp_path):
    """(10) A checkpoint without n_classes was a TypeError under --generate; classes longer than
    n_classes an IndexError. The number of classes is now that of the checkpoint's names."""
    ckpt = load(runs / script[:-3] / "run" / "last.pt")
    del ckpt["args"]["n_classes"]
    torch.save(ckpt, tmp_path / "none.pt")
    run(script, "--generate", 3, "--ckpt", tmp_path / "none.pt", "--out", "gen", "--device", "cpu")
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == \
        ["0_000000.png", "1_000001.png", "2_000002.png"]
    ckpt["classes"] = ckpt["classes"] + ["extra"]
    torch.save(ckpt, tmp_path / "more.pt")
    assert "the checkpoint's G does not fit" in error_of(script, "--generate", 2, "--ckpt",
                                                         tmp_path / "more.pt", "--out", "gen2")


def test_a_changed_size_is_refused_before_the_data_is_read(runs, tmp_path):
    """(11) --img-size or --channels changed on --resume was refused only after the whole folder
    was decoded (and cached), blaming "--spectral-norm, a width". Now before, naming the flag."""
    x = Path(shutil.copytree(runs / "dcgan" / "run", tmp_path / "x"))
    for flag, value, it_had in (("--img-size", 32, 16), ("--channels", 1, 3)):
        msg = error_of(S, "--resume", x / "last.pt", "--steps", 4, flag, value)
        assert f"typed otherwise: {flag} {value} (it has {it_had})" in msg
    assert not (tmp_path / "cache").exists()                # no image was read


# %% (12, 14, 15, 16, 18) the folder scan, the cache, snapshots, one-line warnings
def test_linked_subfolders_are_followed_once(tmp_path, capsys):
    """(12) Subfolders that are links were skipped without a word (cgan with cat -> ... and
    dog -> ... said "no images"). Now they are followed, each folder once, loops too."""
    make_folder(tmp_path / "store" / "cats", n=6)
    make_folder(tmp_path / "store" / "dogs", n=6, seed=1)
    (tmp_path / "pets").mkdir()
    (tmp_path / "pets" / "cat").symlink_to(tmp_path / "store" / "cats")
    (tmp_path / "pets" / "dog").symlink_to(tmp_path / "store" / "dogs")
    (tmp_path / "store" / "cats" / "loop").symlink_to(tmp_path / "pets")   # a loop
    run("cgan.py", "--data", tmp_path / "pets", "--steps", 1, "--out", "c", "--device", "cpu")
    assert "data: " + str(tmp_path / "pets") + ", 12 images" in capsys.readouterr().out
    assert load(tmp_path / "c" / "last.pt")["classes"] == ["cat", "dog"]


def test_the_cache_is_keyed_on_the_folder_not_how_it_is_typed(tmp_path, monkeypatch, capsys):
    """(14) The same folder typed as an absolute and then a relative path was decoded again."""
    make_folder(tmp_path / "images", n=12)
    train("--data", tmp_path / "images", "--steps", 1, "--out", "a")
    train("--data", "images", "--steps", 1, "--out", "b")
    assert capsys.readouterr().out.count("decoded once") == 1


def test_generated_images_inside_the_data_are_not_trained_on(runs, tmp_path, capsys):
    """(15) Images from --generate into a folder inside --data were trained on the next time."""
    data = make_folder(tmp_path / "images", n=12)
    train("--generate", 5, "--ckpt", runs / "dcgan" / "run" / "last.pt", "--out",
          data / "generated")
    train("--data", data, "--steps", 1, "--out", "out")
    assert f"data: {data}, 12 images" in capsys.readouterr().out


def test_snapshots_sort_by_step_past_a_million(runs, tmp_path):
    """(16) Past step 999,999 the snapshots sorted as text, and the refusal named the wrong one."""
    x = tmp_path / "x"
    x.mkdir()
    for step in (999_999, 1_000_000):
        shutil.copy(runs / "dcgan" / "run" / "step_000002.pt", x / f"step_{step:06d}.pt")
    msg = error_of(S, "--data", runs / "dcgan" / "images", "--steps", 1, "--out", x)
    assert f"--resume {x / 'step_1000000.pt'} --out NEW" in msg


def test_a_newline_in_a_name_stays_on_one_line(tmp_path, capsys):
    """(18) A file name with a newline broke the one-line warning in two."""
    data = make_folder(tmp_path / "images", n=12)
    (data / "bad\nname.png").write_bytes(b"not an image")
    train("--data", data, "--steps", 1, "--out", "out")
    warning = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(warning) == 1 and "bad\\nname.png" in warning[0]


# %% (20, 21, 22) a newcomer's first minutes
def test_the_first_line_comes_after_the_first_step(tmp_path, capsys):
    """(20) The first progress line came at step 50: twelve silent minutes on a CPU. Now one after
    the first step, with the time the run will take (and, when hours, what takes one)."""
    data = make_folder(tmp_path / "images", n=12)
    train("--data", data, "--steps", 3, "--out", "out")
    lines = capsys.readouterr().out.splitlines()
    first = [line for line in lines if line.startswith("[1/3] first step")]
    assert len(first) == 1 and "left" in first[0]


def test_help_says_each_default_once():
    """(21) --help said some defaults twice or as None, gave --seed and --device none, and listed
    --label where it is refused."""
    for script in ("dcgan.py", "cgan.py"):
        p = load_script(script).make_parser("x")
        formatter = p.formatter_class("x")
        said = {a.dest: formatter._get_help_string(a) % dict(vars(a), prog="x")
                for a in p._actions if a.help}
        assert all(text.count("default:") <= 1 and "None" not in text for text in said.values())
        assert said["seed"].endswith("(default: 0)") and said["device"].endswith("(default: auto)")
        assert ("label" in said) == (script == "cgan.py")


def test_the_real_limit_is_named():
    """(22) --batch-size 10000000000 said "must be a positive integer"."""
    assert "--batch-size must be in 1..65,536, got 10,000,000,000" in error_of(
        S, "--batch-size", 10_000_000_000)


def test_a_folder_of_generated_images_as_data_says_why(runs, tmp_path):
    """(probe) --data pointing at a --generate folder said "no images": its .lock keeps the scan
    out. Now the line says that it is such a folder."""
    train("--generate", 12, "--ckpt", runs / "dcgan" / "run" / "last.pt", "--out", "gen")
    msg = error_of(S, "--data", "gen", "--steps", 1, "--out", "out")
    assert "the folder of a run or of --generate" in msg
