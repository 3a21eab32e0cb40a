"""What only the class-conditional scripts (cgan.py, acgan.py) do: labels from class subfolders and
named datasets, one sample-grid row per class, the label changing G's output, --generate with and
without --label, and every label the models ever see lying in range(n_classes). The end-to-end tests
(outputs, exact resume) run on these scripts too, from test_scripts.py."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from common import (CONDITIONAL_SCRIPTS, IMG, TINY, error_of, load, load_script, make_folder,
                    models_from, record_steps, run)

SCRIPTS = sorted(CONDITIONAL_SCRIPTS)
PAD = 2                                              # torchvision's make_grid padding


def classes_folder(tmp_path, names, n=2):
    return make_folder(tmp_path / "images", n=n, classes=names)


def grid_rows_cols(path, size=IMG):
    w, h = Image.open(path).size
    return (h - PAD) // (size + PAD), (w - PAD) // (size + PAD)


@pytest.mark.parametrize("script", SCRIPTS)
def test_labels_follow_the_class_subfolders(script, tmp_path, capsys):
    data = classes_folder(tmp_path, ["cat", "dog", "owl", "ant"])
    (data / "empty_class").mkdir()                   # a subfolder without images is not a class
    run(script, "--data", data, "--steps", 2, "--out", "out", "--device", "cpu")
    captured = capsys.readouterr()
    assert "4 classes: ant, cat, dog, owl" in captured.out        # printed, in sorted order
    assert "empty_class" in captured.err                          # said, not silently dropped
    ckpt = load(tmp_path / "out" / "last.pt")
    assert ckpt["classes"] == ["ant", "cat", "dog", "owl"]
    assert ckpt["args"]["n_classes"] == 4
    # the grid: one row per class, the same 8 noise vectors in every row
    assert torch.equal(ckpt["fixed_labels"], torch.arange(4).repeat_interleave(8))
    noise = ckpt["fixed_noise"].view(4, 8, -1)
    assert all(torch.equal(noise[0], noise[r]) for r in range(4))
    assert not torch.equal(noise[0, 0], noise[0, 1])
    assert grid_rows_cols(tmp_path / "out" / "samples" / "000002.png") == (4, 8)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_grid_shows_the_first_ten_classes(script, tmp_path):
    data = classes_folder(tmp_path, [f"c{k:02d}" for k in range(12)], n=1)
    run(script, "--data", data, "--steps", 1, "--out", "out", "--device", "cpu")
    ckpt = load(tmp_path / "out" / "last.pt")
    assert len(ckpt["classes"]) == 12
    assert torch.equal(ckpt["fixed_labels"], torch.arange(10).repeat_interleave(8))
    assert grid_rows_cols(tmp_path / "out" / "samples" / "000001.png") == (10, 8)


@pytest.mark.parametrize("script", SCRIPTS)
def test_named_dataset_labels(script, tmp_path):
    """MNIST's labels are the digits: the bundled subset trains with ten classes and a ten-row grid.
    """
    run(script, "--data", "mnist-mini", "--steps", 1, "--out", "out", "--device", "cpu")
    ckpt = load(tmp_path / "out" / "last.pt")
    assert ckpt["classes"] == [str(d) for d in range(10)]
    assert grid_rows_cols(tmp_path / "out" / "samples" / "000001.png") == (10, 8)


def test_real_batches_keep_image_and_label_together():
    module = load_script("cgan.py")
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    data = {"images": images, "labels": torch.arange(50) % 7, "classes": list("abcdefg")}
    x, y = module.sample_real(data, 200, torch.device("cpu"), with_labels=True)
    index = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()  # undo the scaling to [-1, 1]
    assert torch.equal(y, index % 7)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_label_lies_in_range(script, tmp_path, monkeypatch):
    """Training labels (real and fake), the grid's labels and --generate's labels all lie in
    range(n_classes), and the fake labels of training (not only the grid's) cover that range."""
    module = load_script(script)
    seen = {"G": [], "D": [], "trained": []}
    build = module.build_models

    def trained(G, inputs):                          # training's G(z, labels), not the grid's
        if G.training:
            seen["trained"].append(inputs[1].detach().clone())

    def recording_build(args):
        G, D = build(args)
        # G(z, labels)
        G.register_forward_pre_hook(lambda m, inp: seen["G"].append(inp[1].detach().clone()))
        G.register_forward_pre_hook(trained)
        if hasattr(D, "label_map"):                  # cgan's D reads the label too
            D.label_map.register_forward_pre_hook(
                lambda m, inp: seen["D"].append(inp[0].detach().clone()))
        return G, D

    monkeypatch.setattr(module, "build_models", recording_build)
    data = classes_folder(tmp_path, ["a", "b", "c"])
    run(script, "--data", data, "--steps", 6, "--out", "out", "--device", "cpu",
        "--sample-every", 3)
    run(script, "--generate", 7, "--ckpt", tmp_path / "out" / "last.pt", "--out", "gen",
        "--device", "cpu")
    g = torch.cat(seen["G"])
    assert g.dtype == torch.long and g.min() >= 0 and g.max() <= 2
    assert set(g.tolist()) == {0, 1, 2}
    assert len(seen["trained"]) == 6 and set(torch.cat(seen["trained"]).tolist()) == {0, 1, 2}
    if seen["D"]:
        d = torch.cat(seen["D"])
        assert d.min() >= 0 and d.max() <= 2 and set(d.tolist()) == {0, 1, 2}
    names = sorted(p.name for p in (tmp_path / "gen").glob("*.png"))
    # labels cycle through the classes
    assert names == sorted(f"{i % 3}_{i:06d}.png" for i in range(7))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_label_changes_G_for_a_fixed_z(script, tmp_path):
    data = classes_folder(tmp_path, ["a", "b", "c", "d"])
    run(script, "--data", data, "--steps", 3, "--out", "out", "--device", "cpu")
    ckpt = load(tmp_path / "out" / "last.pt")
    # float64: rounding noise ~1e-15, far below any real effect
    G = models_from(ckpt)[0].eval().double()
    z = torch.randn(1, ckpt["args"]["latent_dim"], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    with torch.no_grad():
        images = torch.cat([G(z, torch.tensor([k])) for k in range(4)])
        again = G(z.repeat(4, 1), torch.arange(4))   # batched: the same images
    assert torch.allclose(images, again, rtol=0, atol=1e-12)
    for a in range(4):
        # after 3 tiny steps the label's effect is small, but there
        for b in range(a + 1, 4):
            assert (images[a] - images[b]).abs().max() > 1e-6, (a, b)


@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_with_label_writes_only_that_class(script, tmp_path):
    data = classes_folder(tmp_path, ["a", "b", "c", "d", "e"])
    run(script, "--data", data, "--steps", 2, "--out", "train", "--device", "cpu")
    ckpt = tmp_path / "train" / "last.pt"
    run(script, "--generate", 12, "--ckpt", ckpt, "--out", "gen3", "--device", "cpu", "--label", 3)
    names = sorted(p.name for p in (tmp_path / "gen3").glob("*.png"))
    assert names == [f"3_{i:06d}.png" for i in range(12)]
    run(script, "--generate", 12, "--ckpt", ckpt, "--out", "all", "--device", "cpu")
    labels = [int(p.name.split("_")[0]) for p in (tmp_path / "all").glob("*.png")]
    assert sorted(labels) == sorted(i % 5 for i in range(12))


@pytest.mark.parametrize("script", SCRIPTS)
def test_conditional_bad_input(script, tmp_path):
    flat = make_folder(tmp_path / "flat", n=4)       # images, but no class subfolders
    assert "one subfolder per class" in error_of(script, "--data", flat, "--steps", 1)
    single = make_folder(tmp_path / "single", n=2, classes=["only"])  # one class is no condition
    assert "at least two" in error_of(script, "--data", single, "--steps", 1)

    data = classes_folder(tmp_path, ["a", "b", "c"])
    run(script, "--data", data, "--steps", 2, "--out", "train", "--device", "cpu")
    ckpt = tmp_path / "train" / "last.pt"
    for bad in (3, -1):
        msg = error_of(script, "--generate", 2, "--ckpt", ckpt, "--label", bad)
        assert "--label must be in 0..2" in msg

    # same count, other classes
    other = make_folder(tmp_path / "other", n=2, classes=["x", "y", "z"])
    msg = error_of(script, "--data", other, "--steps", 4, "--out", "train", "--resume",
                   "--device", "cpu")
    assert "trained on the classes a, b, c" in msg


def test_acgan_heads_are_logits():
    """D's class head feeds CrossEntropyLoss directly: no Softmax (or LogSoftmax) anywhere in D."""
    module = load_script("acgan.py")
    args = module.parse_args(TINY["acgan.py"] + ["--channels", "1"])
    args.n_classes = 5
    D = module.build_models(args)[1]
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)) for m in D.modules())
    s, c = D(torch.randn(4, 1, IMG, IMG))
    assert s.shape == (4,) and c.shape == (4, 5)


def test_acgan_logs_its_class_accuracies(tmp_path, monkeypatch):
    """acc_real is D's class accuracy on the real batch, acc_fake on G's images for the asked
    labels: recomputed here from D's class logits and the labels the step used, step by step."""
    module = load_script("acgan.py")
    seen = {"logits": [], "asked": [], "real": [], "logged": record_steps(module, monkeypatch)}
    build, real_batch = module.build_models, module.Run.real_batch

    def recording_build(args):
        G, D = build(args)
        G.register_forward_pre_hook(lambda m, inp: seen["asked"].append(inp[1].clone()))
        D.class_head.register_forward_hook(lambda m, inp, out: seen["logits"].append(out.detach()))
        return G, D

    def recording_real_batch(self):
        x, y = real_batch(self)
        seen["real"].append(y.clone())
        return x, y

    monkeypatch.setattr(module, "build_models", recording_build)
    monkeypatch.setattr(module.Run, "real_batch", recording_real_batch)
    data = classes_folder(tmp_path, ["a", "b", "c"])
    run("acgan.py", "--data", data, "--steps", 3, "--out", "out", "--device", "cpu",
        "--sample-every", 100)
    for step, logged in enumerate(seen["logged"]):
        c_real, c_fake = seen["logits"][3 * step:3 * step + 2]   # D(real), D(fake), then D(G(z))
        acc_real = (c_real.argmax(1) == seen["real"][step]).float().mean().item()
        acc_fake = (c_fake.argmax(1) == seen["asked"][step]).float().mean().item()
        assert logged["acc_real"] == pytest.approx(acc_real) and logged["acc_fake"] == acc_fake
    header = (tmp_path / "out" / "log.csv").read_text().splitlines()[0].split(",")
    assert "acc_real" in header and "acc_fake" in header


def test_cgan_D_depends_on_the_label():
    module = load_script("cgan.py")
    args = module.parse_args(TINY["cgan.py"] + ["--channels", "1"])
    args.n_classes = 3
    D = module.build_models(args)[1].eval()
    x = torch.randn(1, 1, IMG, IMG)
    with torch.no_grad():
        logits = torch.cat([D(x, torch.tensor([k])) for k in range(3)])
    assert len(set(np.round(logits.numpy(), 6).tolist())) == 3
