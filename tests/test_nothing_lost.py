"""Nothing lost, round two: a run never writes into a folder that holds another run, takes the lock
on --out before anything slow, and every odd input or fault of the round-two probe ends in one line
(or does what the README says), with nothing of an earlier run changed and nothing left behind."""
import os
import pwd
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import (REPO, TINY, another_run_holds, error_of, load, load_script, make_folder, run,
                    tensors_equal, write_idx)

S = "dcgan.py"


def train(*args, script=S):
    return run(script, "--device", "cpu", *args)


def files(folder):
    """Every file under the folder and its bytes: equal before and after means nothing changed."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run of 10 steps (snapshots at 2, 4, ..., 10), made once; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    data = make_folder(root / "images", n=12)
    train("--data", data, "--steps", 10, "--log-every", 2, "--out", root / "run")
    return root


@pytest.fixture
def x(finished, tmp_path):
    """A copy of the finished run, in this test's folder."""
    return Path(shutil.copytree(finished / "run", tmp_path / "x"))



# %% Lost data
def test_resuming_a_snapshot_never_touches_its_folder(x):
    """(1) --resume step_000004.pt replaced the later snapshots and last.pt of its own folder."""
    before = files(x)
    for out in ([], ["--out", x]):                     # by default: the snapshot's folder
        msg = error_of(S, "--resume", x / "step_000004.pt", *out)
        assert "holds another run" in msg and f"--out {x}-from-4" in msg, msg
    assert files(x) == before
    train("--resume", x / "step_000004.pt", "--out", f"{x}-from-4")   # as the line says
    assert files(x) == before
    assert tensors_equal(load(f"{x}-from-4/last.pt"), load(x / "last.pt")) == []  # and exact


def test_another_runs_checkpoint_never_continues_into_a_folder_that_holds_a_run(x, finished):
    """(2) --resume OTHER.pt --out DIR replaced DIR's last.pt and mixed the two logs."""
    train("--data", finished / "images", "--steps", 2, "--out", "other", "--seed", 7)
    before = files(x)
    msg = error_of(S, "--resume", "other/last.pt", "--out", x, "--steps", 6)
    assert "holds another run" in msg
    assert files(x) == before
    train("--resume", x / "last.pt", "--steps", 12)     # its own last.pt continues there
    assert load(x / "last.pt")["step"] == 12


def test_a_launch_while_another_reads_its_data(tmp_path, monkeypatch):
    """(3) two launches on one fresh --out both ran: the check for last.pt came before the data
    was loaded, and the lock only after, so a run that started and ended while the first one was
    still decoding was overwritten by it. Now the lock comes first: the second launch is refused."""
    module = load_script(S)
    data = make_folder(tmp_path / "images", n=12)
    load_data, second = module.load_data, []

    def a_second_launch_meanwhile(*a, **k):
        if not second:                                  # while the first run reads its data
            second.append(None)
            with pytest.raises(SystemExit) as e:
                train("--data", data, "--steps", 2, "--out", "same", "--seed", 9)
            second[0] = e.value.code
        return load_data(*a, **k)

    monkeypatch.setattr(module, "load_data", a_second_launch_meanwhile)
    train("--data", data, "--steps", 3, "--out", "same")
    assert "another run is writing" in second[0]
    assert load(tmp_path / "same" / "last.pt")["step"] == 3


def test_a_locked_folder_is_refused_before_the_data_is_read(tmp_path):
    """(3, and the re-cut issue) the refusal comes before decoding: no decode cache is written."""
    data = make_folder(tmp_path / "images", n=12)
    with another_run_holds("busy", tmp_path):
        assert "another run is writing" in error_of(S, "--data", data, "--out", "busy")
        assert (tmp_path / "busy" / ".lock").exists()   # the holder's lock file stays: a third
        # run that made a new one would lock that and write beside the holder
    assert not (tmp_path / "cache").exists()


# %% One line instead of a traceback, or a refusal instead of a wrong action
def test_generate_0_is_refused(tmp_path):
    """(4) --generate 0 trained a whole run."""
    assert "--generate must be positive" in error_of(S, "--generate", 0)
    assert not (tmp_path / "runs").exists()


def test_empty_paths_are_refused(tmp_path):
    """(5) --data "" trained on the current folder."""
    make_folder(tmp_path, n=4)
    for flag in ("--data", "--out", "--data-root"):
        assert "must not be empty" in error_of(S, flag, "")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["dangling link", "/proc", "/sys"])
def test_an_out_that_cannot_be_created_is_one_line(where, tmp_path, finished):
    """(6) an --out that passed the access check but could not be created: a traceback after the
    data had loaded, in training and in --generate."""
    out = {"dangling link": tmp_path / "link", "/proc": "/proc/no-such-process/out",
           "/sys": "/sys/gan-out"}[where]
    if where == "dangling link":
        os.symlink(tmp_path / "nowhere", out)
    assert "cannot write there" in error_of(S, "--data", finished / "images", "--out", out)
    assert not (tmp_path / "cache").exists()                 # before anything was decoded
    assert "cannot write there" in error_of(S, "--generate", 2, "--ckpt",
                                            finished / "run" / "last.pt", "--out", out)


def test_a_cache_dir_that_is_a_file(tmp_path, monkeypatch, capsys, finished):
    """(7) GAN_CACHE_DIR a file: a wrong "damaged" warning, then a traceback. Now the cache cannot
    be written, which one warning says, and training goes on."""
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "not-a-folder"))
    train("--data", finished / "images", "--steps", 1, "--out", "out")
    err = capsys.readouterr().err
    assert "could not write the decode cache" in err and "damaged" not in err
    assert load(tmp_path / "out" / "last.pt")["step"] == 1


@pytest.mark.parametrize("drop", ["args", "G", "rng"])
def test_a_checkpoint_with_a_key_taken_out(drop, x, tmp_path):
    """(8) a checkpoint dict without args or G: a KeyError traceback, the latter after the data had
    loaded. Now one line before anything is read, for --resume and --generate."""
    ckpt = load(x / "last.pt")
    del ckpt[drop]
    torch.save(ckpt, tmp_path / "edited.pt")
    for how in (["--resume", tmp_path / "edited.pt", "--out", "new"],
                ["--generate", 2, "--ckpt", tmp_path / "edited.pt", "--out", "gen"]):
        msg = error_of(S, *how, "--steps", 20)
        assert "not a whole checkpoint" in msg and drop in msg
    assert not (tmp_path / "cache").exists() and not (tmp_path / "new").exists()


def test_a_checkpoint_with_flags_edited_by_hand(x, tmp_path):
    """A flag of the wrong type, or out of range, is refused as if it had been given."""
    for key, value, said in (("latent_dim", "eight", "--latent-dim: invalid int value: 'eight'"),
                             ("latent_dim", -3, "refused: --latent-dim must be in 1..2,147,483"),
                             ("lr", float("inf"), "refused: --lr must be a finite number")):
        ckpt = load(x / "last.pt")
        ckpt["args"][key] = value
        torch.save(ckpt, tmp_path / "edited.pt")
        assert said in error_of(S, "--resume", tmp_path / "edited.pt", "--out", "new",
                                "--steps", 20)
    ckpt = load(x / "last.pt")
    ckpt["rng"] = {"cpu": "not a state"}
    torch.save(ckpt, tmp_path / "edited.pt")
    msg = error_of(S, "--resume", tmp_path / "edited.pt", "--out", "new", "--steps", 20)
    assert "damaged or was edited by hand" in msg
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("script", ["cgan.py", "acgan.py"])
def test_mnist_labels_out_of_range(script, tmp_path):
    """(9) MNIST labels of 10 or more: an IndexError mid-step, .lock and real.png left behind."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((20, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(20))      # labels 0..19
    msg = error_of(script, "--data", "mnist", "--data-root", tmp_path / "root", "--steps", 1)
    assert "labels outside 0..9" in msg
    assert not (tmp_path / "runs").exists()


def test_a_tilde_that_cannot_be_expanded(tmp_path, monkeypatch, finished):
    """(10) ~nosuchuser in --data, --data-root or GAN_CACHE_DIR, or no home folder at all (HOME
    unset and no passwd entry): a RuntimeError traceback."""
    for flags in (["--data", "~nosuchuser/images"], ["--data", "mnist", "--data-root",
                                                     "~nosuchuser/data"]):
        assert "cannot expand ~" in error_of(S, *flags, "--steps", 1)
    monkeypatch.setenv("GAN_CACHE_DIR", "~nosuchuser/cache")
    assert "cannot expand ~" in error_of(S, "--data", finished / "images", "--steps", 1)
    monkeypatch.delenv("GAN_CACHE_DIR")
    monkeypatch.delenv("HOME")

    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert "cannot expand ~" in error_of(S, "--data", finished / "images", "--steps", 1)
    assert not (tmp_path / "runs").exists()


def test_pictures_that_cannot_be_written_never_stop_a_run(tmp_path, capsys, finished):
    """(11) a file named samples, or a folder named real.png: a traceback at the last step, before
    the final save. Now a warning, and the run ends with its checkpoint."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "samples").write_text("in the way")
    (tmp_path / "b" / "real.png").mkdir(parents=True)
    for out in ("a", "b"):
        train("--data", finished / "images", "--steps", 3, "--sample-every", 1, "--out", out)
        assert load(tmp_path / out / "last.pt")["step"] == 3
    assert capsys.readouterr().err.count("training goes on") == 4   # samples 1, 2, 3; real.png


@pytest.mark.parametrize("script, flags", [
    ("dcgan.py", ["--lr", "inf"]), ("wgan_gp.py", ["--gp-weight", "inf"]),
    ("ebgan.py", ["--margin", "inf"]), ("lsgan.py", ["--targets", "nan", "1", "1"]),
    ("wgan.py", ["--clip", "inf"]), ("dcgan.py", ["--ema", "nan"]),
    ("dcgan.py", ["--betas", "0.5", "nan"])])
def test_numbers_that_are_not_finite_are_refused(script, flags):
    """(12) --lr inf and the like started a run that stopped at step 1; --clip inf trained with no
    clipping at all."""
    assert "must be a finite number" in error_of(script, *flags)


def test_the_last_good_checkpoint_resumes(tmp_path, monkeypatch):
    """(13) After --lr 1e8 the kept checkpoint's weights were finite but Adam's second moments were
    inf: resumed, G never changed again. Here step 2 makes one of them inf: the checkpoint of step 2
    is not written, and the one of step 1 resumes and trains."""
    module = load_script("vanilla_gan.py")

    def inf_moment_in_step_2(run, stats):
        if run.step == 2:
            state = next(iter(run.nets["opt_G"].state.values()))
            state["exp_avg_sq"].view(-1)[0] = float("inf")

    monkeypatch.setattr(module.Run, "observers", [inf_moment_in_step_2])
    data = make_folder(tmp_path / "images", n=8)
    msg = error_of("vanilla_gan.py", "--data", data, "--device", "cpu", "--steps", 5,
                   "--ckpt-every", 1, "--out", "out")
    assert "optimizer's state became NaN/inf at step 2" in msg
    kept = load(tmp_path / "out" / "last.pt")
    assert kept["step"] == 1
    assert all(t.isfinite().all() for k in ("opt_G", "opt_D") for s in kept[k]["state"].values()
               for t in s.values())
    monkeypatch.setattr(module.Run, "observers", [])
    train("--steps", 3, "--out", "out", "--resume", script="vanilla_gan.py")
    after = load(tmp_path / "out" / "last.pt")
    assert after["step"] == 3 and tensors_equal(after["G"], kept["G"]) != []   # G trains on


# %% Litter and dead ends
def test_a_killed_saves_temporary_file_is_removed(x):
    """(14) kill -9 during a save left .last.pt.<pid>.tmp, and no later run removed it."""
    (x / ".last.pt.99999.tmp").write_bytes(b"half a checkpoint")
    (x / ".step_000012.pt.99999.tmp").write_bytes(b"half a snapshot")
    train("--resume", x / "last.pt", "--steps", 11)
    assert sorted(p.name for p in x.iterdir() if p.name.endswith(".tmp")) == []


def test_a_refused_run_leaves_no_folder(x, tmp_path, finished):
    """(15) a new --out holding only .lock stayed behind after a refused resume (another
    --img-size, other classes, a partial checkpoint)."""
    assert "does not fit" in error_of(S, "--resume", x / "last.pt", "--out", "new/deeper",
                                      "--img-size", 32, "--steps", 20)
    (tmp_path / "partial.pt").write_bytes((x / "last.pt").read_bytes()[:1000])
    assert "loaded safely" in error_of(S, "--resume", tmp_path / "partial.pt", "--out", "new")
    data = make_folder(tmp_path / "abc", n=2, classes=["a", "b", "c"])
    run("cgan.py", "--data", data, "--steps", 1, "--out", "cgan", "--device", "cpu")
    xyz = make_folder(tmp_path / "xyz", n=2, classes=["x", "y", "z"])
    assert "trained on the classes a, b, c" in error_of(
        "cgan.py", "--resume", "cgan/last.pt", "--data", xyz, "--out", "new", "--steps", 4)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()                        # a folder the user made: kept, and empty
    assert "does not fit" in error_of(S, "--resume", x / "last.pt", "--out", "mine",
                                      "--img-size", 32, "--steps", 20)
    assert list((tmp_path / "mine").iterdir()) == []


def test_an_offline_download_leaves_no_folder(tmp_path, monkeypatch):
    """(16) an offline --data cifar10 left the parent of --data-root behind."""
    module = load_script(S)

    def offline(root, **kw):
        os.makedirs(os.path.join(root, "cifar-10-batches-py"), exist_ok=True)  # as torchvision
        raise RuntimeError("no network")

    monkeypatch.setattr(module.torchvision.datasets, "CIFAR10", offline)
    assert "could not be downloaded" in error_of(S, "--data", "cifar10", "--data-root",
                                                 "a/b/data", "--steps", 1)
    assert not (tmp_path / "a").exists()


def test_out_expands_tilde(tmp_path, monkeypatch, finished):
    """(17) --out '~/x' was not expanded, though --data was."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train("--data", finished / "images", "--steps", 1, "--out", "~/x")
    assert load(tmp_path / "home" / "x" / "last.pt")["step"] == 1
    assert not (tmp_path / "~").exists()


def test_a_decompression_bomb_is_one_skipped_image(tmp_path, capsys):
    """(17) a very large image printed PIL's raw two-line DecompressionBombWarning: now it is
    skipped and counted with the unreadable ones. (95 megapixels, above PIL's limit of about 89:
    one bit per pixel, so the file is small.)"""
    data = make_folder(tmp_path / "images", n=8)
    Image.new("1", (10000, 9500)).save(data / "huge.png")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train("--data", data, "--steps", 1, "--out", "out")
    assert [w for w in said if issubclass(w.category, Image.DecompressionBombWarning)] == []
    err = capsys.readouterr().err
    assert "skipped 1 of 9 images" in err and "huge.png" in err and err.count("\n") == 1, err


# %% Found by probing the round-two code (a user's kinds of input not in the issue)
def test_out_never_the_data_folder(tmp_path):
    """--out equal to --data, above it, or a class subfolder holding images: the lock made the
    images a run's outputs ("no images"), and cgan.py trained without that class. Now refused,
    before anything is written into the data."""
    data = make_folder(tmp_path / "photos", n=6)
    for out in (data, tmp_path):
        assert "is, holds or is among the images of --data" in error_of(
            S, "--data", data, "--out", out, "--steps", 1)
    classes = make_folder(tmp_path / "pets", n=3, classes=["a", "b", "c"])
    assert "is, holds or is among" in error_of("cgan.py", "--data", classes, "--out",
                                               classes / "a", "--steps", 1)
    assert not list(tmp_path.rglob(".lock"))
    train("--data", data, "--steps", 1, "--out", data / "run")     # a new folder inside: fine
    train("--data", data, "--steps", 2, "--out", data / "run", "--resume")
    assert load(data / "run" / "last.pt")["step"] == 2


def test_snapshots_without_last_pt_name_a_fix_that_works(x):
    (x / "last.pt").unlink()
    msg = error_of(S, "--data", "mnist-mini", "--out", x)
    assert f"--resume {x}/step_000010.pt --out NEW" in msg


def test_a_directory_as_the_checkpoint_means_its_last_pt(x, tmp_path):
    train("--resume", x, "--steps", 11)                             # --resume runs/x
    assert load(x / "last.pt")["step"] == 11
    train("--generate", 2, "--ckpt", x, "--out", "gen")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 2


def test_generate_never_replaces_generated_images(x, tmp_path):
    train("--generate", 2, "--ckpt", x / "last.pt", "--out", "gen")
    before = files(tmp_path / "gen")
    msg = error_of(S, "--generate", 2, "--ckpt", x / "step_000004.pt", "--out", "gen")
    assert "gen holds 000000.png already" in msg and "--out gen-2" in msg
    assert files(tmp_path / "gen") == before


def test_a_full_disk_keeps_the_whole_log(x, monkeypatch):
    """log.csv was rewritten in place: a full disk cut it mid-row, and the earlier run's last
    rows were lost. Now it is written to a temporary file and renamed, like a checkpoint."""
    module = load_script(S)
    before = (x / "log.csv").read_text()

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def writerows(self, rows):
            self.f.write("1,2,")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.csv, "writer", FullDisk)
    train("--resume", x / "last.pt", "--steps", 12, "--log-every", 1)   # warned, trained on
    assert (x / "log.csv").read_text() == before and not list(x.glob(".*.tmp"))


@pytest.mark.parametrize("edit, said", [
    (lambda c: c.update(step=-5), "not a whole checkpoint (edited by hand?): step"),
    (lambda c: c.update(step=True), "not a whole checkpoint (edited by hand?): step"),
    (lambda c: c["args"].update(betas=[0.5]), "--betas: expected 2 arguments"),
    (lambda c: c["args"].update(lr=[0.1]), "--lr: invalid float value: '[0.1]'"),
    (lambda c: c.update(fixed_noise=torch.randn(64, 50)), "fixed noise has the wrong shape"),
    (lambda c: c["opt_G"]["state"][0].update(exp_avg=c["opt_G"]["state"][0]["exp_avg"][:1]),
     "an optimizer's state does not fit its parameters")], ids=str)
def test_more_checkpoints_edited_by_hand(edit, said, x, tmp_path):
    ckpt = load(x / "last.pt")
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.pt")
    assert said in error_of(S, "--resume", tmp_path / "edited.pt", "--out", "new", "--steps", 20)
    assert not (tmp_path / "new").exists()


def test_a_file_that_goes_while_the_folder_is_read(tmp_path, monkeypatch):
    module = load_script(S)
    data, real = make_folder(tmp_path / "images", n=6), module.decode_folder

    def one_vanishes(root, found, *a):
        found[0].unlink()                              # between the listing and its stat()
        return real(root, found, *a)

    monkeypatch.setattr(module, "decode_folder", one_vanishes)
    assert "changed while it was read" in error_of(S, "--data", data, "--steps", 1)


def test_sighup_saves_like_sigterm(tmp_path):
    """A closed terminal (SIGHUP) killed the run without a save: now it saves and stops, 129."""
    data = make_folder(tmp_path / "images", n=6)
    p = subprocess.Popen([sys.executable, str(REPO / S), *TINY[S], "--data", str(data), "--device",
                          "cpu", "--steps", "100000", "--ckpt-every", "100000", "--log-every", "1",
                          "--out", "hup"], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while not (p.stdout.readline() or "[").startswith("["):     # training has begun
        pass
    p.send_signal(signal.SIGHUP)
    assert p.wait(timeout=120) == 129
    assert load(tmp_path / "hup" / "last.pt")["step"] >= 1
