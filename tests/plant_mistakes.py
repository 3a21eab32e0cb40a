"""Plant the mistakes that GAN code is known for, one at a time, in a scratch copy of the
repository, and check that the tests catch every one (mutation testing by hand). Not a test itself
(pytest does not collect this file) and not run by CI: it takes a while.

    python tests/plant_mistakes.py               # every mutant, against the test files it names
    python tests/plant_mistakes.py --all-tests   # every mutant against the whole suite
    python tests/plant_mistakes.py -k wgan_gp    # only the mutants whose names contain wgan_gp
    python tests/plant_mistakes.py --list        # the mutants, without running anything

Each mutant is an exact string replacement in one file; its original text must occur exactly once
there. Prints a table (mutant, file, the first test that failed or SURVIVED, seconds) and exits 1
if a mutant survived."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORMULAS = ["tests/test_formulas.py", "tests/test_losses.py"]
CONDITIONAL = [*FORMULAS, "tests/test_conditional.py"]
KERNELS = ["tests/test_formulas.py", "tests/test_kernels.py", "tests/test_losses.py"]

# (name, file, original text, planted text, the test files to run: the most telling first)
MUTANTS = [
    # ---- vanilla_gan.py
    ("vanilla: saturating G loss", "vanilla_gan.py",
     "loss_G = bce(D(G(z)), ones)", "loss_G = -bce(D(G(z)), zeros)", FORMULAS),
    ("vanilla: real/fake labels swapped in L_D", "vanilla_gan.py",
     "loss_D = bce(d_real, ones) + bce(d_fake, zeros)",
     "loss_D = bce(d_real, zeros) + bce(d_fake, ones)", FORMULAS),
    ("vanilla: no detach in the D step", "vanilla_gan.py",
     "fake = G(z).detach()", "fake = G(z)", FORMULAS),
    ("vanilla: --d-steps ignored", "vanilla_gan.py",
     "for _ in range(args.d_steps):", "for _ in range(1):", FORMULAS),
    ("vanilla: --g-steps ignored", "vanilla_gan.py",
     "for _ in range(args.g_steps):", "for _ in range(1):", FORMULAS),
    ("vanilla: the G batches reuse the D batch's z", "vanilla_gan.py",
     "for _ in range(args.g_steps):\n            z = torch.randn(args.batch_size, args.latent_dim, "
     "device=device)\n", "for _ in range(args.g_steps):\n", FORMULAS),
    ("vanilla: G without tanh", "vanilla_gan.py",
     "nn.Linear(4 * hidden, math.prod(self.shape)), nn.Tanh(),",
     "nn.Linear(4 * hidden, math.prod(self.shape)),", FORMULAS),
    ("vanilla: sigmoid on D's logit", "vanilla_gan.py",
     "nn.Linear(hidden, 1),\n", "nn.Linear(hidden, 1), nn.Sigmoid(),\n", FORMULAS),
    # ---- dcgan.py
    ("dcgan: ones/zeros swapped in L_D", "dcgan.py",
     "loss_D = bce(d_real, ones) + bce(d_fake, zeros)",
     "loss_D = bce(d_real, zeros) + bce(d_fake, ones)", FORMULAS),
    ("dcgan: saturating G loss", "dcgan.py",
     "loss_G = bce(D(fake), ones)", "loss_G = -bce(D(fake), zeros)", FORMULAS),
    ("dcgan: G loss on detached fakes", "dcgan.py",
     "loss_G = bce(D(fake), ones)", "loss_G = bce(D(fake.detach()), ones)", FORMULAS),
    ("dcgan: no detach in the D step", "dcgan.py",
     "d_fake = D(fake.detach())", "d_fake = D(fake)", FORMULAS),
    ("dcgan: G without tanh", "dcgan.py",
     "layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]",
     "layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False)]", FORMULAS),
    ("dcgan: sigmoid at D's output", "dcgan.py",
     "layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False)]",
     "layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False), nn.Sigmoid()]", FORMULAS),
    ("dcgan: weights from N(0, 0.2)", "dcgan.py",
     "nn.init.normal_(m.weight, 0.0, 0.02)", "nn.init.normal_(m.weight, 0.0, 0.2)", FORMULAS),
    ("dcgan: BatchNorm2d(C, 0.8) in D (eps 0.8)", "dcgan.py",
     "nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]",
     "nn.BatchNorm2d(c_out, 0.8), nn.LeakyReLU(0.2, True)]", FORMULAS),
    ("dcgan: ReLU in D's first layer", "dcgan.py",
     "layers = [nn.Conv2d(channels, width[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]",
     "layers = [nn.Conv2d(channels, width[0], 4, 2, 1, bias=False), nn.ReLU(True)]", FORMULAS),
    ("dcgan: LeakyReLU(0.02) in D", "dcgan.py",
     "nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]",
     "nn.BatchNorm2d(c_out), nn.LeakyReLU(0.02, True)]", FORMULAS),
    # ---- cgan.py
    ("cgan: saturating G loss", "cgan.py",
     "loss_G = bce(D(fake, fake_labels), ones)",
     "loss_G = -bce(D(fake, fake_labels), zeros)", CONDITIONAL),
    ("cgan: G ignores its label", "cgan.py",
     "self.embed(labels)], dim=1)", "self.embed(torch.zeros_like(labels))], dim=1)", CONDITIONAL),
    ("cgan: G reads [embed(y), z]", "cgan.py",
     "torch.cat([z.view(z.size(0), -1), self.embed(labels)], dim=1)",
     "torch.cat([self.embed(labels), z.view(z.size(0), -1)], dim=1)", CONDITIONAL),
    ("cgan: D ignores the label", "cgan.py",
     "return self.net(torch.cat([x, y], dim=1)).view(-1)",
     "return self.net(torch.cat([x, 0 * y], dim=1)).view(-1)", CONDITIONAL),
    ("cgan: D judges fakes with the real labels", "cgan.py",
     "d_fake = D(fake.detach(), fake_labels)", "d_fake = D(fake.detach(), real_labels)",
     CONDITIONAL),
    ("cgan: G's loss judged with the real labels", "cgan.py",
     "loss_G = bce(D(fake, fake_labels), ones)", "loss_G = bce(D(fake, real_labels), ones)",
     CONDITIONAL),
    ("cgan: D judges reals with the fake labels", "cgan.py",
     "d_real = D(real, real_labels)", "d_real = D(real, fake_labels)", CONDITIONAL),
    ("cgan: fake labels from range(n_classes - 1)", "cgan.py",
     "fake_labels = torch.randint(args.n_classes, ",
     "fake_labels = torch.randint(args.n_classes - 1, ", CONDITIONAL),
    # ---- acgan.py
    ("acgan: nn.Softmax before CrossEntropyLoss", "acgan.py",
     "self.class_head = nn.Linear(width[-1] * 16, n_classes)",
     "self.class_head = nn.Sequential(nn.Linear(width[-1] * 16, n_classes), nn.Softmax(1))",
     CONDITIONAL),
    ("acgan: softmax in D's forward", "acgan.py",
     "return self.adv_head(h).view(-1), self.class_head(h)",
     "return self.adv_head(h).view(-1), self.class_head(h).softmax(1)", CONDITIONAL),
    ("acgan: softmax before ce in L_C", "acgan.py",
     "loss_C = ce(c_real, real_labels)", "loss_C = ce(c_real.softmax(1), real_labels)",
     CONDITIONAL),
    ("acgan: D's class loss on fakes uses the real labels", "acgan.py",
     "ce(c_fake, fake_labels)", "ce(c_fake, real_labels)", CONDITIONAL),
    ("acgan: G's class term uses the real labels", "acgan.py",
     "loss_G = bce(s_gen, ones) + ce(c_gen, fake_labels)",
     "loss_G = bce(s_gen, ones) + ce(c_gen, real_labels)", CONDITIONAL),
    ("acgan: saturating G loss", "acgan.py",
     "loss_G = bce(s_gen, ones) + ", "loss_G = -bce(s_gen, zeros) + ", CONDITIONAL),
    ("acgan: G ignores its class", "acgan.py",
     "F.one_hot(labels, self.n_classes)", "F.one_hot(torch.zeros_like(labels), self.n_classes)",
     CONDITIONAL),
    ("acgan: real/fake labels swapped in L_S", "acgan.py",
     "loss_S = bce(s_real, ones) + bce(s_fake, zeros)",
     "loss_S = bce(s_real, zeros) + bce(s_fake, ones)", CONDITIONAL),
    ("acgan: fake labels from range(n_classes - 1)", "acgan.py",
     "fake_labels = torch.randint(args.n_classes, ",
     "fake_labels = torch.randint(args.n_classes - 1, ", CONDITIONAL),
    # ---- wgan.py
    ("wgan: Wasserstein sign flipped", "wgan.py",
     "wasserstein = D_fast(real).mean() - D_fast(fake).mean()",
     "wasserstein = D_fast(fake).mean() - D_fast(real).mean()", FORMULAS),
    ("wgan: G loss sign flipped", "wgan.py",
     "loss_G = -D_fast(G(z)).mean()", "loss_G = D_fast(G(z)).mean()", FORMULAS),
    ("wgan: no clipping after a critic step", "wgan.py",
     "            clip_weights_(D.parameters(), args.clip)   # keeps D K-Lipschitz (crudely)",
     "            pass", FORMULAS),
    ("wgan: no clipping at the start", "wgan.py",
     "    clip_weights_(D.parameters(), args.clip)  # the critic starts inside the clipping box",
     "    pass", FORMULAS),
    ("wgan: --clip ignored in the loop", "wgan.py",
     "clip_weights_(D.parameters(), args.clip)   # keeps",
     "clip_weights_(D.parameters(), 0.01)   # keeps", FORMULAS),
    ("wgan: graph through G in the critic step", "wgan.py",
     "with torch.no_grad():         # no graph through G: this step must not change G",
     "if True:", FORMULAS),
    ("wgan: warm-up schedule ignored", "wgan.py",
     "run.loop(step, key=lambda number: critic_iters(number, args.n_critic, args.critic_warmup))",
     "run.loop(step, key=lambda number: args.n_critic)", FORMULAS),
    ("wgan: warm-up for 24 steps", "wgan.py",
     "done < 25", "done < 24", FORMULAS),
    ("wgan: critic gradients accumulate", "wgan.py",
     "            opt_D.zero_grad(set_to_none=True)\n", "", FORMULAS),
    ("wgan: Adam for the critic", "wgan.py",
     "opt_D = torch.optim.RMSprop(D.parameters(), lr=args.lr)",
     "opt_D = torch.optim.Adam(D.parameters(), lr=args.lr)", FORMULAS),
    ("wgan: sigmoid on the critic", "wgan.py",
     "return self.net(x).view(-1)", "return self.net(x).view(-1).sigmoid()", FORMULAS),
    ("wgan: the fallback clips to [-c, 2c]", "wgan.py",
     "p.clamp_(-c, c)", "p.clamp_(-c, 2 * c)", FORMULAS),
    # ---- wgan_gp.py
    ("wgan_gp: eps per pixel", "wgan_gp.py",
     "eps = torch.rand(real.size(0), 1, 1, 1,", "eps = torch.rand(real.shape,", FORMULAS),
    ("wgan_gp: one eps for the batch", "wgan_gp.py",
     "eps = torch.rand(real.size(0), 1, 1, 1,", "eps = torch.rand(1, 1, 1, 1,", FORMULAS),
    ("wgan_gp: x_hat off the real-fake line", "wgan_gp.py",
     "x_hat = torch.lerp(fake.to(real.dtype), real, eps)",
     "x_hat = (eps * real + eps * fake.to(real.dtype))", FORMULAS),
    ("wgan_gp: Wasserstein sign flipped", "wgan_gp.py",
     "wasserstein = D_fast(real).mean() - D_fast(fake).mean()",
     "wasserstein = D_fast(fake).mean() - D_fast(real).mean()", FORMULAS),
    ("wgan_gp: G loss sign flipped", "wgan_gp.py",
     "loss_G = -D_fast(G(z)).mean()", "loss_G = D_fast(G(z)).mean()", FORMULAS),
    ("wgan_gp: penalty subtracted", "wgan_gp.py",
     "loss_D = -wasserstein + penalty", "loss_D = -wasserstein - penalty", FORMULAS),
    ("wgan_gp: n_critic loop run once", "wgan_gp.py",
     "for _ in range(args.n_critic):", "for _ in range(1):", FORMULAS),
    ("wgan_gp: penalty without the double backward", "wgan_gp.py",
     "create_graph=True)", "create_graph=False)", FORMULAS),
    ("wgan_gp: --gp-weight ignored", "wgan_gp.py",
     "critic_penalty(D, real, fake, args.gp_weight, args.one_sided)",
     "critic_penalty(D, real, fake, 10.0, args.one_sided)", FORMULAS),
    ("wgan_gp: --one-sided ignored", "wgan_gp.py",
     "critic_penalty(D, real, fake, args.gp_weight, args.one_sided)",
     "critic_penalty(D, real, fake, args.gp_weight)", FORMULAS),
    ("wgan_gp: penalty towards norm 0", "wgan_gp.py",
     "target=1.0, one_sided=one_sided)", "target=0.0, one_sided=one_sided)", FORMULAS),
    ("wgan_gp: fallback norm over dim=1 only", "wgan_gp.py",
     "g = grads.flatten(1)  ", "g = grads  ", FORMULAS),
    ("wgan_gp: BatchNorm in the critic", "wgan_gp.py",
     "nn.GroupNorm(1, c_out)", "nn.BatchNorm2d(c_out)", FORMULAS),
    ("wgan_gp: graph through G in the critic step", "wgan_gp.py",
     "with torch.no_grad():         # no graph through G: this step must not change G",
     "if True:", FORMULAS),
    # ---- lsgan.py
    ("lsgan: targets a and b swapped", "lsgan.py",
     "0.5 * (d_real - b).square().mean() + 0.5 * (d_fake - a).square().mean()",
     "0.5 * (d_real - a).square().mean() + 0.5 * (d_fake - b).square().mean()", FORMULAS),
    ("lsgan: G's target a instead of c", "lsgan.py",
     "loss_G = 0.5 * (D(fake) - c)", "loss_G = 0.5 * (D(fake) - a)", FORMULAS),
    ("lsgan: D's target for reals c instead of b", "lsgan.py",
     "loss_D = 0.5 * (d_real - b)", "loss_D = 0.5 * (d_real - c)", FORMULAS),
    ("lsgan: the 1/2 of L_G dropped", "lsgan.py",
     "loss_G = 0.5 * (D(fake) - c)", "loss_G = (D(fake) - c)", FORMULAS),
    ("lsgan: the 1/2 of L_D dropped", "lsgan.py",
     "loss_D = 0.5 * (d_real - b).square().mean() + 0.5 *",
     "loss_D = (d_real - b).square().mean() + ", FORMULAS),
    ("lsgan: absolute error instead of squares", "lsgan.py",
     "loss_G = 0.5 * (D(fake) - c).square().mean()", "loss_G = 0.5 * (D(fake) - c).abs().mean()",
     FORMULAS),
    ("lsgan: sigmoid at D's output", "lsgan.py",
     "layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False)]",
     "layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False), nn.Sigmoid()]", FORMULAS),
    ("lsgan: no detach in the D step", "lsgan.py",
     "d_fake = D(fake.detach())", "d_fake = D(fake)", FORMULAS),
    # ---- ebgan.py
    ("ebgan: hinge turned round", "ebgan.py",
     "F.relu(args.margin - energy_fake)", "F.relu(energy_fake - args.margin)", FORMULAS),
    ("ebgan: hinge without its max(0, .)", "ebgan.py",
     "F.relu(args.margin - energy_fake)", "(args.margin - energy_fake)", FORMULAS),
    ("ebgan: pull-away without its square", "ebgan.py",
     "return (cosine.square() * pairs).sum() / (n * (n - 1))",
     "return (cosine * pairs).sum() / (n * (n - 1))", FORMULAS),
    ("ebgan: pull-away with the i = j terms", "ebgan.py",
     "return (cosine.square() * pairs).sum() / (n * (n - 1))",
     "return cosine.square().mean()", FORMULAS),
    ("plumbing: --spectral-norm leaves D's BatchNorm in", "dcgan.py",
     "seq[i] = nn.Identity() if isinstance(layer, nn.modules.batchnorm._BatchNorm) else layer",
     "seq[i] = layer", ["tests/test_long_runs.py"]),
    ("ebgan: pull-away of unnormalised codes", "ebgan.py",
     "s = F.normalize(codes.flatten(1).float(), dim=1)", "s = codes.flatten(1).float()",
     FORMULAS),
    ("ebgan: --pt-weight ignored", "ebgan.py",
     "loss_G = energy_G.mean() + args.pt_weight * pt", "loss_G = energy_G.mean() + 0.1 * pt",
     FORMULAS),
    ("ebgan: G loss sign flipped", "ebgan.py",
     "loss_G = energy_G.mean() + args.pt_weight * pt",
     "loss_G = -energy_G.mean() + args.pt_weight * pt", FORMULAS),
    ("ebgan: the margin on the real energies too", "ebgan.py",
     "loss_D = energy_real.mean() + ", "loss_D = F.relu(args.margin - energy_real).mean() + ",
     FORMULAS),
    ("ebgan: energy summed over pixels", "ebgan.py",
     ".square().flatten(1).mean(1)", ".square().flatten(1).sum(1)", FORMULAS),
    ("ebgan: G (and D's decoder) without tanh", "ebgan.py",
     "layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]",
     "layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False)]", FORMULAS),
    # ---- kernels/: the PyTorch references
    ("kernels: penalty norm over dim=1 only", "kernels/gradient_penalty.py",
     "    g = grads.flatten(1)  ", "    g = grads  ", KERNELS),
    ("kernels: one-sided penalty turned round", "kernels/gradient_penalty.py",
     "        d = d.clamp(min=0)", "        d = d.clamp(max=0)", KERNELS),
    ("kernels: penalty summed over the batch", "kernels/gradient_penalty.py",
     "return weight * d.square().mean()", "return weight * d.square().sum()", KERNELS),
    ("kernels: clipping to [-c, 2c]", "kernels/clip.py",
     "torch._foreach_clamp_max_(tensors, c)", "torch._foreach_clamp_max_(tensors, 2 * c)", KERNELS),
]


def scratch_copy():
    """The repository's files (tracked, and untracked ones git does not ignore) in a temp folder."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    root = Path(tempfile.mkdtemp(prefix="plant_mistakes_"))
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def plant(root, name, path, old, new, tests, all_tests):
    """Run the tests with one mutant planted; returns (the first failing test or SURVIVED, s)."""
    target = root / path
    original = target.read_text()
    assert original.count(old) == 1, f"{name}: {old!r} occurs {original.count(old)}x in {path}"
    planted = original.replace(old, new)
    compile(planted, path, "exec")                   # a mutant is a mistake, never a syntax error
    target.write_text(planted)
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *([] if all_tests else tests)], cwd=root, capture_output=True,
                           text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        target.write_text(original)
    if p.returncode == 0:
        return "SURVIVED", time.time() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", p.stdout, re.M)
    return (failed[0] if failed else f"pytest exit {p.returncode}"), time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[],
                    help="only the mutants whose name contains this (may be repeated)")
    ap.add_argument("--all-tests", action="store_true", help="run the whole suite each time")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.k or any(k in m[0] for k in args.k)]
    if not mutants:
        sys.exit(f"no mutant's name contains {' or '.join(map(repr, args.k))}")
    if args.list:
        for name, path, *_ in mutants:
            print(f"{name:55} {path}")
        return 0
    root = scratch_copy()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *sorted({t for m in mutants for t in m[4]})], cwd=root,
                           capture_output=True, text=True)
        assert p.returncode == 0, "the tests fail without a mutant:\n" + p.stdout[-3000:]
        print(f"{'mutant':55} {'file':28} result")
        survived = 0
        for name, path, old, new, tests in mutants:
            result, seconds = plant(root, name, path, old, new, tests, args.all_tests)
            survived += result == "SURVIVED"
            print(f"{name:55} {path:28} {result} ({seconds:.0f} s)", flush=True)
        print(f"{len(mutants)} mutants, {len(mutants) - survived} caught, {survived} survived")
        return 1 if survived else 0
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    sys.exit(main())
