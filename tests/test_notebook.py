"""A script pasted alone into a real Jupyter kernel (nbclient + ipykernel, as Kaggle and Colab run
it): the pasted cell, then main([...]) on tiny data, then --generate, then a bad call. Offline, the
pasted cell cannot train on MNIST: it says so in one line that shows the main([...]) call to make,
and leaves nothing behind, so that the following cells still run."""
import json

import pytest

from common import REPO, load, make_folder

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


@pytest.mark.parametrize("script", ["dcgan.py", "cgan.py"])
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
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: MNIST is not under data"
                                                     f" and could not be downloaded"), errors
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
