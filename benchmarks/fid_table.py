"""The standard protocol, for people who publish numbers: each convolutional script trained on
CIFAR-10, then judged alone on 50,000 samples, printed as one table beside published FIDs.

    python benchmarks/fid_table.py --steps 100000                 # a GPU, the data and the weights
    python benchmarks/fid_table.py --scripts dcgan.py wgan_gp.py --steps 20000 --fid-weights W.pth

Each script runs as a user runs it (a subprocess): `SCRIPT --data cifar10 --steps N --out
OUT/SCRIPT`, then `SCRIPT --eval --ckpt OUT/SCRIPT/last.pt --eval-samples 50000` (its best.pt, if it
kept one, is judged too). Offline, CIFAR-10 must be under --data-root already and Inception's
weights given with --fid-weights (or in torch hub's cache). Extra flags after `--` go to every
training run (e.g. `-- --amp --batch-size 128`).

The published figures come from other code and other protocols; the table says which. Our FID is
torch-fidelity's Inception-v3 on the training set, like PyTorch-StudioGAN's, so the two are close in
protocol but not in networks, steps or batch sizes: compare with care.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["dcgan.py", "cgan.py", "acgan.py", "wgan.py", "wgan_gp.py", "lsgan.py", "ebgan.py"]
# CIFAR-10 FIDs as published, each with its protocol
PUBLISHED = {
    "dcgan.py": [("PyTorch-StudioGAN, 50k vs train, TF-Inception", 48.29),
                 ("pytorch-gan-collections, 50k vs train, 100k steps", 42.72)],
    "lsgan.py": [("PyTorch-StudioGAN, 50k vs train, TF-Inception", 40.22)],
    "wgan.py": [("PyTorch-StudioGAN, 50k vs train, TF-Inception", 107.68)],
    "wgan_gp.py": [("PyTorch-StudioGAN, 50k vs train, TF-Inception", 53.98),
                   ("pytorch-gan-collections, 50k vs train, 100k steps (CNN)", 19.83)],
    "acgan.py": [("PyTorch-StudioGAN, 50k vs train, TF-Inception", 33.39)],
}
FIGURES = ("fid", "kid", "precision", "recall")


def figures(stdout):
    """The four figures of --eval's first line ('fid 23.4 kid 0.012 ...'), and its protocol line."""
    lines = stdout.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("fid ")), None)
    if first is None:
        return None, lines[-1] if lines else "(nothing)"
    words = lines[first].split()
    return dict(zip(words[::2], map(float, words[1::2]))), lines[first + 1]


def run(cmd):
    t0 = time.time()
    res = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, capture_output=True,
                         text=True)
    return res, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    p.add_argument("--steps", type=int, default=100000, help="generator steps of each run")
    p.add_argument("--data", default="cifar10", help="cifar10, or a folder (to try the benchmark)")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--out", default="runs/fid_table", help="the runs' folders: OUT/<script>")
    p.add_argument("--eval-samples", type=int, default=50000)
    p.add_argument("--eval-features", default="inception-v3-compat")
    p.add_argument("--fid-weights", help="Inception's weights file (offline)")
    p.add_argument("extra", nargs="*", help="after --: flags for every training run")
    args = p.parse_args(argv)
    judge = ["--eval-samples", args.eval_samples, "--eval-features", args.eval_features,
             *(["--fid-weights", args.fid_weights] if args.fid_weights else [])]
    for script in args.scripts:
        out = Path(args.out) / script[:-3]
        train, wall = run([script, "--data", args.data, "--data-root", args.data_root, "--steps",
                           args.steps, "--out", out, "--eval-every", 0, *args.extra])
        print(f"\n## {script}  ({args.steps:,} steps, {wall / 60:.1f} min of training, "
              f"exit {train.returncode})\n")
        if train.returncode:
            print(f"training failed: {(train.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        batch = next((w for line in train.stdout.splitlines() if ", batch " in line
                      for w in [line.split(", batch ")[1].split(",")[0]]), "?")
        print("| checkpoint | " + " | ".join(FIGURES) + " | steps | batch | wall (eval) |")
        print("|---|" + "---|" * (len(FIGURES) + 3))
        protocol = None
        for name in ("last.pt", "best.pt"):
            if not (REPO / out / name).exists() and not (out / name).exists():
                continue
            res, wall = run([script, "--eval", "--ckpt", out / name, *judge])
            found, protocol = figures(res.stdout + res.stderr)
            cells = [f"{found[k]:.4g}" for k in FIGURES] if found else [protocol] + [""] * 3
            print(f"| {name} | " + " | ".join(cells) + f" | {args.steps:,} | {batch} | "
                  f"{wall:.0f} s |")
        print(f"\nours: {protocol}")
        for source, fid in PUBLISHED.get(script, []):
            print(f"published: FID {fid} ({source})")


if __name__ == "__main__":
    main()
