"""Training speed of every script end to end, in images/s, printed as one table (made for a CUDA
GPU; --device cpu runs it too, to check the benchmark itself).

    python benchmarks/train_speed.py                       # everything: about 30-60 min on an H100
    python benchmarks/train_speed.py --scripts dcgan.py wgan_gp.py --modes eager graph
    python benchmarks/train_speed.py --preset gpu-check    # the GPU check's runs, about 2 minutes
    python benchmarks/train_speed.py --preset gpu-check-64 # its optional 64 px runs, about 3

Each configuration runs the script as a user does, a subprocess (or, with --in-process, main([...])
in this process, which saves each run the imports): on --data mnist at 32x32 (the bundled
mnist-mini when MNIST is not under --data-root) and on a folder of 2,000 random 64x64 images made
once, for --steps generator updates with a log line every --log-every steps. "img/s" is the median
of the log lines after the first (the steady state): real images per second, which for the critics
counts their n_critic batches. "vs eager" divides it by the same script's eager run with the same
kernels and batch size. "first log" is the seconds from the run's start to its first log line:
data, models, compilation or capture, cudnn's autotuning and the first --log-every steps. Modes:
eager, graph (--cuda-graph), amp (--amp), compile (--compile) and their pairs. wgan.py and
wgan_gp.py run once with GAN_KERNELS=triton (the Triton kernels) and once with GAN_KERNELS=torch
(the reference); wgan.py with --no-critic-warmup, so that every step is the steady one. A run that
fails, in any way, puts its error (the exception's type and first line) in its row's img/s column,
and the table goes on.

The "plain loop" rows (dcgan.py, wgan_gp.py) train the same models as most repositories do: a
DataLoader from host memory, eager float32, loss.item() every step (a host sync).
"""
import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["vanilla_gan.py", "dcgan.py", "cgan.py", "acgan.py", "wgan.py", "wgan_gp.py",
           "lsgan.py", "ebgan.py"]
MODES = {"eager": [], "graph": ["--cuda-graph"], "amp": ["--amp"],
         "amp+graph": ["--amp", "--cuda-graph"], "compile": ["--compile"],
         "amp+compile": ["--amp", "--compile"]}
# The presets (in-process, no plain-loop rows): (script, batch size, modes), the most telling first,
# so that a time limit loses the least: --preset gpu-check, 32 px MNIST, eager against --cuda-graph
# for dcgan.py and wgan_gp.py at batch 128 and 64 (wgan_gp.py with the Triton penalty and the
# reference); --preset gpu-check-64, the optional second check, 64 px random images at the papers'
# batch sizes, with wgan.py's clipping and one --amp run.
EAGER_GRAPH = ["eager", "graph"]
PRESETS = {
    "gpu-check": (32, [("dcgan.py", 128, EAGER_GRAPH), ("wgan_gp.py", 64, EAGER_GRAPH),
                       ("dcgan.py", 64, EAGER_GRAPH), ("wgan_gp.py", 128, EAGER_GRAPH)]),
    "gpu-check-64": (64, [("dcgan.py", 128, EAGER_GRAPH + ["amp+graph"]),
                          ("wgan_gp.py", 64, EAGER_GRAPH), ("wgan.py", 64, EAGER_GRAPH)]),
}
SPEED = re.compile(r"\| ([\d,]+) img/s \|")


def random_folder(root, n=2000, size=64):
    """n random 64x64 RGB images in class subfolders (cgan.py and acgan.py need classes)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = Path(root) / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return Path(root)


def run_script(script, data, flags, env, args, out):
    argv = ["--data", str(data), "--data-root", args.data_root, "--steps", str(args.steps),
            "--log-every", str(args.log_every), "--device", args.device,
            "--sample-every", "1000000000", "--ckpt-every", "1000000000",
            "--keep-every", "1000000000", "--out", str(out), *flags]
    argv += ["--no-critic-warmup"] if script == "wgan.py" else []
    if args.in_process:
        return run_in_process(script, argv, env)
    cmd = [sys.executable, str(REPO / script), *argv]
    t0, first, speeds = time.time(), None, []
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    for line in p.stdout:
        if SPEED.search(line):
            first = first or time.time() - t0
            speeds.append(float(SPEED.search(line).group(1).replace(",", "")))
    err = p.stderr.read()
    if p.wait() != 0:
        return {"error": (err.strip().splitlines() or ["exit status %d" % p.returncode])[-1][:70]}
    steady = speeds[1:] or speeds
    return {"ips": statistics.median(steady), "first": first}


class LogLines(io.StringIO):
    """stdout of an in-process run: the img/s of each log line, and when the first came."""

    def __init__(self):
        super().__init__()
        self.t0, self.first, self.speeds = time.time(), None, []

    def write(self, text):
        for line in text.splitlines():
            if SPEED.search(line):
                self.first = self.first or time.time() - self.t0
                self.speeds.append(float(SPEED.search(line).group(1).replace(",", "")))
        return super().write(text)


def run_in_process(script, argv, env):
    module, saved = load(script), {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    lines, err = LogLines(), io.StringIO()
    try:
        with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(err):
            module.main(argv)
    except SystemExit as e:
        if e.code in (130, 143):                           # Ctrl-C or SIGTERM (a time limit)
            return {"error": f"stopped by signal {e.code - 128}", "signal": e.code - 128}
        if e.code:
            return {"error": str(e.code)[:70]}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    steady = lines.speeds[1:] or lines.speeds
    return {"ips": statistics.median(steady), "first": lines.first} if steady else \
        {"error": (err.getvalue().strip().splitlines() or ["no log line"])[-1][:70]}


def load(script):
    """The script as a module (once), as tests/common.py loads it."""
    name = "bench_" + script[:-3]
    if name not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def plain_loop(script, data_arg, args, flags=()):
    """The same models, trained as most repositories do: DataLoader, float32, .item() per step."""
    sys.path.insert(0, str(REPO))
    m = load(script)
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    a = m.parse_args(["--data", str(data_arg), "--data-root", args.data_root, *flags])
    with contextlib.redirect_stdout(io.StringIO()):       # (its "data: ..." line)
        images = m.load_data(a, torch.device("cpu"))["images"].float() / 127.5 - 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), shuffle=True,
                                         batch_size=a.batch_size, drop_last=True, num_workers=2,
                                         pin_memory=device.type == "cuda", persistent_workers=True)
    G, D = (net.to(device) for net in m.build_models(a))
    betas = a.betas or (0.5, 0.999)
    opt_G = torch.optim.Adam(G.parameters(), lr=a.lr, betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=a.lr, betas=betas)
    bce = torch.nn.BCEWithLogitsLoss()
    n_critic = getattr(a, "n_critic", 1)
    batches = iter(())
    seen, t0 = 0, None
    for step in range(args.steps):
        if step == args.steps // 5:                        # after the warm-up
            t0, seen = time.time(), 0
        for _ in range(n_critic):
            try:
                (real,) = next(batches)
            except StopIteration:
                batches = iter(loader)
                (real,) = next(batches)
            real = real.to(device)
            z = torch.randn(a.batch_size, a.latent_dim, device=device)
            fake = G(z).detach()
            if script == "wgan_gp.py":
                loss_D = D(fake).mean() - D(real).mean() + m.critic_penalty(D, real, fake, 10.0)
            else:
                d_real, d_fake = D(real), D(fake)
                loss_D = (bce(d_real, torch.ones_like(d_real))
                          + bce(d_fake, torch.zeros_like(d_fake)))
            opt_D.zero_grad()
            loss_D.backward()
            opt_D.step()
            seen += len(real)
        z = torch.randn(a.batch_size, a.latent_dim, device=device)
        out = D(G(z))
        loss_G = -out.mean() if script == "wgan_gp.py" else bce(out, torch.ones_like(out))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
        loss_D.item(), loss_G.item()                       # what a progress bar does every step
    return {"ips": seen / (time.time() - t0), "first": None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scripts", nargs="+", default=SCRIPTS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64], choices=[32, 64])
    p.add_argument("--batch-size", type=int, help="every run's (default: each script's own)")
    p.add_argument("--steps", type=int, default=600, help="generator updates per run")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--data-root", default=".gpu/data", help="where MNIST/raw is (else mnist-mini)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-loop rows")
    p.add_argument("--in-process", action="store_true", help="main([...]) here, not a subprocess")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="a GPU check's runs (in-process, no plain-loop rows; see PRESETS)")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.preset:
        size, runs = PRESETS[args.preset]
        args.sizes, args.in_process, args.no_plain = [size], True, True
    else:
        runs = [(script, args.batch_size, args.modes) for script in args.scripts]
    work = Path(tempfile.mkdtemp(prefix="train_speed-"))
    folder = random_folder(work / "random64") if 64 in args.sizes else None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" \
        else "CPU"
    print(f"{name}, torch {torch.__version__}; {args.steps} steps per run, median img/s of the log "
          f"lines after the first", flush=True)
    header = f"| {'script':<14} | {'data':<9} | {'batch':>5} | {'mode':<11} | {'kernels':<7} | " \
             f"{'img/s':>9} | {'vs eager':>8} | {'first log (s)':>13} |"
    rule = "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
    print(header + "\n" + rule)
    if args.markdown:
        Path(args.markdown).write_text(f"{name}, torch {torch.__version__}\n\n{header}\n{rule}\n")
    sys.path.insert(0, str(REPO))                          # the scripts' `from kernels import`
    for size in args.sizes:
        data = "mnist" if size == 32 else folder
        for script, batch, modes in runs:
            batch_flags = ["--batch-size", str(batch)] if batch else []
            where = (f"{size}x{size}", batch or "paper")
            for kernels in (["triton", "torch"] if script in ("wgan.py", "wgan_gp.py") else ["-"]):
                eager = None
                for mode in modes:
                    env = {"GAN_KERNELS": kernels} if kernels != "-" else {}
                    flags = MODES[mode] + (["--img-size", "64"] if size == 64 else []) + batch_flags
                    out = work / f"{script}-{size}-{batch}-{mode}-{kernels}"
                    r = attempt(run_script, script, data, flags, env, args, out)
                    row(script, *where, mode, kernels, r, eager, args.markdown)
                    if r.get("signal"):                    # the check's time limit: stop here
                        sys.exit(128 + r["signal"])
                    eager = r.get("ips") if mode == "eager" else eager
            if script in ("dcgan.py", "wgan_gp.py") and not args.no_plain:
                r = attempt(plain_loop, script, data, args, batch_flags)
                row(script, *where, "plain loop", "torch" if "gp" in script else "-", r, None,
                    args.markdown)


def attempt(fn, *a):
    """fn(*a), or its failure as a row's error: one failing run must not lose the table."""
    try:
        return fn(*a)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:90]}


def row(script, data, batch, mode, kernels, r, eager, markdown=None):
    where = f"| {script:<14} | {data:<9} | {batch:>5} | {mode:<11} | {kernels:<7} |"
    if "error" in r:
        line = f"{where} {r['error']} |"
    else:
        ratio = f"{r['ips'] / eager:7.2f}x" if eager else f"{'':>8}"
        first = f"{r['first']:13.1f}" if r["first"] else f"{'':>13}"
        line = f"{where} {r['ips']:9,.0f} | {ratio} | {first} |"
    print(line, flush=True)
    if markdown:
        with open(markdown, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
