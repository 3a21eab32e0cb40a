"""Long runs: kept snapshots (resumed exactly, generated from), the warning that training is failing
(fires on a run built to fail, once per episode, silent on a healthy one), --stop-on-collapse."""
import pytest

from common import (TINY, data_for, error_of, load, load_script, make_folder, models_from, observe,
                    run, tensors_equal)

S = "dcgan.py"


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "images", n=12)


def warnings_in(text):
    return [line for line in text.splitlines() if "training is failing" in line]


def test_snapshots_are_kept_resumed_and_generated_from(tmp_path, data):
    common = ["--data", data, "--device", "cpu", "--seed", 1]
    run(S, *common, "--steps", 10, "--out", "five")            # default: --steps / 5
    assert sorted(p.name for p in (tmp_path / "five").glob("step_*.pt")) == \
        [f"step_{s:06d}.pt" for s in (2, 4, 6, 8, 10)]
    run(S, *common, "--steps", 6, "--keep-every", 3, "--out", "straight")
    kept = tmp_path / "straight" / "step_000003.pt"
    assert sorted(p.name for p in kept.parent.glob("step_*.pt")) == ["step_000003.pt",
                                                                    "step_000006.pt"]
    assert load(kept)["step"] == 3
    # back to the snapshot of step 3, in another folder: the same step 6 as the straight run
    run(S, "--steps", 6, "--resume", kept, "--out", "again")
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "again" / "last.pt")
    assert a["step"] == b["step"] == 6 and tensors_equal(a, b) == []
    run(S, "--generate", 3, "--ckpt", kept, "--out", "gen", "--device", "cpu")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 3


FAILING = ["--ngf", 1, "--lr", "2e-3", "--steps", 200, "--log-every", 10]   # G far too weak


def test_the_warning_fires_on_a_run_built_to_fail(data, capsys):
    run(S, "--data", data, "--device", "cpu", "--out", "out", *FAILING)
    said = warnings_in(capsys.readouterr().err)
    assert len(said) == 1 and "D wins" in said[0] and "out/step_<N>.pt" in said[0], said


def test_the_warning_is_silent_on_a_healthy_run(data, capsys):
    run(S, "--data", data, "--device", "cpu", "--out", "out", "--steps", 200, "--log-every", 10)
    assert warnings_in(capsys.readouterr().err) == []


def test_the_warning_is_said_once_per_episode(data, monkeypatch, capsys):
    """Steps 1-6 are not judged (the first tenth of a run: D often wins at first); failing log
    lines 7-14, healthy 15, failing 16-22 (one episode: it ends after 20 healthy lines in a row),
    healthy 23-42, failing 43-60: two warnings, each after five failing lines in a row."""
    module = load_script(S)
    healthy, now = {15, *range(23, 43)}, {}
    observe(module, monkeypatch, lambda run, stats: now.update(step=run.step))  # the line's step
    monkeypatch.setattr(module, "failing", lambda m, args: None if now["step"] in healthy else "x")
    run(S, "--data", data, "--device", "cpu", "--out", "out", "--steps", 60, "--log-every", 1)
    said = warnings_in(capsys.readouterr().err)
    assert [line.split("step ")[1].split(":")[0] for line in said] == ["11", "47"]


def test_stop_on_collapse_saves_and_exits_with_status_3(tmp_path, data, capsys):
    with pytest.raises(SystemExit) as e:
        run(S, "--data", data, "--device", "cpu", "--out", "out", "--stop-on-collapse", *FAILING)
    assert e.value.code == 3
    out = capsys.readouterr()
    step = int(warnings_in(out.err)[0].split("step ")[1].split(":")[0])
    assert f"stopped at step {step}" in out.out
    assert load(tmp_path / "out" / "last.pt")["step"] == step < 200


@pytest.mark.parametrize("script, healthy, failed", [
    ("lsgan.py", {"D_x": 0.8, "D_G_z": 0.2}, {"D_x": 0.99, "D_G_z": 0.02}),
    ("acgan.py", {"D_x": 0.8, "D_G_z": 0.2, "acc_real": 0.99, "acc_fake": 0.97},
     {"D_x": 0.8, "D_G_z": 0.2, "acc_real": 0.85, "acc_fake": 0.99}),
    ("ebgan.py", {"pull_away": 0.15}, {"pull_away": 0.5}),
    ("wgan.py", {"wasserstein": 0.05}, {"wasserstein": 2e-5}),
    ("wgan_gp.py", {"wasserstein": 3.0}, {"wasserstein": 5e3}),
])
def test_each_loss_family_has_its_sign(script, healthy, failed):
    module = load_script(script)
    args = module.parse_args([])
    assert module.failing(healthy, args) is None
    assert module.failing(failed, args)
    if script == "lsgan.py":                                    # the -1 1 0 variant: other targets
        args = module.parse_args(["--targets", "-1", "1", "0"])
        assert module.failing({"D_x": 0.99, "D_G_z": -0.98}, args)
        assert module.failing(failed, args) is None


def test_bad_keep_every(data):
    assert "--keep-every" in error_of(S, "--data", data, "--keep-every", -1)


def resumed_exactly(script, tmp_path, flag):
    """Four steps with `flag` straight, and two plus two with a --resume between: the two
    checkpoints must be equal. Returns the checkpoint and the models rebuilt from its flags."""
    flags = ["--data", data_for(script, tmp_path), "--device", "cpu", flag, "--log-every", 2]
    run(script, *flags, "--steps", 4, "--out", "straight")
    run(script, *flags, "--steps", 2, "--out", "split")
    run(script, "--steps", 4, "--out", "split", "--resume")
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert tensors_equal(a, b) == []
    return (a, *models_from(a))


@pytest.mark.parametrize("script", ["vanilla_gan.py", "dcgan.py", "cgan.py", "acgan.py",
                                    "lsgan.py"])
def test_spectral_norm_replaces_batchnorm_in_D_and_resumes_exactly(script, tmp_path):
    """The remedy for long runs: no BatchNorm in D, every conv and linear layer normalised by its
    largest singular value (power iteration state in the checkpoint), and exact resume."""
    nn = load_script(script).nn
    ckpt, _, D = resumed_exactly(script, tmp_path, "--spectral-norm")
    assert any("_u" in k for k in ckpt["D"])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)


def test_ebgan_without_batchnorm_in_D_resumes_exactly(tmp_path):
    """ebgan.py --no-d-batchnorm: D's encoder and decoder hold no BatchNorm (checked on the model
    rebuilt from the checkpoint's flags), G keeps its own, and resume stays exact."""
    ckpt, G, D = resumed_exactly("ebgan.py", tmp_path, "--no-d-batchnorm")
    assert ckpt["args"]["no_d_batchnorm"]
    batchnorm = load_script("ebgan.py").nn.modules.batchnorm._BatchNorm
    assert not any(isinstance(m, batchnorm) for m in D.modules())
    assert any(isinstance(m, batchnorm) for m in G.modules())


@pytest.mark.parametrize("script, flag", [("dcgan.py", "--spectral-norm"),
                                          ("cgan.py", "--spectral-norm"),
                                          ("acgan.py", "--spectral-norm"),
                                          ("lsgan.py", "--spectral-norm"),
                                          ("ebgan.py", "--no-d-batchnorm")])
def test_a_D_without_batchnorm_keeps_its_layers(script, flag):
    """A D whose BatchNorm is taken out keeps its layers as they were, without the bias DCGAN
    leaves out next to BatchNorm (one added in those layers, or in all, drew worse digits at 8,000
    steps: docs/long-runs.md). G keeps its BatchNorm."""
    module = load_script(script)
    nn = module.nn
    weighted = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    batchnorm = nn.modules.batchnorm._BatchNorm

    def models(*flags):
        args = module.parse_args([*TINY[script], "--channels", "1", *flags])
        args.n_classes = 3
        return module.build_models(args)

    def layers(net):
        return [(tuple(m.weight.shape), m.bias is not None)
                for m in net.modules() if isinstance(m, weighted)]

    G0, recipe = models()
    G, D = models(flag)
    assert any(isinstance(m, batchnorm) for m in recipe.modules())
    assert not any(isinstance(m, batchnorm) for m in D.modules())
    assert layers(D) == layers(recipe) and not all(bias for _, bias in layers(D))
    assert layers(G) == layers(G0) and any(isinstance(m, batchnorm) for m in G.modules())
