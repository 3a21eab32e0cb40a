"""Named datasets without a network: the bundled MNIST subset, the offline fallback of --data mnist,
and MNIST-style IDX files read straight from a (possibly read-only, gzipped) folder."""
import gzip
import struct
from argparse import Namespace

import numpy as np
import pytest
import torch

from common import TINY, load_script, run

SCRIPTS = sorted(TINY)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "cache"))


def data_args(**kw):
    return Namespace(**{"data": "mnist", "data_root": "data", "img_size": None, "channels": None, **kw})


@pytest.mark.parametrize("script", SCRIPTS)
def test_mnist_without_network_falls_back_to_the_bundled_subset(script, tmp_path, monkeypatch, capsys):
    module = load_script(script)
    calls = []

    def no_network(name, root):
        calls.append((name, root))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(module, "download", no_network)
    (tmp_path / "empty").mkdir()
    run(script, "--data", "mnist", "--data-root", tmp_path / "empty", "--steps", 1, "--out", "out", "--device", "cpu")
    assert calls and calls[0][0] == "mnist"               # it did try to download first
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "bundled 10,000-image subset" in line]
    assert len(warning) == 1 and "no network" in warning[0]
    assert torch.load(tmp_path / "out" / "last.pt", weights_only=True)["step"] == 1


def test_other_datasets_without_network_fail_clearly(tmp_path, monkeypatch):
    module = load_script("dcgan.py")
    monkeypatch.setattr(module, "download", lambda name, root: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(SystemExit) as e:
        run("dcgan.py", "--data", "fashion-mnist", "--data-root", tmp_path, "--steps", 1)
    assert "could not be downloaded" in e.value.code and "\n" not in e.value.code


@pytest.mark.parametrize("script", SCRIPTS)
def test_mnist_mini_is_real_mnist_in_real_proportions(script):
    module = load_script(script)
    images, labels, classes = module.load_named(data_args(data="mnist-mini", img_size=28))
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and classes == [str(c) for c in range(10)]
    share = np.bincount(labels, minlength=10) / len(labels)
    assert share.min() >= 0.08 and share.max() <= 0.12, share
    assert images.mean() > 20 and (images == 0).mean() > 0.5  # white digits on black, not noise


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_files_are_read_where_they_lie(tmp_path, gz):
    """Fashion-MNIST in a folder that holds only the .gz files (as ../shared/data or a Kaggle input)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", labels)
    module = load_script("vanilla_gan.py")
    got, got_labels, _ = module.load_named(data_args(data="fashion-mnist", data_root=str(tmp_path / "root")))
    assert np.array_equal(got[:, 0], images) and np.array_equal(got_labels, labels)
    resized, _, _ = load_script("dcgan.py").load_named(
        data_args(data="fashion-mnist", data_root=str(tmp_path / "root")))
    assert resized.shape == (50, 1, 32, 32)               # DCGAN's MNIST-like default size
