"""Data at scale: a folder is decoded once, chunk by chunk, straight into the decode cache (a .npy
file that is mapped into memory), never holding the images twice; a decode that is stopped goes on
where it was; the images live on the training device, in host memory or on disk (--data-in), and
the three give the same batches and the same checkpoints."""
import os
import signal
import tracemalloc

import numpy as np
import pytest
import torch

from common import load, load_script, make_folder, run, tensors_equal

S = "dcgan.py"


def train(*args):
    return run(S, "--device", "cpu", *args)


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "images", n=12)


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_every_place_trains_the_same_and_resumes_exactly(where, data, tmp_path, capsys):
    """The same last.pt wherever the images live, and after N/2 steps plus --resume."""
    train("--data", data, "--steps", 4, "--out", "memory", "--data-in", "device")
    train("--data", data, "--steps", 4, "--out", "straight", "--data-in", where)
    said = {"device": "in cpu memory", "host": "in cpu memory", "disk": "on disk"}[where]
    assert said in capsys.readouterr().out                  # (a CPU: host memory is the device's)
    train("--data", data, "--steps", 2, "--out", "halves", "--data-in", where)
    train("--steps", 4, "--out", "halves", "--resume")
    a, b, c = (load(tmp_path / f / "last.pt") for f in ("memory", "straight", "halves"))
    assert tensors_equal(a, b) == [] and tensors_equal(b, c) == []


def test_batches_from_disk_are_the_images(data):
    """From the mapped cache, a batch holds exactly the images of memory's batch, in [-1, 1]."""
    module = load_script(S)
    args = module.parse_args(["--data", str(data), "--img-size", "16"])
    cpu = torch.device("cpu")
    images = module.load_folder(args)[0]
    assert isinstance(images, np.memmap)
    disk, memory = (module.place(images, where, cpu) for where in ("disk", "device"))
    assert not disk.is_shared() and torch.equal(disk, memory)
    batches = []
    for place in (disk, memory):
        torch.manual_seed(3)
        batches.append(module.sample_real({"images": place}, 5, cpu))
    assert torch.equal(*batches) and batches[0].min() >= -1 and batches[0].max() <= 1
    torch.manual_seed(3)
    idx = torch.randint(0, 12, (5,))
    assert torch.equal(batches[0], memory[idx].float() / 127.5 - 1)


def test_the_decode_never_holds_the_images_twice(tmp_path, monkeypatch):
    """The old decode kept a list of every image and then np.stack'ed it: twice the images at its
    peak, and CelebA at 128 px killed a 24 GB machine. Now the images go straight into the mapped
    cache, a chunk at a time: the memory Python allocates stays well under one copy."""
    module = load_script(S)
    monkeypatch.setattr(module, "DECODE_CHUNK", 16)
    data = make_folder(tmp_path / "images", n=400)
    args = module.parse_args(["--data", str(data), "--img-size", "32"])
    tracemalloc.start()
    images = module.load_folder(args)[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert images.shape == (400, 3, 32, 32)
    assert peak < 0.5 * images.nbytes, (peak, images.nbytes)    # (the old decode: over 2x)


def test_a_stopped_decode_goes_on_where_it_was(tmp_path, monkeypatch):
    """A SIGINT halfway through the first decode stops it (exit 130); the next start decodes only
    what was not done yet, no chunk twice, and trains on all the images."""
    module = load_script(S)
    monkeypatch.setattr(module, "DECODE_CHUNK", 8)
    data = make_folder(tmp_path / "images", n=40)
    decode, calls, stopped = module.decode_image, [], []

    def counted(path, *a):
        calls.append(path)
        if len(calls) == 20 and not stopped:                # halfway: Ctrl-C
            stopped.append(os.kill(os.getpid(), signal.SIGINT))
        return decode(path, *a)

    monkeypatch.setattr(module, "decode_image", counted)
    with pytest.raises(SystemExit) as e:
        train("--data", data, "--steps", 1, "--out", "a")
    assert e.value.code == 130
    first = len(calls)
    side = next((tmp_path / "cache").glob("*.json"))
    done = module.read_json(side)["done"]
    assert 0 < done < 40 and done % 8 == 0
    calls.clear()
    train("--data", data, "--steps", 1, "--out", "b")
    assert len(calls) == 40 - done
    assert first + len(calls) <= 40 + 8                     # at most the stopped chunk again
    assert module.read_json(side)["n"] == 40


def test_an_old_cache_goes_and_a_changed_key_decodes_again(data, tmp_path, capsys):
    """An .npz cache of the older version is replaced; a cache whose key (the files' names,
    sizes, times) differs is not used."""
    train("--data", data, "--steps", 1, "--out", "a")
    npy = next((tmp_path / "cache").glob("*.npy"))
    old = npy.with_suffix(".npz")
    old.write_bytes(b"an older version's cache")
    capsys.readouterr()
    train("--data", data, "--steps", 1, "--out", "b")
    assert not old.exists() and "from the decode cache" in capsys.readouterr().out
    image = next(data.rglob("*.png"))
    image.write_bytes(image.read_bytes())                   # the same bytes, written again
    train("--data", data, "--steps", 1, "--out", "c")
    assert "decoded once" in capsys.readouterr().out


def test_no_room_on_disk_is_said_in_one_line(data, tmp_path, monkeypatch, capsys):
    """A cache that cannot be written (no room): a warning that says how many GB the images need,
    and they are decoded into memory; if the memory cannot hold them either, one line."""
    module = load_script(S)

    def no_room(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.np.lib.format, "open_memmap", no_room)
    train("--data", data, "--steps", 1, "--out", "a")
    err = capsys.readouterr().err
    assert "No space left on device; it needs 0.0 GB" in err and "decoding into memory" in err
    monkeypatch.setattr(module, "free_memory", lambda: 1000)
    msg = pytest.raises(SystemExit, train, "--data", data, "--steps", 1, "--out", "b").value.code
    assert "the images need 0.0 GB: free disk space there" in msg and "\n" not in msg
