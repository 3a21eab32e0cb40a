"""Score generated MNIST digits with a small CNN trained here, on MNIST, for this check only.

    python cgan.py --generate 1000 --ckpt runs/cgan/last.pt --out gen/cgan
    python benchmarks/digit_classifier.py --images gen/cgan --data-root ../shared/data

Files named <label>_<index>.png (the conditional scripts' --generate) are scored against the asked label:
per class, the share classified as that label, the mean probability of that label, and the mean
confidence (the top probability). Files named <index>.png (unconditional scripts) get the share of each
predicted digit instead, which shows whether all ten digits appear about equally often.

The classifier (three conv layers, ~0.15M parameters; ~99% on MNIST's test set after two epochs) is
trained on first use from the MNIST IDX files under --data-root/MNIST/raw, resized to 32x32 the way the
scripts resize MNIST, and its weights are cached outside the repository (--cache).
"""
import argparse
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
    sys.exit(f"digit_classifier.py: error: no {stem} under {folder}; pass --data-root (the folder holding MNIST/raw)")


def to_input(images):
    """uint8 (N, H, W) -> float (N, 1, SIZE, SIZE) in [-1, 1], resized as the scripts resize MNIST."""
    x = torch.from_numpy(np.array(images)).float()[:, None]       # a copy: the IDX buffer is read-only
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    return x / 127.5 - 1


def make_model():
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),  # 32 -> 4 px
                         nn.Dropout(0.3), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def train(data_root, epochs=2, batch=128, seed=0):
    raw = Path(data_root).expanduser() / "MNIST" / "raw"
    x_train, y_train = to_input(read_idx(raw, "train-images-idx3-ubyte")), read_idx(raw, "train-labels-idx1-ubyte")
    x_test, y_test = to_input(read_idx(raw, "t10k-images-idx3-ubyte")), read_idx(raw, "t10k-labels-idx1-ubyte")
    y_train, y_test = torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64))
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(x_train) // batch))
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch):
            idx = order[i * batch:(i + 1) * batch]
            x = x_train[idx]
            dx, dy = torch.randint(-2, 3, (2,)).tolist()      # small shifts: generated digits are not centred
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = (predict(model, x_test).argmax(1) == y_test).float().mean().item()
        print(f"classifier: epoch {epoch + 1}/{epochs}, MNIST test accuracy {acc:.2%} ({time.time() - t0:.0f} s)")
    return model, acc


@torch.no_grad()
def predict(model, x, batch=1000):
    model.eval()
    return torch.cat([F.softmax(model(x[i:i + batch]), dim=1) for i in range(0, len(x), batch)])


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
    p.add_argument("--images", required=True, help="folder of <label>_<index>.png (or <index>.png) files")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw (to train the classifier once)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the classifier's weights are kept")
    p.add_argument("--confident", type=float, default=0.9, help="a prediction with this top probability is confident")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    model = load_or_train(args.data_root, args.cache)
    images, asked = read_images(args.images)
    probs = predict(model, to_input(images))
    top, predicted = probs.max(1)
    confident = (top >= args.confident).float()
    print(f"\n{len(images)} images in {args.images}")
    if asked is None:                                     # unconditional: how often each digit appears
        print(f"{'digit':>5} | {'share':>6} | {'mean conf':>9}")
        for d in range(10):
            sel = predicted == d
            conf = top[sel].mean().item() if sel.any() else float("nan")
            print(f"{d:>5} | {sel.float().mean().item():6.1%} | {conf:9.3f}")
        print(f"{'all':>5} | {1:6.0%} | {top.mean().item():9.3f}   confident (p >= {args.confident}): "
              f"{confident.mean().item():.1%}")
        return
    asked = torch.from_numpy(asked)
    hit = (predicted == asked).float()
    p_asked = probs.gather(1, asked[:, None].clamp(0, 9)).squeeze(1)
    print(f"{'label':>5} | {'n':>5} | {'asked digit':>11} | {'mean p(asked)':>13} | {'mean conf':>9} | "
          f"{'confident':>9} | most common other")
    for d in sorted(set(asked.tolist())):
        sel = asked == d
        wrong = predicted[sel & (predicted != asked)]
        other = f"{wrong.mode().values.item()} ({len(wrong)})" if len(wrong) else "-"
        print(f"{d:>5} | {int(sel.sum()):>5} | {hit[sel].mean().item():11.1%} | {p_asked[sel].mean().item():13.3f} | "
              f"{top[sel].mean().item():9.3f} | {confident[sel].mean().item():9.1%} | {other}")
    print(f"{'all':>5} | {len(asked):>5} | {hit.mean().item():11.1%} | {p_asked.mean().item():13.3f} | "
          f"{top.mean().item():9.3f} | {confident.mean().item():9.1%} |")


if __name__ == "__main__":
    main()
