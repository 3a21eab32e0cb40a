"""Quality you can measure: FID, KID, precision and recall (torch-fidelity) during training and
of one checkpoint (--eval), metrics.csv, fid.png, best.pt, and the warning when FID rises. No test
needs the network or Inception's weights: tests/fidelity/fid_extractor.py registers a small fixed
extractor, "test-extractor", here and (through sitecustomize) in the scripts' own processes."""
import os
import sys

import numpy as np
import pytest
import torch

from common import (REPO, TINY, error_of, load, load_script, make_folder, run,
                    run_subprocess, tensors_equal)

sys.path.insert(0, str(REPO / "tests" / "fidelity"))
import fid_extractor  # noqa: E402  (registers "test-extractor")

S = "dcgan.py"
EVAL = ["--eval-features", "test-extractor", "--eval-samples", 40]


def train(*args, script=S):
    return run(script, "--device", "cpu", *args)


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "images", n=40)


def judge(module, data, G, n=40):
    args = module.parse_args(["--data", str(data), "--img-size", "16", *map(str, EVAL[:2]),
                              "--eval-samples", str(n)])
    cpu = torch.device("cpu")
    return module.Judge(args, module.load_data(args, cpu), cpu)


class Images(torch.nn.Module):
    """A "G" that draws the training images themselves (in the judge's order), shifted."""

    def __init__(self, images, shift=0.0):
        super().__init__()
        self.images, self.shift, self.i = images.float() / 127.5 - 1, shift, 0

    def forward(self, z):
        x = self.images[self.i:self.i + len(z)]
        self.i += len(z)
        return (x + self.shift).clamp(-1, 1)


def test_identical_sets_score_zero_and_a_colour_shift_does_not(data):
    module = load_script(S)
    j = judge(module, data, None)
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    images = module.load_data(j.args, torch.device("cpu"))["images"][pick]
    same, shifted = j(Images(images)), j(Images(images, shift=0.6))
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    assert shifted["fid"] > 0.05 and shifted["fid"] > 1e6 * abs(same["fid"])
    assert abs(same["kid"]) < shifted["kid"] / 10           # (KID: unbiased, so noisy at 40)


def test_fid_is_the_closed_form_for_known_gaussians(data, monkeypatch):
    """Features drawn from N(mu_1, diag(a)) and N(mu_2, diag(b)): FID is |mu_1 - mu_2|^2 +
    sum(a + b - 2 sqrt(ab)), within the sampling error of 20,000 draws."""
    module = load_script(S)
    g = torch.Generator().manual_seed(0)
    a, b, mu = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5, torch.ones(8)
    real = torch.randn(20000, 8, generator=g, dtype=torch.float64) * a.sqrt()
    fake = torch.randn(20000, 8, generator=g, dtype=torch.float64) * b.sqrt() + mu
    j = judge(module, data, None)
    j.real, j.args.eval_samples = real, 20000
    draws = iter(fake.split(250))                           # the judge asks 250 at a time
    monkeypatch.setattr(j, "features", lambda x: next(draws))
    import torch_fidelity.metric_prc as metric_prc          # 20,000 x 20,000 distances: 30 s
    monkeypatch.setattr(metric_prc, "prc_features_to_metric",
                        lambda *a, **k: {"precision": 1.0, "recall": 1.0})
    fid = j(lambda z: torch.zeros(len(z), 3, 16, 16))["fid"]
    exact = (mu.square().sum() + (a + b - 2 * (a * b).sqrt()).sum()).item()
    assert fid == pytest.approx(exact, rel=0.03)


def test_grey_images_reach_the_extractor_as_three_channels_of_bytes(tmp_path):
    module = load_script(S)
    grey = make_folder(tmp_path / "grey", n=12)
    fid_extractor.SEEN.clear()
    judge(module, grey, None, n=12)                          # the real images' features
    args = module.parse_args(["--data", str(grey), "--img-size", "16", "--channels", "1",
                              *map(str, EVAL[:2]), "--eval-samples", "12"])
    cpu = torch.device("cpu")
    module.Judge(args, module.load_data(args, cpu), cpu)
    assert fid_extractor.SEEN and all(d == torch.uint8 and s[1] == 3 for d, s in fid_extractor.SEEN)


FORCED = [9.0, 4.0, 6.0, 5.0]                                # FID at steps 2, 4, 6, 8


def forced_fids(module, monkeypatch, values):
    """Make each evaluation's FID the next of `values` (KID, precision, recall as computed)."""
    import torch_fidelity.metric_fid as metric_fid
    values = iter(values)
    monkeypatch.setattr(metric_fid, "fid_statistics_to_metric",
                        lambda *a: {"frechet_inception_distance": next(values)})


def test_a_run_judged_writes_metrics_keeps_the_best_and_trains_the_same(data, tmp_path,
                                                                       monkeypatch, capsys):
    module = load_script(S)
    forced_fids(module, monkeypatch, FORCED)
    common = ["--data", data, "--steps", 8, "--keep-every", 4, "--log-every", 2]
    train(*common, "--out", "judged", "--eval-every", 2, *EVAL)
    rows = (tmp_path / "judged" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,fid,kid,kid_std,precision,recall,samples,seconds"
    assert [r.split(",")[:2] for r in rows[1:]] == [["2", "9.0"], ["4", "4.0"], ["6", "6.0"],
                                                   ["8", "5.0"]]
    assert load(tmp_path / "judged" / "best.pt")["step"] == 4      # the logged minimum
    assert tensors_equal(load(tmp_path / "judged" / "best.pt"),
                         load(tmp_path / "judged" / "step_000004.pt")) == []
    assert (tmp_path / "judged" / "fid.png").is_file()
    out = capsys.readouterr().out
    assert "[4/8] FID 4 KID" in out and "(best)" in out
    assert f"best: FID 4 at step 4, {tmp_path / 'judged' / 'best.pt'}" in out.replace(
        "judged/best.pt", str(tmp_path / "judged" / "best.pt"))
    train(*common, "--out", "plain", "--eval-every", 0)
    assert tensors_equal(load(tmp_path / "judged" / "last.pt"),
                         load(tmp_path / "plain" / "last.pt")) == []


def test_resume_carries_the_best_on(data, tmp_path, monkeypatch):
    module = load_script(S)
    forced_fids(module, monkeypatch, [9.0, 4.0, 6.0, 3.5])
    common = ["--data", data, "--log-every", 2, "--eval-every", 2, *EVAL]
    train(*common, "--steps", 4, "--out", "x")
    train("--steps", 6, "--out", "x", "--resume")                 # FID 6: not the best
    assert load(tmp_path / "x" / "best.pt")["step"] == 4
    train("--steps", 8, "--out", "x", "--resume")                 # 3.5: the best
    assert load(tmp_path / "x" / "best.pt")["step"] == 8
    rows = (tmp_path / "x" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["2", "4", "6", "8"]


@pytest.mark.parametrize("fids, warned", [([5.0, 4.0, 5.2, 4.9, 5.1], False),
                                          ([5.0, 4.0, 5.1, 5.2, 6.0], True),
                                          ([9.0, 8.0, 7.0, 6.0, 5.0], False)])
def test_the_warning_fires_when_fid_rises_from_its_best(fids, warned, data, monkeypatch,
                                                        capsys):
    """FID 25% over its best at two evaluations in a row: training is failing, said with the
    best step and its file; --stop-on-collapse stops there (exit status 3)."""
    module = load_script(S)
    forced_fids(module, monkeypatch, fids)
    flags = ["--data", data, "--steps", 10, "--log-every", 2, "--eval-every", 2, *EVAL,
             "--out", "x", "--stop-on-collapse"]
    if warned:
        with pytest.raises(SystemExit) as e:
            train(*flags)
        assert e.value.code == 3
        err = capsys.readouterr().err
        assert "step 8: training is failing: FID rose from 4 (step 4, best.pt) to 5.2" in err
    else:
        train(*flags)
        assert "training is failing" not in capsys.readouterr().err


def test_the_conditional_scripts_draw_every_class_in_turn(tmp_path, monkeypatch):
    module = load_script("cgan.py")
    data = make_folder(tmp_path / "pets", n=12, classes=["cat", "dog", "owl"])
    drawn = []
    real_forward = module.Generator.forward

    def forward(self, z, labels):
        if not self.training:
            drawn.append(labels.tolist())
        return real_forward(self, z, labels)

    monkeypatch.setattr(module.Generator, "forward", forward)
    run("cgan.py", "--data", data, "--steps", 2, "--eval-every", 2, "--device", "cpu",
        "--sample-every", 100, "--eval-features", "test-extractor", "--eval-samples", 30,
        "--out", "c")
    judged = [y for batch in drawn if len(batch) == 30 for y in batch]   # (not the grid's 24)
    assert np.bincount(judged, minlength=3).tolist() == [10, 10, 10]


def test_eval_judges_one_checkpoint_alone(data, tmp_path, capsys):
    """--eval --ckpt prints the four figures and the protocol, writes nothing into the run's
    folder but works while another run holds it."""
    from common import another_run_holds
    train("--data", data, "--steps", 2, "--out", "x")
    before = sorted(p.name for p in (tmp_path / "x").iterdir())
    capsys.readouterr()
    with another_run_holds("x", tmp_path):
        train("--eval", "--ckpt", tmp_path / "x" / "last.pt", *EVAL)
    out = capsys.readouterr().out
    assert "fid " in out and "kid " in out and "precision " in out and "recall " in out
    assert "FID, test-extractor (torch-fidelity), 40 samples vs 40 training images at 16x16" in out
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == before


def test_without_the_package_or_the_weights_one_line(data, tmp_path, monkeypatch, capsys):
    train("--data", data, "--steps", 2, "--out", "x")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)      # not installed
    train("--data", data, "--steps", 2, "--out", "y", "--eval-every", 1, *EVAL)
    err = capsys.readouterr().err
    assert err.count("pip install torch-fidelity") == 1 and (tmp_path / "y" / "last.pt").exists()
    assert "pip install torch-fidelity" in error_of(S, "--eval", "--ckpt", "x/last.pt")
    monkeypatch.delitem(sys.modules, "torch_fidelity")           # installed again
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))   # no cached weights
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    monkeypatch.setattr(inception, "load_state_dict_from_url", _offline)
    train("--data", data, "--steps", 2, "--out", "z", "--eval-every", 1, "--eval-samples", 40)
    err = capsys.readouterr().err
    assert "the weights of inception-v3-compat could not be had" in err and "--fid-weights" in err
    assert err.count("\n") == 1 and (tmp_path / "z" / "last.pt").exists()


def _offline(*a, **kw):
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


def test_bad_evaluation_flags_are_one_line(data, tmp_path):
    assert "--eval-samples must be in 1.." in error_of(S, "--eval-samples", 0)
    # (probe) 3 samples ended in a traceback from precision and recall's 4th neighbour
    assert "--eval-samples must be at least 10, got 3" in error_of(S, "--eval-samples", 3)
    train("--data", data, "--steps", 1, "--out", "x")
    assert "no checkpoint at runs/dcgan/last.pt" in error_of(S, "--eval")
    assert "no such feature extractor" in error_of(S, "--eval", "--ckpt", "x/last.pt",
                                                   "--eval-features", "nonesuch")


def test_a_script_judged_in_its_own_process(data, tmp_path):
    """The scripts' processes see the test extractor through sitecustomize; a run and --eval."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fidelity"),
                                          os.environ.get("PYTHONPATH", "")])}
    flags = [*TINY[S], "--device", "cpu", "--data", data, "--steps", 2, "--eval-every", 2, *EVAL]
    res = run_subprocess(REPO / S, *flags, "--out", "x", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "FID" in res.stdout and (tmp_path / "x" / "best.pt").exists()


def test_the_fid_table_benchmark_on_tiny_data(data, tmp_path):
    """benchmarks/fid_table.py, on a tiny folder with the test extractor: a table per script with
    the four figures of last.pt, and the published figures beside them."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fidelity"),
                                          os.environ.get("PYTHONPATH", "")])}
    res = run_subprocess(REPO / "benchmarks" / "fid_table.py", "--scripts", "dcgan.py", "--steps",
                         2, "--data", data, "--out", tmp_path / "table", "--eval-samples", 40,
                         "--eval-features", "test-extractor", "--", *TINY[S], "--device", "cpu",
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("| last.pt |"))
    assert len([float(x) for x in row.split("|")[2:6]]) == 4 and "| 2 | 8 |" in row
    assert "published: FID 48.29 (PyTorch-StudioGAN" in res.stdout
    assert "ours: FID, test-extractor (torch-fidelity), 40 samples vs 40 training images" in \
        res.stdout


def test_a_handful_of_training_images_is_judged_without_a_traceback(tmp_path):
    """(probe) precision and recall take each image's 3rd neighbour: with 3 training images the
    run died in a traceback. Fewer neighbours for fewer images."""
    few = make_folder(tmp_path / "few", n=3)
    train("--data", few, "--steps", 2, "--eval-every", 2, *EVAL, "--out", "x")
    rows = (tmp_path / "x" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("2,")
