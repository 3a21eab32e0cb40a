"""A script pasted alone into a real Jupyter kernel (nbclient + ipykernel, as Kaggle and Colab run
it). Online (MNIST there): the pasted cell trains the defaults until the user presses stop, and
then main([...]) with other data, with --resume, and with the same data again does what the user
means, without --out. Offline: the pasted cell cannot train on MNIST and says so in one line that
shows the main([...]) call to make, leaving nothing behind; then main([...]) on tiny data,
--generate, and a bad call."""
import json

import numpy as np
import pytest

from common import REPO, load, make_folder, write_idx

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

OFFLINE = """# the test's own cell: a notebook without network (as in CI)
import socket
def no_network(*args, **kwargs):
    raise OSError("no network in this notebook")
socket.socket.connect = no_network
socket.create_connection = no_network"""


def outputs(cell, name):
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.get("output_type") == "stream" and o.get("name") == name)


STOP = """# the test's own cell: the user presses the stop button once training has begun
import os, signal, threading, time
from pathlib import Path
def press_stop():
    while not Path("runs/dcgan/real.png").exists():        # written just before the first step
        time.sleep(0.1)
    time.sleep(2)
    os.kill(os.getpid(), signal.SIGINT)                     # what Jupyter's interrupt sends
threading.Thread(target=press_stop, daemon=True).start()"""


def run_cells(cells, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.outputs)
    return nb.cells


def test_paste_stop_then_other_data_resume_and_a_refusal(tmp_path):
    """(The first ten minutes, item 1) With no --out anywhere: the pasted dcgan.py trains MNIST into
    runs/dcgan until stopped; main(["--data", photos]) then trains into runs/dcgan-photos (it was
    refused: "runs/dcgan holds a run already"); main(["--resume"]) continues the MNIST run; the
    photos again are refused in one line that names --resume and --out, which then continues."""
    raw = tmp_path / "data" / "MNIST" / "raw"                # MNIST as an online notebook has it
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (256, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 256))
    photos = str(make_folder(tmp_path / "photos", n=6))
    tiny = ["--ngf", "4", "--ndf", "4", "--img-size", "16", "--batch-size", "4", "--device", "cpu"]
    resume = ("import torch\nstep = torch.load('runs/dcgan/last.pt', weights_only=True)['step']\n"
              "main(['--resume', '--steps', str(step + 2)])")
    cells = run_cells([STOP, (REPO / "dcgan.py").read_text(),
                       f"main({json.dumps(['--data', photos, '--steps', '3', *tiny])})",
                       resume,
                       f"main({json.dumps(['--data', photos, '--steps', '5', *tiny])})",
                       'main(["--out", "runs/dcgan-photos", "--resume", "--steps", "5"])'],
                      tmp_path)
    _, pasted, photos_run, resumed, again, continued = cells
    said = outputs(pasted, "stdout")
    assert "stopped at step" in said, said[-2000:]
    assert "continue with: main(['--out', 'runs/dcgan', '--resume'])" in said
    stopped = int(said.split("stopped at step ")[1].split(";")[0])
    assert "[3/3]" in outputs(photos_run, "stdout")
    assert "done: samples in runs/dcgan-photos/samples" in outputs(photos_run, "stdout")
    assert f"resumed from step {stopped}" in outputs(resumed, "stdout")
    mnist = load(tmp_path / "runs" / "dcgan" / "last.pt")
    assert mnist["step"] == stopped + 2 and mnist["args"]["data"] == "mnist"
    assert outputs(again, "stderr").strip() == ("dcgan.py: error: runs/dcgan-photos holds a run "
                                                "already: add --resume to continue it, or give "
                                                "another --out")
    assert "resumed from step 3" in outputs(continued, "stdout")
    assert load(tmp_path / "runs" / "dcgan-photos" / "last.pt")["step"] == 5


@pytest.mark.parametrize("script", ["cgan.py"])
def test_a_script_pasted_into_a_notebook(script, tmp_path):
    classes = ["a", "b"] if script == "cgan.py" else None
    data = make_folder(tmp_path / "images", n=4, classes=classes)
    tiny = ["--ngf", "4", "--ndf", "4", "--img-size", "16", "--batch-size", "4", "--device", "cpu"]
    train = ["--data", str(data), "--steps", "3", "--out", "nb", *tiny]
    cells = [OFFLINE, (REPO / script).read_text(),
             f"main({json.dumps(train)})",
             'main(["--generate", "4", "--ckpt", "nb/last.pt", "--out", "gen"])',
             'main(["--data", "/no/such/folder"])']
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    _, pasted, trained, generated, bad = nb.cells

    # the pasted script: offline, no MNIST, no bundled subset next to it -> one helpful line
    errors = outputs(pasted, "stderr").strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: MNIST is not under "
                                                     f"{tmp_path / 'data'} and could not be "
                                                     f"downloaded"), errors
    assert errors[0].endswith('train on your own images: main(["--data", "/path/to/images"])')
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.outputs)
    assert "To exit" not in json.dumps(nb.cells[1].outputs)
    assert not (tmp_path / "data").exists()                  # no empty data/MNIST/raw left
    assert not (tmp_path / "runs").exists()

    assert "done: samples in nb/samples" in outputs(trained, "stdout")
    assert load(tmp_path / "nb" / "last.pt")["step"] == 3
    assert "wrote 4 images to gen" in outputs(generated, "stdout")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4
    assert outputs(bad, "stderr").strip() == (f"{script}: error: --data /no/such/folder: no such "
                                              f"folder, and not a dataset name (mnist, "
                                              f"fashion-mnist, cifar10, mnist-mini)")
