"""The loss-function family (wgan.py, wgan_gp.py, lsgan.py, ebgan.py): what makes each script its
paper, checked against hand-written references. (The generic end-to-end tests run them through
test_scripts.py.)"""
import functools
import importlib.util
import sys

import pytest
import torch
import torch.nn as nn

from common import REPO, TINY, load, load_script, make_folder, models_from, record_steps, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "images", n=12)


def tiny_args(module, script, channels=3):
    """The flags of a tiny run, with the channels of the folders that make_folder writes (colour).
    """
    return module.parse_args([*TINY[script], "--channels", str(channels)])


def load_without_kernels(script, monkeypatch):
    """The script as a notebook sees it, pasted alone: `import kernels` fails, its own fallback is
    defined."""
    # makes `from kernels import ...` raise ImportError
    monkeypatch.setitem(sys.modules, "kernels", None)
    spec = importlib.util.spec_from_file_location("alone_" + script[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- WGAN
def counted_clips(monkeypatch):
    """wgan.py's clip_weights_, still clipping, recording the bound of each call."""
    module = load_script("wgan.py")
    calls = []
    real_clip = module.clip_weights_

    def counting_clip(params, c):
        calls.append(c)
        real_clip(params, c)

    monkeypatch.setattr(module, "clip_weights_", counting_clip)
    return calls


def test_wgan_critic_weights_are_clipped_after_every_critic_step(data, tmp_path, monkeypatch):
    calls = counted_clips(monkeypatch)
    # below most of the N(0, 0.02) initial weights
    c = 0.005
    run("wgan.py", "--data", data, "--steps", 3, "--clip", c, "--out", "out", "--device", "cpu")
    # once at the start, then after each of 3 x 2 critic steps
    assert calls == [c] * (1 + 3 * 2)

    G, D = models_from(load(tmp_path / "out" / "last.pt"))
    params = torch.cat([p.detach().flatten() for p in D.parameters()])
    # every critic parameter within [-c, c] ...
    assert params.abs().max() <= c
    # ... and the bound is active, not trivially met
    assert (params.abs() == c).float().mean() > 0.1
    assert max(p.abs().max() for p in G.parameters()) > c    # G is never clipped


def test_wgan_warmup_clips_too(data, tmp_path, monkeypatch):
    """With the paper's warm-up (100 critic steps at the first generator step, critic_iters) the
    weights are clipped after each of them, and end clipped."""
    calls = counted_clips(monkeypatch)
    c = 0.005
    run("wgan.py", "--data", data, "--steps", 1, "--clip", c, "--critic-warmup", "--out", "out",
        "--device", "cpu")
    assert calls == [c] * (1 + 100)                          # at the start, then 100 critic steps
    D = models_from(load(tmp_path / "out" / "last.pt"))[1]
    assert all(p.abs().max() <= c for p in D.parameters())


def test_wgan_critic_schedule_is_the_papers_and_a_function_of_the_step():
    critic_iters = load_script("wgan.py").critic_iters
    # the first 25 generator steps
    assert [critic_iters(s, 5, True) for s in (1, 2, 25)] == [100, 100, 100]
    assert [critic_iters(s, 5, True) for s in (26, 27, 500, 502, 1000)] == [5] * 5
    # every 500th (0-based)
    assert [critic_iters(s, 5, True) for s in (501, 1001, 1501)] == [100] * 3
    assert {critic_iters(s, 3, False) for s in range(1, 2000)} == {3}


def test_wgan_has_no_sigmoid_and_rmsprop(data, tmp_path):
    module = load_script("wgan.py")
    D = module.build_models(tiny_args(module, "wgan.py"))[1]
    assert not any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in D.modules())
    run("wgan.py", "--data", data, "--steps", 1, "--out", "out", "--device", "cpu")
    opt_D = load(tmp_path / "out" / "last.pt")["opt_D"]
    # RMSprop's
    assert opt_D["param_groups"][0]["lr"] == 5e-5 and "alpha" in opt_D["param_groups"][0]


# ------------------------------------------------------------------------------------------ WGAN-GP
class QuadraticCritic(nn.Module):
    """D(x) = sum_chw (a * x^2 + w * x): its input gradient 2 a x + w is known by hand and depends
    on x, so a wrong interpolation (eps per pixel) or a norm over the wrong axes gives a different
    number."""

    def __init__(self, a, w):
        super().__init__()
        self.a, self.w = nn.Parameter(a), nn.Parameter(w)

    def forward(self, x):
        return (self.a * x * x + self.w * x).flatten(1).sum(1)


@pytest.mark.parametrize("one_sided", [False, True], ids=["two-sided", "one-sided"])
def test_penalty_equals_a_hand_written_reference(one_sided):
    module = load_script("wgan_gp.py")
    gen = torch.Generator().manual_seed(0)
    # C, H, W: odd sizes, more than one channel
    B, shape = 6, (2, 5, 3)
    a = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.2
    w = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.13  # norms on both sides of 1
    real = torch.rand(B, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    fake = torch.rand(B, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    D = QuadraticCritic(a.clone(), w.clone())

    torch.manual_seed(123)
    penalty = module.critic_penalty(D, real, fake, weight=10.0, one_sided=one_sided)

    # the same eps: one per sample, uniform in [0, 1)
    torch.manual_seed(123)
    eps = torch.rand(B, 1, 1, 1, dtype=torch.float64)
    x_hat = eps * real + (1 - eps) * fake
    grad = 2 * a * x_hat + w                                 # d/dx of a x^2 + w x
    norms = grad.pow(2).sum(dim=(1, 2, 3)).sqrt()            # over C, H and W of each sample
    gap = (norms - 1).clamp(min=0) if one_sided else norms - 1
    reference = 10.0 * gap.pow(2).mean()
    # both branches of the one-sided variant are used
    assert (norms > 1).any() and (norms < 1).any()
    assert penalty.dtype == torch.float64
    torch.testing.assert_close(penalty, reference, rtol=1e-12, atol=1e-12)

    # and its gradient w.r.t. the critic's weights (the double backward), by hand:
    # d/da of 10 mean_b f(n_b - 1) = 10/B sum_b f'(n_b - 1) * sum_chw (grad_b / n_b) * 2 x_hat_b
    penalty.backward()
    f_prime = 2 * gap
    coeff = (10.0 / B * f_prime / norms).view(B, 1, 1, 1) * grad
    torch.testing.assert_close(D.a.grad, (coeff * 2 * x_hat).sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(D.w.grad, coeff.sum(0), rtol=1e-10, atol=1e-12)


def test_penalty_on_the_scripts_critic_uses_per_sample_gradients():
    """On the script's own critic (float64): the penalty equals one computed sample by sample, which
    holds only because the critic has no BatchNorm (each output depends on its own image alone)."""
    module = load_script("wgan_gp.py")
    torch.manual_seed(0)
    D = module.build_models(tiny_args(module, "wgan_gp.py", channels=1))[1].double()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    real, fake = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64) * 2 - 1

    torch.manual_seed(1)
    penalty = module.critic_penalty(D, real, fake, weight=10.0)
    grads_script = torch.autograd.grad(penalty, list(D.parameters()), allow_unused=True,
                                       materialize_grads=True)

    torch.manual_seed(1)
    eps = torch.rand(5, 1, 1, 1, dtype=torch.float64)
    terms = []
    for i in range(5):                                       # one image at a time
        x = (eps[i] * real[i] + (1 - eps[i]) * fake[i])[None].requires_grad_(True)
        (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        terms.append((g.pow(2).sum().sqrt() - 1) ** 2)
    reference = 10.0 * torch.stack(terms).mean()
    torch.testing.assert_close(penalty, reference, rtol=1e-10, atol=1e-12)
    grads_reference = torch.autograd.grad(reference, list(D.parameters()), allow_unused=True,
                                          # the output bias has no say in grad_x
                                          materialize_grads=True)
    for got, want in zip(grads_script, grads_reference):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    assert any(g.abs().max() > 0 for g in grads_script)     # the penalty does train the critic


def test_penalty_interpolates_bf16_fakes_in_float32():
    """--amp: G's output is bf16, the real images float32. x_hat is taken in float32, as
    eps * x + (1 - eps) * G(z) gives it by type promotion (torch.lerp refuses mixed dtypes)."""
    module = load_script("wgan_gp.py")
    D = QuadraticCritic(torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.2))
    real = torch.rand(3, 1, 4, 4) * 2 - 1
    fake = (torch.rand(3, 1, 4, 4) * 2 - 1).bfloat16()
    torch.manual_seed(7)
    penalty = module.critic_penalty(D, real, fake, weight=10.0)
    torch.manual_seed(7)
    reference = module.critic_penalty(D, real, fake.float(), weight=10.0)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, reference, rtol=0, atol=0)


def test_wgan_gp_has_no_clip_flag():
    """A known mistake of popular repositories: a --clip flag that WGAN-GP never uses."""
    assert "clip" in vars(load_script("wgan.py").parse_args([]))
    assert "clip" not in vars(load_script("wgan_gp.py").parse_args([]))


# --------------------------------------------------------------- kernels and the scripts' fallbacks
@pytest.mark.parametrize("script, op", [("wgan_gp.py", "gradient_penalty"),
                                        ("wgan.py", "clip_weights_")])
def test_kernel_path_and_fallback_train_the_same(script, op, data, tmp_path, monkeypatch):
    """The first training steps with the Triton kernel (on CPU: Triton's interpreter) and with the
    PyTorch fallback end in the same checkpoint, within float32 tolerance."""
    import kernels
    module = load_script(script)
    # in the repository the script uses the kernel
    assert getattr(module, op).__module__.startswith("kernels")
    ckpts = {}
    for impl in ("triton", "torch"):
        monkeypatch.setattr(module, op, functools.partial(getattr(kernels, op), impl=impl))
        run(script, "--data", data, "--steps", 3, "--seed", 5, "--out", impl, "--device", DEVICE)
        ckpts[impl] = load(tmp_path / impl / "last.pt")
    for part in ("G", "D"):
        for name, want in ckpts["torch"][part].items():
            got = ckpts["triton"][part][name]
            assert torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-6), f"{part}.{name}"
    # the same optimiser moments too (the penalty's gradient reaches them)
    for k, state in ckpts["torch"]["opt_D"]["state"].items():
        for name, want in state.items():
            got, want = ckpts["triton"]["opt_D"]["state"][k][name].float(), want.float()
            atol = 1e-5 * want.abs().max()
            assert torch.allclose(got, want, rtol=1e-4, atol=atol), f"opt_D.{k}.{name}"


def test_fallbacks_compute_what_the_kernels_fallback_computes(monkeypatch):
    """Pasted alone, wgan_gp.py and wgan.py define their own few lines; they must equal kernels'
    fallback."""
    import kernels
    alone_gp = load_without_kernels("wgan_gp.py", monkeypatch)
    alone_clip = load_without_kernels("wgan.py", monkeypatch)
    assert alone_gp.gradient_penalty.__module__ == "alone_wgan_gp"
    assert alone_clip.clip_weights_.__module__ == "alone_wgan"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape in [(1, 3), (7, 3, 5, 5), (4, 1, 16, 16)]:
            grads = (torch.randn(shape) * 0.7).to(dtype)
            grads[0] = 0                                     # a zero-norm row
            for one_sided in (False, True):
                for weight, target in ((10.0, 1.0), (2.5, 0.5)):
                    kw = dict(weight=weight, target=target, one_sided=one_sided)
                    a = alone_gp.gradient_penalty(grads, **kw)
                    b = kernels.gradient_penalty(grads, **kw,
                                                 impl="torch")
                    assert a.dtype == b.dtype and torch.equal(a, b), (dtype, shape, one_sided)
    params_a = [torch.randn(5, 4) * 0.03, torch.randn(7) * 0.03]
    params_b = [p.clone() for p in params_a]
    # a generator, as critic.parameters() is
    alone_clip.clip_weights_(iter(params_a), 0.01)
    kernels.clip_weights_(iter(params_b), 0.01, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


# -------------------------------------------------------------------------------------------- LSGAN
def test_lsgan_targets_variant(data, tmp_path):
    run("lsgan.py", "--data", data, "--steps", 2, "--targets", "-1", "1", "0", "--out", "out",
        "--device", "cpu")
    ckpt = load(tmp_path / "out" / "last.pt")
    assert list(ckpt["args"]["targets"]) == [-1.0, 1.0, 0.0]
    # the paper's 0-1-1 by default
    assert load_script("lsgan.py").parse_args([]).targets == (0.0, 1.0, 1.0)
    with pytest.raises(SystemExit) as e:
        run("lsgan.py", "--targets", "1", "1", "1")
    assert "--targets" in e.value.code


class ConstantD(nn.Module):
    """A discriminator that says beta to every image: its losses can be written down by hand."""

    def __init__(self, beta):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(beta))

    def forward(self, x):
        return self.beta + 0 * x.flatten(1).sum(1)


@pytest.mark.parametrize("targets", [(0.0, 1.0, 1.0), (-1.0, 1.0, 0.0)], ids=["0-1-1", "-1-1-0"])
def test_lsgan_losses_are_least_squares(targets, data, monkeypatch):
    module = load_script("lsgan.py")
    real_build = module.build_models
    monkeypatch.setattr(module, "build_models", lambda args: (real_build(args)[0], ConstantD(0.3)))
    logged = record_steps(module, monkeypatch)
    run("lsgan.py", "--data", data, "--steps", 1, "--targets", *targets, "--out", "out",
        "--device", "cpu")
    loss_D, loss_G, d_real, d_fake = logged[0].values()
    a, b, c = targets
    assert d_real == pytest.approx(0.3) and d_fake == pytest.approx(0.3)
    assert loss_D == pytest.approx(0.5 * (0.3 - b) ** 2 + 0.5 * (0.3 - a) ** 2, rel=1e-6)
    # G's loss sees D after its first Adam step, which moves beta by lr against dL_D/dbeta's sign
    beta = 0.3 - 2e-4 * (1 if (0.3 - b) + (0.3 - a) > 0 else -1)
    assert loss_G == pytest.approx(0.5 * (beta - c) ** 2, rel=1e-5)


# -------------------------------------------------------------------------------------------- EBGAN
def test_pull_away_term_is_the_mean_squared_cosine_of_pairs():
    pull_away = load_script("ebgan.py").pull_away
    torch.manual_seed(0)
    codes = torch.randn(6, 10, dtype=torch.float64)
    n = len(codes)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                cos = codes[i] @ codes[j] / (codes[i].norm() * codes[j].norm())
                # squared: opposite codes count as similar too
                total += cos ** 2
    expected = (total / (n * (n - 1))).float()
    torch.testing.assert_close(pull_away(codes), expected, rtol=1e-6, atol=1e-7)
    assert pull_away(torch.eye(4, 8)) == 0                   # orthogonal codes: no penalty
    same = torch.randn(1, 8).repeat(5, 1) * torch.tensor([[1.0], [2.0], [-1.0], [3.0], [-0.5]])
    # parallel or opposite: the maximum, 1
    torch.testing.assert_close(pull_away(same), torch.tensor(1.0))


def test_ebgan_energy_is_the_per_sample_reconstruction_mse():
    module = load_script("ebgan.py")
    D = module.build_models(tiny_args(module, "ebgan.py", channels=1))[1].eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    energy, code = D(x)
    assert energy.shape == (4,) and code.shape == (4, 8)
    recon = D.decoder(D.encoder(x).flatten(1))
    torch.testing.assert_close(energy, ((recon - x) ** 2).mean(dim=(1, 2, 3)))


def test_ebgan_margin_hinge(data, monkeypatch):
    """A margin far above any energy: L_D = E[D(x)] + m - E[D(G(z))] exactly (every fake inside the
    hinge)."""
    module = load_script("ebgan.py")
    logged = record_steps(module, monkeypatch)
    run("ebgan.py", "--data", data, "--steps", 1, "--margin", 100, "--out", "out",
        "--device", "cpu")
    step = logged[0]
    hinge = step["energy_real"] + 100 - step["energy_fake"]
    assert step["loss_D"] == pytest.approx(hinge, rel=1e-6)
    assert module.parse_args([]).pt_weight == 0.1
