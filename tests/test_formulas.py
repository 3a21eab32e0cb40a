"""The paper parts' mathematics, pinned: one step of each script's real train() on tiny data,
recorded (every call of G and D, every optimizer update, the logged numbers), against a few
hand-written lines of the paper's formulas on the same tensors; the gradients that each update
applied against autograd of those lines; and what the losses cannot show: G's output in tanh's
range, D's output unbounded, a conditional G that depends on its label, and every model's shapes at
every size. tests/plant_mistakes.py checks that these tests catch the known mistakes."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from common import CONDITIONAL_SCRIPTS, TINY, load_script, make_folder, observe, run

CONV_SCRIPTS = ["dcgan.py", "cgan.py", "acgan.py", "wgan.py", "wgan_gp.py", "lsgan.py", "ebgan.py"]


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "images", n=12)


@pytest.fixture
def classes(tmp_path):
    """Ten classes: a batch of 8 labels leaves some out, so that 'only the asked ones' can fail."""
    return make_folder(tmp_path / "classes", n=2, classes=[f"c{k}" for k in range(10)])


# ----------------------------------------------------------------------------------- the recorder
@dataclass
class Call:
    """One forward call of G or D during training: its inputs (as passed), its output (detached)
    and the weights it ran with."""
    net: str
    inputs: tuple
    output: object
    state: dict
    grad_enabled: bool

    @property
    def x(self):
        return self.inputs[0]


class Recorder:
    """A script's train() run in this process, recorded. steps[s] holds step s+1's training calls
    (in order), updates and real batches, and logged[s] its logged numbers. An update is
    (net, {name: grad}): the gradients that an optimizer step applied."""

    def __init__(self, script, monkeypatch, request):
        self.script, self.module = script, load_script(script)
        self.calls, self.updates, self.reals, self.steps, self.logged = [], [], [], [], []
        self.build, real_batch = self.module.build_models, self.module.Run.real_batch
        monkeypatch.setattr(self.module, "build_models", self.recording_build)
        monkeypatch.setattr(self.module.Run, "real_batch",
                            lambda run: self.reals.append(real_batch(run)) or self.reals[-1])
        observe(self.module, monkeypatch, self.end_of_step)
        handle = register_optimizer_step_pre_hook(self.update)
        request.addfinalizer(handle.remove)

    def recording_build(self, args):
        self.args = args
        self.nets = dict(zip("GD", self.build(args)))
        for name, net in self.nets.items():
            net.register_forward_pre_hook(lambda m, inputs, name=name: self.before(name, inputs))
            net.register_forward_hook(lambda m, inputs, out: self.after(out))
        return self.nets["G"], self.nets["D"]

    def before(self, name, inputs):
        net = self.nets[name]
        if net.training:                                  # not the sample grids (G.eval())
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            self.calls.append(Call(name, inputs, None, state, torch.is_grad_enabled()))

    def after(self, out):
        if self.calls and self.calls[-1].output is None:
            outs = out if isinstance(out, tuple) else (out,)
            outs = tuple(t.detach().clone() for t in outs)
            self.calls[-1].output = outs if isinstance(out, tuple) else outs[0]

    def update(self, opt, args, kwargs):
        first = opt.param_groups[0]["params"][0]
        name = next(k for k, net in self.nets.items() if any(p is first for p in net.parameters()))
        grads = {k: p.grad.detach().clone() for k, p in self.nets[name].named_parameters()
                 if p.grad is not None}
        self.updates.append((name, grads))

    def end_of_step(self, run, stats):
        self.logged.append({k: v.item() for k, v in stats.items()})
        self.steps.append((self.calls, self.updates, self.reals))
        self.calls, self.updates, self.reals = [], [], []

    def train(self, data, *flags, steps=1):
        run(self.script, "--data", data, "--steps", steps, "--out", "out", "--device", "cpu",
            "--sample-every", 1000, *flags)
        return self

    def fresh(self, call):
        """The net of a recorded call, rebuilt with the weights it ran with, in training mode."""
        net = dict(zip("GD", self.build(self.args)))[call.net]
        net.load_state_dict(call.state)
        return net.train()


@pytest.fixture
def record(monkeypatch, request):
    return lambda script: Recorder(script, monkeypatch, request)


def close(got, want, what, rtol=1e-5):
    """A logged number against the formula's value (both float32, the same tensors)."""
    assert got == pytest.approx(float(torch.as_tensor(want).detach()), rel=rtol, abs=1e-7), what


def same_grads(update, net, loss, name):
    """The gradients that an optimizer update applied equal autograd of the hand-written loss."""
    assert update[0] == name
    params = dict(net.named_parameters())
    want = torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                               materialize_grads=True)
    got = update[1]
    assert set(got) <= set(params), set(got) - set(params)
    for (k, p), w in zip(params.items(), want):
        g = got.get(k, torch.zeros_like(w))
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * (1 + w.abs().max().item()),
                                   msg=lambda m, k=k: f"{name}.{k}: {m}")
    assert any(w.abs().max() > 0 for w in want)          # the update does move the net


def fakes_of(call, g_call, graph):
    """D's input is G's output of g_call; with graph=False detached from G (the D step must not
    change G), with graph=True the very tensor (so that G's loss reaches G)."""
    G_out = g_call.output
    assert torch.equal(call.x.detach(), G_out), "D was not given G's images"
    assert call.x.requires_grad == graph and call.grad_enabled, (
        "the D step's fakes carry a graph into G" if not graph else "G's loss cannot reach G")


def again(D, call):
    """D's output on a recorded call's inputs (its images detached from the step's graph)."""
    return D(call.x.detach(), *call.inputs[1:])


def check_D_update(rec, update, g, d_real, d_fake, L_D, penalty=None):
    """D's update: D on the real batch, then on G's images of g, detached; the gradient it applied
    is that of L_D(D's two outputs) (+ penalty(D)), on D's weights of that step."""
    fakes_of(d_fake, g, graph=False)
    assert not d_real.x.requires_grad
    D = rec.fresh(d_real)
    loss = L_D(again(D, d_real), again(D, d_fake))
    same_grads(update, D, loss + penalty(D) if penalty else loss, "D")


def check_G_update(rec, update, g, d_gen, L_G):
    """G's update: D judged G's images of g themselves, and the gradient G got is that of
    L_G(D's output), through D (its weights then) and G (its weights and inputs of g)."""
    fakes_of(d_gen, g, graph=True)
    G, D = rec.fresh(g), rec.fresh(d_gen)
    same_grads(update, G, L_G(D(G(*g.inputs), *d_gen.inputs[1:])), "G")


def log_D(logit):
    """log D(x), D(x) = sigmoid(logit)."""
    return F.logsigmoid(logit)


def log_1_minus_D(logit):
    """log(1 - D(x)) = log sigmoid(-logit)."""
    return F.logsigmoid(-logit)


def log_softmax_at(logits, labels):
    """log P(C = label | x) from the class logits."""
    return logits.log_softmax(1).gather(1, labels[:, None]).squeeze(1)


def one_D_step_one_G_step(rec):
    """The calls of a step that trains D once, then G once on the same fakes: G(z), D(real),
    D(fake, detached), D(fake); and the real batch (images, or (images, labels))."""
    (calls, updates, reals), = rec.steps
    assert [c.net for c in calls] == ["G", "D", "D", "D"] and [u[0] for u in updates] == ["D", "G"]
    assert len(reals) == 1
    return calls, updates, reals[0]


def check_one_D_step_one_G_step(rec, L_D, L_G):
    calls, updates, real = one_D_step_one_G_step(rec)
    g, d_real, d_fake, d_gen = calls
    assert d_real.x is (real[0] if isinstance(real, tuple) else real)   # D(x): the real batch
    check_D_update(rec, updates[0], g, d_real, d_fake, L_D)
    check_G_update(rec, updates[1], g, d_gen, L_G)
    return calls


# -------------------------------------------------------- the GAN game: dcgan, cgan, vanilla_gan
def L_D_gan(d_real, d_fake):
    """D maximises E[log D(x)] + E[log(1 - D(G(z)))]; its loss is the negative."""
    return -log_D(d_real).mean() - log_1_minus_D(d_fake).mean()


def L_G_non_saturating(d_gen):
    """G maximises E[log D(G(z))] (not the saturating: minimise E[log(1 - D(G(z)))])."""
    return -log_D(d_gen).mean()


def check_logged_gan(logged, d_real, d_fake, d_gen):
    close(logged["loss_D"], L_D_gan(d_real, d_fake), "loss_D")
    close(logged["loss_G"], L_G_non_saturating(d_gen), "loss_G")
    close(logged["D_x"], d_real.sigmoid().mean(), "D(x)")
    close(logged["D_G_z"], d_fake.sigmoid().mean(), "D(G(z))")
    # the check can fail: swapped labels move L_D by E[logit real] - E[logit fake], and the
    # saturating G loss is negative
    assert abs(d_real.mean() - d_fake.mean()) > 1e-4


def test_dcgan_is_the_gan_game_with_the_non_saturating_G_loss(record, data):
    rec = record("dcgan.py").train(data)
    _, d_real, d_fake, d_gen = check_one_D_step_one_G_step(rec, L_D_gan, L_G_non_saturating)
    check_logged_gan(rec.logged[0], d_real.output, d_fake.output, d_gen.output)


def test_cgan_D_judges_each_image_with_its_label(record, classes):
    """D(x|y) gets each real image's own label and G's images the label G was given; G's loss
    reaches exactly the embeddings of the labels G was asked for."""
    rec = record("cgan.py").train(classes)
    g, d_real, d_fake, d_gen = check_one_D_step_one_G_step(rec, L_D_gan, L_G_non_saturating)
    check_logged_gan(rec.logged[0], d_real.output, d_fake.output, d_gen.output)
    (_, updates, [(_, real_labels)]), = rec.steps
    asked = g.inputs[1]
    assert d_real.inputs[1] is real_labels
    assert d_fake.inputs[1] is asked and d_gen.inputs[1] is asked
    reached = updates[1][1]["embed.weight"].abs().sum(1) > 0
    assert reached.nonzero().flatten().tolist() == sorted(set(asked.tolist()))
    assert not reached.all()                             # the check can fail


def test_vanilla_gan_trains_k_D_batches_then_the_G_batches(record, data):
    """--d-steps D updates, each on a new real batch and new fakes, then --g-steps G updates, each
    on new z; every update is the paper's, and the log shows the last of each."""
    rec = record("vanilla_gan.py").train(data, "--d-steps", 2, "--g-steps", 3, steps=2)
    assert len(rec.steps) == 2
    for (calls, updates, reals), logged in zip(rec.steps, rec.logged):
        assert [c.net for c in calls] == ["G", "D", "D"] * 2 + ["G", "D"] * 3
        assert [u[0] for u in updates] == ["D"] * 2 + ["G"] * 3
        assert len(reals) == 2
        for k in range(2):
            g, d_real, d_fake = calls[3 * k:3 * k + 3]
            assert d_real.x is reals[k]
            check_D_update(rec, updates[k], g, d_real, d_fake, L_D_gan)
        for k in range(3):
            check_G_update(rec, updates[2 + k], *calls[6 + 2 * k:8 + 2 * k], L_G_non_saturating)
        assert not torch.equal(calls[6].x, calls[8].x)      # a new z for each G batch
        check_logged_gan(logged, calls[4].output, calls[5].output, calls[-1].output)


# -------------------------------------------------------------------------------------- AC-GAN
def test_acgan_D_has_two_heads_and_G_is_asked_for_a_class(record, classes):
    """L_D = -(L_S + L_C) with the real images' labels and the asked ones; L_G = BCE(S(G(z|c)),
    real) - log P(C = c | G(z|c)) on the asked c; the class head's logits go into a log-softmax
    (no Softmax before it); G's gradient reaches the one-hot inputs of the asked classes only."""
    rec = record("acgan.py").train(classes)
    calls, updates, (_, real_labels) = one_D_step_one_G_step(rec)
    g, d_real, d_fake, d_gen = calls
    asked = g.inputs[1]

    def L_D(real, fake):
        (s_real, c_real), (s_fake, c_fake) = real, fake
        L_S = log_D(s_real).mean() + log_1_minus_D(s_fake).mean()
        L_C = log_softmax_at(c_real, real_labels).mean() + log_softmax_at(c_fake, asked).mean()
        return -(L_S + L_C)

    def L_G(gen):
        s, c = gen
        return -log_D(s).mean() - log_softmax_at(c, asked).mean()

    check_one_D_step_one_G_step(rec, L_D, L_G)
    logged = rec.logged[0]
    close(logged["loss_D"], L_D(d_real.output, d_fake.output), "loss_D")
    close(logged["loss_G"], L_G(d_gen.output), "loss_G")
    close(logged["D_x"], d_real.output[0].sigmoid().mean(), "D(x)")
    close(logged["D_G_z"], d_fake.output[0].sigmoid().mean(), "D(G(z))")
    # the check can fail: the real and the asked labels differ
    assert not torch.equal(real_labels, asked)
    latent = rec.args.latent_dim
    first = updates[1][1]["net.0.weight"]                # (latent_dim + n_classes, C, 4, 4)
    reached = first[latent:].flatten(1).abs().sum(1) > 0
    assert reached.nonzero().flatten().tolist() == sorted(set(asked.tolist()))
    assert not reached.all()


# ----------------------------------------------------------------------------------------- WGAN
def W(d_real, d_fake):
    """The critic's estimate of the Wasserstein distance, E[D(x)] - E[D(G(z))]."""
    return d_real.mean() - d_fake.mean()


def test_wgan_critic_maximises_W_and_G_minimises_minus_E_D_G_z(record, data):
    """n_critic updates of L_D = -W (each on a new batch, the fakes without a graph into G), then
    L_G = -E[D(G(z))]."""
    # TINY: n_critic 2, no warm-up; a wider clipping box, so that D's scores are far from 0
    rec = record("wgan.py").train(data, "--clip", 0.1)
    (calls, updates, reals), = rec.steps
    assert [c.net for c in calls] == ["G", "D", "D"] * 2 + ["G", "D"]
    assert [u[0] for u in updates] == ["D", "D", "G"] and len(reals) == 2
    for k in range(2):
        g, d_real, d_fake = calls[3 * k:3 * k + 3]
        assert d_real.x is reals[k]
        check_D_update(rec, updates[k], g, d_real, d_fake, lambda r, f: -W(r, f))
    check_G_update(rec, updates[2], *calls[6:], lambda gen: -gen.mean())
    logged, d_real, d_fake, d_gen = rec.logged[0], calls[4].output, calls[5].output, calls[7].output
    close(logged["wasserstein"], W(d_real, d_fake), "wasserstein")
    close(logged["loss_D"], -W(d_real, d_fake), "loss_D")
    close(logged["loss_G"], -d_gen.mean(), "loss_G")
    assert abs(d_gen.mean()) > 1e-4 and abs(W(d_real, d_fake)) > 1e-4  # the signs show


# -------------------------------------------------------------------------------------- WGAN-GP
def hand_penalty(D, x_hat, weight, one_sided):
    """lambda * E[(||grad_x_hat D(x_hat)||_2 - 1)^2], the norm over all of C, H, W of a sample."""
    x_hat = x_hat.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    gap = grad.square().sum(dim=(1, 2, 3)).sqrt() - 1
    return weight * (gap.clamp(min=0) if one_sided else gap).square().mean()


def interpolation_weights(x_hat, real, fake):
    """eps with x_hat = eps * real + (1 - eps) * fake, one per sample (least squares), checked."""
    d = (real - fake).flatten(1)
    eps = ((x_hat - fake).flatten(1) * d).sum(1) / d.square().sum(1)
    torch.testing.assert_close(x_hat, eps.view(-1, 1, 1, 1) * real + (1 - eps.view(-1, 1, 1, 1))
                               * fake, rtol=0, atol=1e-5, msg="x_hat is not on the real-fake line")
    return eps


@pytest.mark.parametrize("one_sided", [False, True], ids=["two-sided", "one-sided"])
def test_wgan_gp_critic_loss_is_minus_W_plus_the_penalty(one_sided, record, data):
    """Each critic update: L_D = -W + penalty on points between this update's real and fake
    images, one eps ~ U[0, 1] per sample, with --gp-weight and --one-sided; the gradient goes
    through the penalty's double backward. Then L_G = -E[D(G(z))]."""
    weight = 2.5
    flags = ["--gp-weight", weight] + (["--one-sided"] if one_sided else [])
    rec = record("wgan_gp.py").train(data, *flags)      # TINY: n_critic 2
    (calls, updates, reals), = rec.steps
    assert [c.net for c in calls] == ["G", "D", "D", "D"] * 2 + ["G", "D"]
    assert [u[0] for u in updates] == ["D", "D", "G"] and len(reals) == 2
    for k in range(2):
        g, d_real, d_fake, d_hat = calls[4 * k:4 * k + 4]
        assert d_real.x is reals[k]
        eps = interpolation_weights(d_hat.x.detach(), d_real.x, d_fake.x)
        assert (eps >= 0).all() and (eps <= 1).all() and eps.std() > 0.05   # one per sample
        assert d_hat.inputs[0].requires_grad and d_hat.grad_enabled
        check_D_update(rec, updates[k], g, d_real, d_fake, lambda r, f: -W(r, f),
                       lambda D, x_hat=d_hat.x: hand_penalty(D, x_hat, weight, one_sided))
    check_G_update(rec, updates[2], *calls[8:], lambda gen: -gen.mean())
    logged = rec.logged[0]
    d_real, d_fake, d_hat, d_gen = calls[5], calls[6], calls[7], calls[9]
    penalty = hand_penalty(rec.fresh(d_hat), d_hat.x, weight, one_sided)
    close(logged["wasserstein"], W(d_real.output, d_fake.output), "wasserstein")
    close(logged["penalty"], penalty, "penalty")
    close(logged["loss_D"] - logged["penalty"], -W(d_real.output, d_fake.output),
          "loss_D - penalty", rtol=1e-3)
    close(logged["loss_G"], -d_gen.output.mean(), "loss_G")
    assert abs(W(d_real.output, d_fake.output)) > 1e-3    # the sign shows beside the penalty
    assert penalty > 0.1 or one_sided                     # (one-sided: norms below 1 cost 0)


# ---------------------------------------------------------------------------------------- LSGAN
@pytest.mark.parametrize("targets", [(0.0, 1.0, 1.0), (-1.0, 1.0, 0.0)], ids=["0-1-1", "-1-1-0"])
def test_lsgan_least_squares_on_the_scripts_own_D(targets, record, data):
    """L_D = 1/2 E[(D(x) - b)^2] + 1/2 E[(D(G(z)) - a)^2], L_G = 1/2 E[(D(G(z)) - c)^2] on D's
    raw output (no sigmoid)."""
    a, b, c = targets
    rec = record("lsgan.py").train(data, "--targets", *targets)

    def L_D(d_real, d_fake):
        return 0.5 * (d_real - b).square().mean() + 0.5 * (d_fake - a).square().mean()

    def L_G(d_gen):
        return 0.5 * (d_gen - c).square().mean()

    _, d_real, d_fake, d_gen = (call.output for call in check_one_D_step_one_G_step(rec, L_D, L_G))
    logged = rec.logged[0]
    close(logged["loss_D"], L_D(d_real, d_fake), "loss_D")
    close(logged["loss_G"], L_G(d_gen), "loss_G")
    close(logged["D_x"], d_real.mean(), "D(x)")
    close(logged["D_G_z"], d_fake.mean(), "D(G(z))")
    assert abs(d_real.mean() - d_fake.mean()) > 1e-4       # swapped a and b would show


# ---------------------------------------------------------------------------------------- EBGAN
def f_PT(codes):
    """The pull-away term: 1/(N(N-1)) sum_{i != j} (s_i . s_j / (|s_i| |s_j|))^2."""
    n = len(codes)
    s = codes / codes.norm(dim=1, keepdim=True)
    cosines = s @ s.t()
    return (cosines.square().sum() - cosines.diagonal().square().sum()) / (n * (n - 1))


def test_ebgan_margin_loss_and_pull_away_term(record, data):
    """L_D = E[D(x)] + E[max(0, m - D(G(z)))] with D(x) the reconstruction energy, L_G =
    E[D(G(z))] + w f_PT(Enc(G(z))), with --margin m and --pt-weight w; a margin inside the fakes'
    energies, so that both sides of the hinge are used."""
    m, w = 0.011, 0.7
    rec = record("ebgan.py").train(data, "--margin", m, "--pt-weight", w)

    def L_D(real, fake):
        return real[0].mean() + (m - fake[0]).clamp(min=0).mean()

    def L_G(gen):
        energy, codes = gen
        return energy.mean() + w * f_PT(codes)

    _, d_real, d_fake, d_gen = (call.output for call in check_one_D_step_one_G_step(rec, L_D, L_G))
    logged = rec.logged[0]
    close(logged["loss_D"], L_D(d_real, d_fake), "loss_D")
    close(logged["loss_G"], L_G(d_gen), "loss_G")
    close(logged["energy_real"], d_real[0].mean(), "energy_real")
    close(logged["energy_fake"], d_fake[0].mean(), "energy_fake")
    close(logged["pull_away"], f_PT(d_gen[1]), "pull_away")
    assert (d_fake[0] < m).any() and (d_fake[0] > m).any()   # both sides of the hinge
    assert 0.01 < f_PT(d_gen[1]) < 0.99                       # a square shows


# ------------------------------------------------------------------------------------- the models
SIZES = [16, 32, 64, 128, 256]
WIDTHS = {"vanilla_gan.py": ["--hidden", 4], "cgan.py": ["--embed-dim", 3],
          "ebgan.py": ["--code-dim", 3]}


def tiny_models(script, size, channels=3, n_classes=5):
    """G and D of a script at img_size x img_size, at tiny widths; and the inputs of G."""
    module = load_script(script)
    widths = WIDTHS.get(script, []) + ([] if script == "vanilla_gan.py" else
                                       ["--ngf", 2, "--ndf", 2])
    args = module.parse_args([str(f) for f in ["--img-size", size, "--channels", channels,
                                               *widths]])
    args.n_classes = n_classes
    G, D = module.build_models(args)
    z = torch.randn(3, args.latent_dim)
    labels = (torch.tensor([0, 4, 2]),) if module.CONDITIONAL else ()
    return args, G, D, (z, *labels)


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_shapes_at_every_size(script):
    """The README's promise: every power of two from 16 to 256 px; G draws B x C x S x S, D gives
    one score per image (AC-GAN: and class logits; EBGAN: and a code)."""
    for size in SIZES:
        args, G, D, inputs = tiny_models(script, size)
        labels = inputs[1:] if script == "cgan.py" else ()   # cgan's D reads the label too
        x = G(*inputs)
        assert x.shape == (3, 3, size, size), (size, x.shape)
        out = D(x, *labels)
        if script == "acgan.py":
            assert out[0].shape == (3,) and out[1].shape == (3, 5)
        elif script == "ebgan.py":
            assert out[0].shape == (3,) and out[1].shape == (3, 3)
        else:
            assert out.shape == (3,), (size, out.shape)


def test_vanilla_gan_shapes_at_any_size():
    for size in (8, 28, 64):
        args, G, D, inputs = tiny_models("vanilla_gan.py", size, channels=1)
        x = G(*inputs)
        assert x.shape == (3, 1, size, size) and D(x).shape == (3,)


def last(net, kinds=(nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
    return [m for m in net.modules() if isinstance(m, kinds)][-1]


@pytest.mark.parametrize("script", sorted(TINY))
def test_G_ends_in_tanh_and_D_in_an_unbounded_score(script):
    """With its last layer's weights made huge, G's images saturate at -1 and 1 but never pass them
    (a tanh, the range of the real images); D's scores (logits, critic scores, class logits, EBGAN's
    code) grow without bound: no sigmoid or softmax at D's output."""
    args, G, D, inputs = tiny_models(script, 16)
    with torch.no_grad():
        last(G).weight.mul_(1e4)
        x = G(*inputs)
        assert x.abs().max() <= 1 and x.abs().max() > 0.999 and x.min() < 0 < x.max()
        heads = [D.adv_head, D.class_head] if script == "acgan.py" else [last(D.encoder) if
                                                                         script == "ebgan.py"
                                                                         else last(D)]
        for head in heads:
            head.weight.mul_(1e4)
        real = torch.rand(3, 3, 16, 16) * 2 - 1
        out = D(real, *inputs[1:]) if script == "cgan.py" else D(real)
        scores = out[1] if script == "ebgan.py" else out    # EBGAN: the code
        for s in scores if isinstance(scores, tuple) else (scores,):
            assert s.abs().max() > 10, script
    if script == "ebgan.py":                                 # D's decoder draws in tanh's range
        with torch.no_grad():
            last(D.decoder).weight.mul_(1e4)
            energy, code = D(real)
            recon = D.decoder(code)
        assert recon.abs().max() <= 1 and recon.abs().max() > 0.999
        torch.testing.assert_close(energy, (recon - real).square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_the_dcgan_recipe(script):
    """DCGAN's rules, kept by every convolutional script: weights from N(0, 0.02), norm scales from
    N(1, 0.02) and shifts 0, BatchNorm with its default eps (not BatchNorm2d(C, 0.8), which is
    eps = 0.8), ReLU in G and LeakyReLU(0.2) in D, no pooling."""
    _, G, D, _ = tiny_models(script, 32)
    weights = torch.cat([m.weight.flatten() for net in (G, D) for m in net.modules()
                         if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
                         and not isinstance(m, nn.Embedding)])
    assert abs(weights.mean()) < 0.002 and 0.018 < weights.std() < 0.022, weights.std()
    norms = [m for net in (G, D) for m in net.modules()
             if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    scales = torch.cat([m.weight for m in norms])
    assert abs(scales.mean() - 1) < 0.01 and 0.01 < scales.std() < 0.03
    assert all(m.bias.abs().max() == 0 for m in norms)
    assert all(m.eps == 1e-5 for m in norms)
    assert all(m.momentum == 0.1 for m in norms if isinstance(m, nn.BatchNorm2d))
    def activations(net):
        return [m for m in net.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]

    encoder = D.encoder if script == "ebgan.py" else D       # EBGAN's decoder is a G
    assert activations(encoder) and activations(G)
    assert all(type(m) is nn.LeakyReLU and m.negative_slope == 0.2 for m in activations(encoder))
    assert all(type(m) is nn.ReLU for m in activations(G))
    assert not any(isinstance(m, nn.modules.pooling._MaxPoolNd) for m in D.modules())


@pytest.mark.parametrize("script", sorted(CONDITIONAL_SCRIPTS))
def test_conditional_inputs_are_the_papers(script):
    """cgan: G reads [z, embed(y)] and D the image with one more channel, the label's learned map;
    acgan: G reads [z, one_hot(c)] and D does not see c."""
    args, G, D, (z, labels) = tiny_models(script, 16)
    G.eval()                                                  # one sample at a time, as a batch
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        if script == "cgan.py":
            condition = G.embed.weight[labels]
            D_in = torch.cat([x, D.label_map.weight[labels].view(3, 1, 16, 16)], dim=1)
            torch.testing.assert_close(D(x, labels), D.net(D_in).view(-1))
        else:
            condition = torch.eye(args.n_classes)[labels]
        h = torch.cat([z, condition], dim=1)[:, :, None, None]
        torch.testing.assert_close(G(z, labels), G.net(h))


# ----------------------------------------------------------------- the kernels' PyTorch references
def test_the_kernels_references_on_numbers_worked_by_hand():
    """kernels' fallbacks: the penalty's norm is over all non-batch axes (row 0 has norm
    sqrt(1 + 4 + 4 + 16) = 5, row 1 norm 0, row 2 norm 1), and clipping clamps to [-c, c]."""
    from kernels import clip_weights_, gradient_penalty
    grads = torch.tensor([[[1.0, 2.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]],
                          [[0.6, 0.0], [0.0, -0.8]]])
    assert gradient_penalty(grads, weight=10.0, impl="torch") == pytest.approx(10 * (16 + 1) / 3)
    assert gradient_penalty(grads, one_sided=True, impl="torch") == pytest.approx(10 * 16 / 3)
    assert gradient_penalty(grads, weight=2.0, target=2.0, impl="torch") == pytest.approx(
        2 * (9 + 4 + 1) / 3)
    p = nn.Parameter(torch.tensor([-0.5, -0.01, 0.0, 0.003, 0.02, 7.0]))
    clip_weights_([p], 0.01, impl="torch")
    assert p.tolist() == pytest.approx([-0.01, -0.01, 0.0, 0.003, 0.01, 0.01])
