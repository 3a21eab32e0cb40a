"""--cuda-graph: a whole step captured as one CUDA graph and replayed. On a CPU the flag says so in
one line and trains exactly as without it; on a GPU (these tests skip elsewhere) the captured step
computes what the eager one does, resumes as the README says, and never syncs the host, for one
script of each loss family: BCE (dcgan.py), the critic with its double backward (wgan_gp.py) and
the energy (ebgan.py); and a step that cannot be captured trains on eagerly, said in one line."""
import pytest
import torch

from common import REPO, TINY, data_for, load, load_script, run, run_subprocess, tensors_equal

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU")
FAMILIES = ["dcgan.py", "wgan_gp.py", "ebgan.py"]


def close(a, b, rtol=1e-3, atol=1e-4):
    """The differences between two checkpoints' models, beyond float tolerance."""
    return [f"{net}.{k}" for net in ("G", "D") for k, v in a[net].items()
            if v.is_floating_point() and not torch.allclose(v, b[net][k], rtol=rtol, atol=atol)]


def test_the_flag_falls_back_on_a_cpu_in_one_line(tmp_path, capsys):
    data = data_for("wgan.py", tmp_path)
    flags = ["--data", data, "--device", "cpu", "--steps", 3, "--seed", 4]
    run("wgan.py", *flags, "--out", "plain")
    capsys.readouterr()
    run("wgan.py", *flags, "--out", "graphed", "--cuda-graph")
    said = [line for line in capsys.readouterr().out.splitlines() if "cuda-graph" in line]
    assert said == ["--cuda-graph is for CUDA; running without it on cpu"]
    assert tensors_equal(load(tmp_path / "plain" / "last.pt"),
                         load(tmp_path / "graphed" / "last.pt")) == []


@needs_cuda
@pytest.mark.parametrize("script", FAMILIES)
def test_a_captured_step_computes_the_eager_one(script, tmp_path):
    """Replayed, the graph draws the same random numbers as the eager steps (the generator's
    offsets are the graph's) and runs the same kernels: the models end within float tolerance."""
    data = data_for(script, tmp_path)
    flags = ["--data", data, "--device", "cuda", "--steps", 12, "--seed", 2, "--log-every", 4]
    run(script, *flags, "--out", "eager")
    run(script, *flags, "--out", "graphed", "--cuda-graph")
    eager, graphed = load(tmp_path / "eager" / "last.pt"), load(tmp_path / "graphed" / "last.pt")
    assert close(eager, graphed) == []
    assert tensors_equal(eager, load(tmp_path / "eager" / "step_000004.pt")) != []  # it trained


@needs_cuda
@pytest.mark.parametrize("script", FAMILIES)
def test_resume_under_the_flag(script, tmp_path):
    """12 captured steps in one go, and 6 + --resume to 12: the same models to float tolerance
    (after a resume the first steps run eagerly again, then the step is captured anew)."""
    data = data_for(script, tmp_path)
    flags = ["--data", data, "--device", "cuda", "--seed", 5, "--cuda-graph", "--log-every", 3]
    run(script, *flags, "--steps", 12, "--out", "straight")
    run(script, *flags, "--steps", 6, "--out", "split")
    run(script, "--steps", 12, "--out", "split", "--device", "cuda", "--resume")
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 12 and close(a, b) == []


@needs_cuda
@pytest.mark.parametrize("script", FAMILIES)
def test_replays_never_sync_the_host(script, tmp_path, monkeypatch):
    """Between log lines a captured step makes no host synchronisation: steps 6 to 9 run under
    torch.cuda.set_sync_debug_mode("error"), which raises on any sync."""
    module = load_script(script)

    def strict_between(run_, stats):
        torch.cuda.set_sync_debug_mode("error" if 5 <= run_.step < 9 else "default")

    monkeypatch.setattr(module.Run, "observers", [strict_between])
    try:
        run(script, "--data", data_for(script, tmp_path), "--device", "cuda", "--steps", 10,
            "--cuda-graph", "--log-every", 10, "--sample-every", 10, "--ckpt-every", 10,
            "--keep-every", 10, "--out", "out")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert load(tmp_path / "out" / "last.pt")["step"] == 10


@needs_cuda
def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_why(tmp_path):
    """A host sync (.item()) planted in dcgan.py's step: the capture fails at that sync, and CUDA
    then fails the capture's end "due to a previous error during capture". The run goes on eagerly
    after one warning line that names the first error (the sync), not the second, and ends with
    exit 0 and last.pt; or it stops with one error line that names it. Never a traceback. (A copy
    of the script runs in a subprocess: a failed capture leaves no CUDA state to other tests.)"""
    text = (REPO / "dcgan.py").read_text()
    end_of_step = "        opt_G.step()\n        return dict("
    assert text.count(end_of_step) == 1
    planted = end_of_step.replace("\n", "\n        loss_G.item()  # planted: a host sync\n", 1)
    (tmp_path / "dcgan.py").write_text(text.replace(end_of_step, planted))
    p = run_subprocess(tmp_path / "dcgan.py", *TINY["dcgan.py"], "--data",
                       data_for("dcgan.py", tmp_path), "--device", "cuda", "--steps", 8,
                       "--cuda-graph", "--log-every", 4, "--out", "out", cwd=tmp_path,
                       env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if p.returncode == 0:
        assert load(tmp_path / "out" / "last.pt")["step"] == 8
        said = [line for line in p.stderr.splitlines() if "cuda-graph" in line]
        assert len(said) == 1, p.stderr[-3000:]
    else:                                                # or it stops, in one line
        said = p.stderr.strip().splitlines()[-1:]
        assert said and said[0].startswith("dcgan.py: error: "), p.stderr[-3000:]
    assert any(word in said[0] for word in ("item", "sync", "not permitted", "capturing")), said
    assert "previous error" not in said[0], said          # the consequence, not the cause
