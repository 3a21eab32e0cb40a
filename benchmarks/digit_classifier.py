"""Score generated MNIST digits with a small CNN trained here, on MNIST, for this check only.

    python cgan.py --generate 1000 --ckpt runs/cgan/last.pt --out gen/cgan
    python benchmarks/digit_classifier.py --images gen/cgan --data-root ../shared/data

Files named <label>_<index>.png (the conditional scripts' --generate) are scored against the asked
label: per class, the share classified as that label, the mean probability of that label, and the
mean confidence (the top probability). Files named <index>.png (unconditional scripts) get the share
of each predicted digit instead, which shows whether all ten digits appear about equally often. Both
also get a Frechet distance (FD) between the classifier's 128 penultimate features of the images and
of MNIST's 10,000 test images (the FID recipe with this small MNIST judge in place of Inception): 0
for identical statistics; it rises when digits blur, break or go missing. Only differences between
runs scored here mean something, not the absolute value. --csv appends one row of the headline
numbers to a file.

The classifier (three conv layers, ~0.15M parameters; ~99% on MNIST's test set after two epochs)
is trained on first use from the MNIST IDX files under --data-root/MNIST/raw, resized to 32x32 the
way the scripts resize MNIST, and its weights are cached outside the repository (--cache).
"""
import argparse
import csv
import gzip
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

SIZE = 32                                                  # the scripts' MNIST resolution
DEFAULT_CACHE = Path.home() / ".cache" / "gan-scripts" / f"digit_classifier_{SIZE}px.pt"


def read_idx(folder, stem):
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
                raw = f.read()
            shape = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
            return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape)
    sys.exit(f"digit_classifier.py: error: no {stem} under {folder}; pass --data-root (the folder "
             f"holding MNIST/raw)")


def to_input(images):
    """uint8 (N, H, W) -> float (N, 1, SIZE, SIZE) in [-1, 1], resized as the scripts resize MNIST.
    """
    # a copy: the IDX buffer is read-only
    x = torch.from_numpy(np.array(images)).float()[:, None]
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255)
    return x / 127.5 - 1


def make_model():
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),  # 32 -> 4 px
                         nn.Dropout(0.3), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def train(data_root, epochs=2, batch=128, seed=0):
    raw = Path(data_root).expanduser() / "MNIST" / "raw"
    x_train = to_input(read_idx(raw, "train-images-idx3-ubyte"))
    x_test = to_input(read_idx(raw, "t10k-images-idx3-ubyte"))
    y_train = torch.from_numpy(read_idx(raw, "train-labels-idx1-ubyte").astype(np.int64))
    y_test = torch.from_numpy(read_idx(raw, "t10k-labels-idx1-ubyte").astype(np.int64))
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    total = epochs * (len(x_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch):
            idx = order[i * batch:(i + 1) * batch]
            x = x_train[idx]
            # small shifts: generated digits are not centred
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = (predict(model, x_test).argmax(1) == y_test).float().mean().item()
        print(f"classifier: epoch {epoch + 1}/{epochs}, MNIST test accuracy {acc:.2%} "
              f"({time.time() - t0:.0f} s)")
    return model, acc


@torch.no_grad()
def predict(model, x, batch=1000):
    model.eval()
    return torch.cat([F.softmax(model(x[i:i + batch]), dim=1) for i in range(0, len(x), batch)])


@torch.no_grad()
def features(model, x, batch=1000):
    """The 128 numbers before the last layer: what the Frechet distance compares."""
    model.eval()
    return torch.cat([model[:-1](x[i:i + batch]) for i in range(0, len(x), batch)]).double()


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to two feature
    sets. Tr((S_a S_b)^1/2) is the sum of the square roots of the eigenvalues of S_a^1/2 S_b
    S_a^1/2."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def load_or_train(data_root, cache):
    cache = Path(cache).expanduser()
    model = make_model()
    if cache.is_file():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        print(f"classifier: {cache} (MNIST test accuracy {state['test_accuracy']:.2%})")
        return model
    model, acc = train(data_root)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "test_accuracy": acc}, cache)
    print(f"classifier: weights cached at {cache}")
    return model


def read_images(folder):
    files = sorted(p for p in Path(folder).glob("*.png"))
    if not files:
        sys.exit(f"digit_classifier.py: error: no .png files in {folder}")
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])
    asked = [p.stem.split("_")[0] if "_" in p.stem else None for p in files]
    labelled = all(a is not None and a.isdigit() for a in asked)
    return images, (np.array([int(a) for a in asked]) if labelled else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="a folder of <label>_<index>.png or <index>.png")
    p.add_argument("--data-root", default="./data", help="the folder holding MNIST/raw")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the classifier's weights are")
    p.add_argument("--confident", type=float, default=0.9,
                   help="a prediction with this top probability is confident")
    p.add_argument("--csv", default=None, help="append a row (name, confident, shares, FD) to it")
    p.add_argument("--name", default=None, help="the row's name in --csv (default: --images)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    model = load_or_train(args.data_root, args.cache)
    images, asked = read_images(args.images)
    probs = predict(model, to_input(images))
    top, predicted = probs.max(1)
    confident = (top >= args.confident).float()
    raw = Path(args.data_root).expanduser() / "MNIST" / "raw"
    test = to_input(read_idx(raw, "t10k-images-idx3-ubyte"))
    fd = frechet_distance(features(model, to_input(images)), features(model, test))
    print(f"\n{len(images)} images in {args.images}; Frechet distance to MNIST's test set: "
          f"{fd:.1f}")
    row = {"name": args.name or args.images, "n": len(images),
           "confident": f"{confident.mean().item():.3f}", "fd": f"{fd:.1f}"}
    # unconditional: how often each digit appears
    if asked is None:
        print(f"{'digit':>5} | {'share':>6} | {'mean conf':>9}")
        shares = []
        for d in range(10):
            sel = predicted == d
            conf = top[sel].mean().item() if sel.any() else float("nan")
            shares.append(sel.float().mean().item())
            print(f"{d:>5} | {shares[-1]:6.1%} | {conf:9.3f}")
        print(f"{'all':>5} | {1:6.0%} | {top.mean().item():9.3f}   "
              f"confident (p >= {args.confident}): "
              f"{confident.mean().item():.1%}")
        row.update(min_share=f"{min(shares):.3f}", min_digit=shares.index(min(shares)),
                   max_share=f"{max(shares):.3f}", max_digit=shares.index(max(shares)))
        return append_row(args.csv, row)
    asked = torch.from_numpy(asked)
    hit = (predicted == asked).float()
    p_asked = probs.gather(1, asked[:, None].clamp(0, 9)).squeeze(1)
    print(f"{'label':>5} | {'n':>5} | {'asked digit':>11} | {'mean p(asked)':>13} | "
          f"{'mean conf':>9} | "
          f"{'confident':>9} | most common other")
    for d in sorted(set(asked.tolist())):
        sel = asked == d
        wrong = predicted[sel & (predicted != asked)]
        other = f"{wrong.mode().values.item()} ({len(wrong)})" if len(wrong) else "-"
        print(f"{d:>5} | {int(sel.sum()):>5} | {hit[sel].mean().item():11.1%} | "
              f"{p_asked[sel].mean().item():13.3f} | "
              f"{top[sel].mean().item():9.3f} | {confident[sel].mean().item():9.1%} | {other}")
    print(f"{'all':>5} | {len(asked):>5} | {hit.mean().item():11.1%} | "
          f"{p_asked.mean().item():13.3f} | "
          f"{top.mean().item():9.3f} | {confident.mean().item():9.1%} |")
    row.update(asked_hit=f"{hit.mean().item():.3f}")
    append_row(args.csv, row)


def append_row(path, row):
    if path is None:
        return
    path = Path(path)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
