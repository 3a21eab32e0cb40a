"""ACGAN: Odena, Olah & Shlens 2017, "Conditional Image Synthesis with Auxiliary Classifier GANs"
(ICML 2017, arXiv:1610.09585).

G draws an image of a given class c; D does not get the label but has two heads on shared features:
P(S | X), whether the image is real, and P(C | X), its class. With the two log-likelihoods

    L_S = E[log P(S=real | x_real)] + E[log P(S=fake | x_fake)]
    L_C = E[log P(C=c | x_real)]    + E[log P(C=c | x_fake)]

D maximises L_S + L_C and G maximises L_C - L_S (written below as the non-saturating form: G minimises
BCE(S(G(z|c)), real) + CE(C(G(z|c)), c)). Both heads output logits: P(S) is a sigmoid inside
BCEWithLogitsLoss, P(C) a softmax inside CrossEntropyLoss (never a Softmax layer before it). G is
conditioned as in the paper: the one-hot class vector is concatenated to z. The networks are DCGAN's
(strided convolutions, BatchNorm, LeakyReLU in D, N(0, 0.02) weights, Adam(2e-4, 0.5)). The log shows
D's class accuracy on real images (acc_real) and on G's images (acc_fake, "does G draw the asked class?").

Labels come from MNIST / Fashion-MNIST / CIFAR-10, or from a folder's first-level subfolders (one class
each: ./pets/cat/*.jpg, ./pets/dog/*.jpg). The number of classes is inferred from the data.

    python acgan.py                              # MNIST, 32x32; one row per digit in the sample grids
    python acgan.py --data ./pets                # a folder with one subfolder per class, 64x64
    python acgan.py --resume                     # continue runs/acgan/last.pt
    python acgan.py --generate 100 --ckpt runs/acgan/last.pt            # 0_000000.png, 1_000001.png, ...
    python acgan.py --generate 100 --ckpt runs/acgan/last.pt --label 3  # only class 3
"""
# %% Imports
import argparse
import csv
import gzip
import hashlib
import math
import os
import signal
import struct
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageOps
from torchvision import transforms
from torchvision.utils import save_image

SCRIPT = "acgan.py"
CONDITIONAL = True                  # class labels: from the dataset, or one subfolder per class
ARCH_FLAGS = ("img_size", "channels", "latent_dim", "ngf", "ndf", "n_classes")  # taken from a checkpoint
SMALL_IMG_SIZE = 32                 # MNIST-like data (28 px) is resized to this ...
PHOTO_IMG_SIZE = 64                 # ... and a folder of photos to this, unless --img-size says otherwise
GRID_CLASSES, GRID_COLUMNS = 10, 8  # sample grids: one row per class (the first ten), the same z in each column


# %% Flags: the paper's defaults (the networks are DCGAN's)
def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (paper: 0.0002)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam betas (paper: beta1 = 0.5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5000, help="generator updates")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z (paper: 100 on CIFAR-10)")
    p.add_argument("--ngf", type=int, default=64, help="G's width: channels of its last hidden layer")
    p.add_argument("--ndf", type=int, default=64, help="D's width: channels of its first layer")
    args = finish_args(p, argv)
    args.n_classes = None                                    # inferred from the data (or the checkpoint)
    check(args.img_size is None or args.img_size in (16, 32, 64, 128, 256),
          f"--img-size must be a power of two from 16 to 256, got {args.img_size}")
    check(args.ngf >= 1 and args.ndf >= 1, "--ngf and --ndf must be positive")
    return args


# %% Models
def init_weights(m):
    """DCGAN paper: all weights from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """G(z|c): [z, one_hot(c)] (latent_dim + n_classes) x 1 x 1 -> 4x4 -> 8x8 -> ... -> img_size, each step
    a stride-2 transposed convolution that doubles the size and halves the channels (DCGAN's layout).

    The class enters as the paper's fixed one-hot vector (norm 1, next to z's norm of ~10), not as a
    learned embedding. On MNIST, N(0, 1) embeddings outweighed z and G drew one image per class; small
    learned ones sometimes let G settle on drawing another digit for a label (1s for label 5), a
    convention that D's class loss on fakes then learns too. README, Results has the figures."""

    def __init__(self, latent_dim, n_classes, channels, img_size, ngf):
        super().__init__()
        self.n_classes = n_classes
        n = int(math.log2(img_size)) - 2                       # upsampling steps after the 4x4 start
        width = [ngf * min(2 ** i, 8) for i in reversed(range(n))]  # e.g. 32 px: 256, 128, 64
        layers = [nn.ConvTranspose2d(latent_dim + n_classes, width[0], 4, 1, 0, bias=False),  # 1x1 -> 4x4
                  nn.BatchNorm2d(width[0]), nn.ReLU(True)]
        for c_in, c_out in zip(width, width[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]  # no BN at G's output
        self.net = nn.Sequential(*layers)

    def forward(self, z, labels):
        c = F.one_hot(labels, self.n_classes).to(z.dtype)   # class k -> [0, .., 1 (at k), .., 0]
        h = torch.cat([z.view(z.size(0), -1), c], dim=1)     # condition by concatenation
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN's discriminator trunk (stride-2 convolutions down to 4x4), then two linear heads on the same
    features: a real/fake logit and n_classes class logits. D never sees the label."""

    def __init__(self, n_classes, channels, img_size, ndf):
        super().__init__()
        n = int(math.log2(img_size)) - 2
        width = [ndf * min(2 ** i, 8) for i in range(n)]       # e.g. 32 px: 64, 128, 256
        layers = [nn.Conv2d(channels, width[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]  # no BN at D's input
        for c_in, c_out in zip(width, width[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        self.trunk = nn.Sequential(*layers, nn.Flatten())      # (B, width[-1] * 4 * 4)
        self.adv_head = nn.Linear(width[-1] * 16, 1)           # logit of P(S = real | x)
        self.class_head = nn.Linear(width[-1] * 16, n_classes)  # logits of P(C | x): no Softmax here

    def forward(self, x):
        h = self.trunk(x)
        return self.adv_head(h).view(-1), self.class_head(h)


def build_models(args):
    G = Generator(args.latent_dim, args.n_classes, args.channels, args.img_size, args.ngf)
    D = Discriminator(args.n_classes, args.channels, args.img_size, args.ndf)
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D


# %% Training
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.generate:
        return generate(args, device)

    ckpt = load_resume_checkpoint(args, device)              # None for a fresh run
    data = load_data(args, device)                           # uint8 images and int64 labels on the device
    classes = data["classes"]
    if ckpt is not None:
        check(ckpt["classes"] == classes, f"the checkpoint was trained on the classes {', '.join(ckpt['classes'])}; "
                                          f"this data has {', '.join(classes)}")
    args.n_classes = len(classes)
    G, D = build_models(args)
    G, D = G.to(device), D.to(device)
    fused = device.type == "cuda"                            # one kernel for the whole Adam update
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=tuple(args.betas), fused=fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=tuple(args.betas), fused=fused)
    rows = min(args.n_classes, GRID_CLASSES)                 # sample grid: row r draws class r ...
    fixed_noise = torch.randn(GRID_COLUMNS, args.latent_dim, device=device).repeat(rows, 1)  # ... column c z_c
    fixed_labels = torch.arange(rows, device=device).repeat_interleave(GRID_COLUMNS)

    nets = {"G": G, "D": D, "opt_G": opt_G, "opt_D": opt_D}
    start, extra = restore(ckpt, nets, device)
    fixed_noise = extra.get("fixed_noise", fixed_noise)
    fixed_labels = extra.get("fixed_labels", fixed_labels)
    G_fast, D_fast, autocast = fast_paths(args, device, G, D)
    bce = nn.BCEWithLogitsLoss()                             # -log P(S = target | x), from the logit
    ce = nn.CrossEntropyLoss()                               # -log P(C = c | x), from the logits (log-softmax inside)
    ones = torch.ones(args.batch_size, device=device)        # the target "real"
    zeros = torch.zeros(args.batch_size, device=device)      # the target "fake"

    def checkpoint(step):
        return {**state_dicts(nets), "step": step, "fixed_noise": fixed_noise, "fixed_labels": fixed_labels,
                "classes": classes}

    def sample_grid():
        with torch.no_grad(), autocast:
            return G_fast(fixed_noise, fixed_labels)

    names = ["loss_D", "loss_G", "D_x", "D_G_z", "acc_real", "acc_fake"]
    log = TrainLog(args, names, args.batch_size, start)
    print_run_header(args, device, data, {"G": G, "D": D}, start)
    with StopOnSignal() as stop:
        for step in range(start + 1, args.steps + 1):
            real, real_labels = sample_real(data, args.batch_size, with_labels=True)
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            fake_labels = torch.randint(args.n_classes, (args.batch_size,), device=device)  # c ~ U{0..n-1}

            # (1) Update D: maximise L_S + L_C, i.e. minimise both BCEs and both cross-entropies
            with autocast:
                fake = G_fast(z, fake_labels)
                s_real, c_real = D_fast(real)
                s_fake, c_fake = D_fast(fake.detach())       # detach: this step must not change G
                loss_S = bce(s_real, ones) + bce(s_fake, zeros)
                loss_C = ce(c_real, real_labels) + ce(c_fake, fake_labels)
                loss_D = loss_S + loss_C
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()

            # (2) Update G: maximise L_C - L_S: look real (non-saturating BCE) and be the asked class
            with autocast:
                s_gen, c_gen = D_fast(fake)
                loss_G = bce(s_gen, ones) + ce(c_gen, fake_labels)
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            opt_G.step()

            acc_real = (c_real.argmax(1) == real_labels).float().mean()  # on the device: no host sync
            acc_fake = (c_fake.argmax(1) == fake_labels).float().mean()
            stats = torch.stack([loss_D, loss_G, torch.sigmoid(s_real).mean(), torch.sigmoid(s_fake).mean(),
                                 acc_real, acc_fake])
            end_of_step(args, step, stats, log, stop, checkpoint, sample_grid, G)


# %% Plumbing shared by every script ==================================================================
# Everything below this line is the same in every script of the repository (tests/test_shared_code.py
# checks it), so that each file stays self-contained: data, checkpoints, sample grids, logging, errors.
# ====================================================================================================

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "mnist-mini": None}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CLASS_NAMES = {"fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                 "Bag", "Ankle boot"],      # label k of a named dataset is CLASS_NAMES[data][k]
               "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
MINI_FILE = Path("data") / "mnist-mini.npz"               # the first 10,000 MNIST training images, bundled
DEFAULTS = {}                                              # each flag's default, filled by finish_args


def fail(msg):
    """Bad input ends the program with one line on stderr and exit status 1, never a traceback."""
    raise SystemExit(f"{SCRIPT}: error: {msg}")


def check(ok, msg):
    if not ok:
        fail(msg)


def warn(msg):
    print(f"{SCRIPT}: warning: {msg}", file=sys.stderr, flush=True)


def make_parser(doc):
    p = argparse.ArgumentParser(prog=SCRIPT, description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail                                           # argparse's own errors: one line too
    g = p.add_argument_group("data and outputs (the same in every script)")
    g.add_argument("--data", default="mnist",
                   help="mnist, fashion-mnist, cifar10, mnist-mini, or a folder of images (searched recursively)")
    g.add_argument("--data-root", default="./data", help="where named datasets are found or downloaded")
    g.add_argument("--img-size", type=int, default=None,
                   help=f"output resolution (default {SMALL_IMG_SIZE} for MNIST-like data, {PHOTO_IMG_SIZE} for folders)")
    g.add_argument("--channels", type=int, default=None, choices=(1, 3), help="default: the data's")
    g.add_argument("--out", default=None, help="output folder (default runs/<script name>)")
    g.add_argument("--sample-every", type=int, default=500, help="steps between sample grids")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from <out>/last.pt, or from the checkpoint given")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile G and D (CUDA only)")
    g.add_argument("--generate", type=int, default=None, metavar="N",
                   help="write N images from --ckpt into --out, then exit")
    g.add_argument("--ckpt", default=None, help="checkpoint for --generate (default <out>/last.pt)")
    if CONDITIONAL:
        g.add_argument("--label", type=int, default=None, help="with --generate: draw only this class")
    return p


def finish_args(p, argv):
    """Parse, then check the flags every script shares. Inside Jupyter, sys.argv holds the kernel's
    own arguments, so a notebook gets the defaults (or whatever list it passes to main())."""
    if argv is None and "ipykernel" in sys.modules:
        argv = []
    args = p.parse_args(argv)
    DEFAULTS.update({flag: p.get_default(flag) for flag in vars(args)})
    args.out = args.out or str(Path("runs") / SCRIPT[:-3])
    for flag in ("steps", "batch_size", "latent_dim", "sample_every", "ckpt_every", "log_every"):
        value = getattr(args, flag)
        check(value >= 1, f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    check(args.lr > 0, f"--lr must be positive, got {args.lr}")
    check(all(0 <= b < 1 for b in args.betas), f"--betas must lie in [0, 1), got {args.betas}")
    check(args.generate is None or args.generate >= 1, f"--generate must be positive, got {args.generate}")
    return args


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    check(name != "cuda" or torch.cuda.is_available(), "--device cuda, but CUDA is not available on this machine")
    check(name != "mps" or torch.backends.mps.is_available(), "--device mps, but MPS is not available on this machine")
    if name == "cuda":
        torch.backends.cudnn.benchmark = True                # pick the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def fast_paths(args, device, *nets):
    """--compile and --amp: faster on CUDA, the same math. Returns the (maybe compiled) nets and an
    autocast context; the plain modules stay what is saved in checkpoints."""
    if args.compile and device.type != "cuda":
        print(f"--compile: torch.compile is used on CUDA only; running eagerly on {device.type}")
    elif args.compile:
        nets = tuple(torch.compile(net) for net in nets)
    if args.amp and device.type != "cuda":
        print(f"--amp: bf16 autocast is used on CUDA only; running in float32 on {device.type}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp and device.type == "cuda" else nullcontext()
    return (*nets, autocast)


# ---------------------------------------------------------------------------------------------- data
def load_data(args, device):
    """Returns {"images": uint8 (N, C, H, W), "labels": int64 (N,) or None, "classes": list or None},
    kept on the training device when it fits, so a batch is an index into it, not a DataLoader."""
    if args.data in DATASETS:
        images, labels, classes = load_named(args)
    else:
        images, labels, classes = load_folder(args)
    images = torch.from_numpy(images)
    labels = torch.from_numpy(labels).long() if labels is not None else None
    if device.type == "cuda" and images.numel() > 0.5 * torch.cuda.mem_get_info(device)[0]:
        warn("the images do not fit in half of the free GPU memory; sampling them from host memory")
        images = images.pin_memory()
    else:
        images = images.to(device)
        labels = labels.to(device) if labels is not None else None
    return {"images": images, "labels": labels, "classes": classes, "device": device}


def sample_real(data, batch_size, with_labels=False):
    """A batch of random training images as floats in [-1, 1] (tanh's range), drawn on the device."""
    images, labels = data["images"], data["labels"]
    idx = torch.randint(0, images.size(0), (batch_size,), device=images.device)
    x = images[idx].to(data["device"], non_blocking=True).float().div_(127.5).sub_(1.0)
    if with_labels:
        return x, labels[idx].to(data["device"], non_blocking=True)
    return x


def load_named(args):
    """MNIST / Fashion-MNIST / CIFAR-10 through torchvision; the IDX files of MNIST-like data are read
    directly when they are already on disk, also gzipped or in a read-only folder (Kaggle inputs)."""
    root = Path(args.data_root).expanduser()
    if args.data == "mnist-mini":
        images, labels = load_mini()
    elif args.data in ("mnist", "fashion-mnist"):
        raw = root / DATASETS[args.data] / "raw"
        found = find_idx(raw, "train-images-idx3-ubyte"), find_idx(raw, "train-labels-idx1-ubyte")
        if all(found):
            images, labels = read_idx(found[0]), read_idx(found[1])
        else:
            try:
                ds = download(args.data, root)
                images, labels = ds.data.numpy(), ds.targets.numpy()
            except Exception as e:                           # offline, proxy, read-only root, ...
                if args.data != "mnist":
                    fail(f"{args.data} is not under {root} and could not be downloaded ({first_line(e)})")
                warn(f"MNIST is not under {root} and could not be downloaded ({first_line(e)}); "
                     f"training on the bundled 10,000-image subset (--data mnist-mini)")
                images, labels = load_mini()
    else:
        try:
            ds = download(args.data, root)
        except Exception as e:
            fail(f"{args.data} is not under {root} and could not be downloaded ({first_line(e)})")
        images, labels = ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)  # NHWC -> NCHW
    images = images[:, None] if images.ndim == 3 else images  # MNIST: (N, 28, 28) -> (N, 1, 28, 28)
    args.channels = args.channels or images.shape[1]
    args.img_size = args.img_size or SMALL_IMG_SIZE or images.shape[-1]
    images = resize_uint8(to_channels(images, args.channels), args.img_size)
    classes = CLASS_NAMES.get(args.data, [str(c) for c in range(10)])  # MNIST: the digits
    print(f"data: {args.data}, {len(images)} images of {args.channels}x{args.img_size}x{args.img_size}"
          + (f", {len(classes)} classes: {', '.join(classes)}" if CONDITIONAL else ""))
    return np.ascontiguousarray(images), labels.astype(np.int64), classes


def download(name, root):
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    return cls(str(root), train=True, download=True)


def find_idx(folder, stem):
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path):
    """The IDX format of MNIST: 2 zero bytes, a type byte, the number of dims, big-endian dims, data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def load_mini():
    here = Path(globals().get("__file__", SCRIPT)).resolve().parent
    for path in (here / MINI_FILE, Path.cwd() / MINI_FILE):
        if path.is_file():
            with np.load(path) as f:
                return f["images"], f["labels"]
    fail(f"the bundled MNIST subset {MINI_FILE} is not next to {SCRIPT}; copy it from the repository")


def to_channels(images, channels):
    """uint8 (N, C, H, W) to 1 or 3 channels: grey is repeated, colour becomes luminance (ITU-R 601)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), images.astype(np.float32), axes=([0], [1]))
    return luma.round().clip(0, 255).astype(np.uint8)[:, None]


def resize_uint8(images, size, chunk=8192):
    """Resize (N, C, H, W) uint8 to size x size once, at load time (e.g. MNIST's 28 px to 32)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def load_folder(args):
    """Every image under the folder (recursively), short side resized and centre-cropped to img_size.
    Decoded once: the result is cached outside the data folder (which may be read-only), so the next
    run on the same files starts in seconds. Conditional scripts take each first-level subfolder as a class."""
    root = Path(args.data).expanduser()
    check(root.exists(), f"--data {args.data}: no such folder, and not a dataset name ({', '.join(DATASETS)})")
    check(root.is_dir(), f"--data {args.data} is a file; give the folder that holds the images")
    args.img_size = args.img_size or PHOTO_IMG_SIZE
    args.channels = args.channels or 3
    files, labels, classes = list_images(root)
    check(files, f"no images ({' '.join(sorted(IMAGE_EXTS))}) under {root}")

    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha1(repr((str(root.resolve()), args.img_size, args.channels, stats)).encode()).hexdigest()[:16]
    cache = cache_dir() / f"{root.resolve().name}-{args.img_size}px-{args.channels}ch-{key}.npz"
    t0 = time.time()
    if cache.is_file():
        with np.load(cache) as f:
            images, keep, first_bad = f["images"], f["keep"], str(f["first_bad"])
        print(f"data: {len(images)} images from the decode cache {cache} ({time.time() - t0:.1f} s)")
    else:
        size, mode = args.img_size, "RGB" if args.channels == 3 else "L"
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            decoded = list(pool.map(lambda f: decode_image(f, size, mode), files))
        keep = np.array([isinstance(d, np.ndarray) for d in decoded])
        check(keep.any(), f"none of the {len(files)} images under {root} could be read ({decoded[0]})")
        first_bad = next((d for d in decoded if not isinstance(d, np.ndarray)), "")
        images = np.stack([d for d in decoded if isinstance(d, np.ndarray)])
        images = images[..., None] if images.ndim == 3 else images
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        print(f"data: decoded {len(images)} images under {root} in {time.time() - t0:.1f} s")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, images=images, keep=keep, first_bad=first_bad)
            os.replace(tmp, cache)
            print(f"data: cached at {cache}; the next run on these files skips decoding")
        except OSError as e:
            warn(f"could not write the decode cache {cache} ({e}); the next run decodes again")
    if not keep.all():
        warn(f"skipped {(~keep).sum()} of {len(files)} images that could not be read (first: {first_bad})")
    labels = np.asarray(labels)[keep] if labels is not None else None
    print(f"data: {len(images)} images of {args.channels}x{args.img_size}x{args.img_size}"
          + (f", {len(classes)} classes: {', '.join(classes)}" if classes else ""))
    return images, labels, classes


def list_images(root):
    def images_under(folder):
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(root).parts))

    if not CONDITIONAL:
        return images_under(root), None, None
    subfolders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = {name: images_under(root / name) for name in subfolders}
    classes = [name for name in subfolders if found[name]]  # a subfolder without images is not a class
    loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file() and p.name[0] != "."]
    if not classes and not loose:
        return [], [], []                                    # no images at all: load_folder says so
    check(len(classes) >= 2, f"{SCRIPT} needs the images in one subfolder per class, at least two, under {root} "
                             f"(e.g. {root}/cat/*.jpg, {root}/dog/*.jpg); found {len(classes)} such subfolders")
    if loose:
        warn(f"{len(loose)} images directly under {root} are in no class subfolder; they are not used")
    if len(classes) < len(subfolders):
        warn(f"subfolders without images are not classes: {', '.join(n for n in subfolders if not found[n])}")
    files = [f for name in classes for f in found[name]]
    labels = [k for k, name in enumerate(classes) for _ in found[name]]
    return files, labels, classes


def decode_image(path, size, mode):
    """One file -> uint8 (H, W[, C]) array, or the reason it could not be read (then it is skipped)."""
    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))                    # JPEG: decode at a reduced scale, much faster
            img = ImageOps.exif_transpose(img).convert(mode)
            img = transforms.CenterCrop(size)(transforms.Resize(size)(img))  # short side to size, centre crop
            return np.asarray(img, dtype=np.uint8)
    except Exception as e:                                   # truncated, not an image, unsupported, ...
        return f"{path.name}: {first_line(e)}"


def cache_dir():
    return Path(os.environ.get("GAN_CACHE_DIR") or Path.home() / ".cache" / "gan-scripts").expanduser()


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].rstrip(':')}" if text else type(e).__name__


# -------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash or Ctrl-C mid-write never leaves a broken last.pt."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    path = Path(path)
    check(path.is_file(), f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)  # tensors and plain data only
    except Exception as e:
        fail(f"{path} is not a checkpoint that can be loaded safely ({first_line(e)})")
    check(isinstance(ckpt, dict) and "script" in ckpt, f"{path} is not a checkpoint of these scripts")
    check(ckpt["script"] == SCRIPT, f"{path} was written by {ckpt['script']}, not by {SCRIPT}")
    return ckpt


def adopt_arch_flags(args, ckpt):
    """The model's shape comes from the checkpoint, so --resume and --generate need no repeated flags."""
    for flag in ARCH_FLAGS:
        theirs = ckpt["args"].get(flag)
        if getattr(args, flag) not in (None, theirs, DEFAULTS.get(flag)):  # given, and different
            warn(f"--{flag.replace('_', '-')} {getattr(args, flag)} ignored: the checkpoint has {theirs}")
        setattr(args, flag, theirs)


def load_resume_checkpoint(args, device):
    if args.resume is None:
        return None
    ckpt = load_checkpoint(Path(args.out) / "last.pt" if args.resume == "auto" else args.resume, device)
    adopt_arch_flags(args, ckpt)
    check(ckpt["step"] < args.steps, f"the checkpoint is at step {ckpt['step']}; pass --steps larger than that")
    return ckpt


def state_dicts(nets):
    """Everything that is needed to continue exactly: weights, optimizer moments, RNG streams, flags."""
    state = {k: v.state_dict() for k, v in nets.items()}
    state["rng"] = {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return state


def restore(ckpt, nets, device):
    """Load a checkpoint into the models and optimizers; returns (step, the rest of the checkpoint)."""
    if ckpt is None:
        return 0, {}
    for name, obj in nets.items():
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"the checkpoint's {name} does not fit this model ({first_line(e)})")
    torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
    if device.type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    print(f"resumed from step {ckpt['step']}")
    return ckpt["step"], ckpt


# -------------------------------------------------------------------------------- sampling and logs
def save_grid(images, path, nrow=8):
    """A grid of images in [-1, 1] as one PNG (torchvision's make_grid + save_image)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float(), path, nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))


def generate(args, device):
    """--generate N: N images from the checkpoint's G, one PNG each, named <index>.png
    (conditional scripts: <label>_<index>.png, labels cycling through the classes or fixed by --label)."""
    ckpt = load_checkpoint(args.ckpt or Path(args.out) / "last.pt", device)
    adopt_arch_flags(args, ckpt)
    G = build_models(args)[0].to(device)
    G.load_state_dict(ckpt["G"])
    G.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if CONDITIONAL:
        n_classes = len(ckpt["classes"])
        check(args.label is None or 0 <= args.label < n_classes,
              f"--label must be in 0..{n_classes - 1}, got {args.label}")
    with torch.no_grad():
        for first in range(0, args.generate, 256):
            index = torch.arange(first, min(first + 256, args.generate))
            z = torch.randn(len(index), args.latent_dim, device=device)
            if CONDITIONAL:
                labels = torch.full_like(index, args.label) if args.label is not None else index % n_classes
                images = G(z, labels.to(device))
            else:
                images = G(z)
            for i, img in zip(index.tolist(), images):
                name = f"{labels[i - first].item()}_{i:06d}.png" if CONDITIONAL else f"{i:06d}.png"
                save_image(img.float(), out / name, normalize=True, value_range=(-1, 1))
    print(f"wrote {args.generate} images to {out}")


def print_run_header(args, device, data, nets, start):
    sizes = ", ".join(f"{k} {sum(p.numel() for p in v.parameters()) / 1e6:.2f}M params" for k, v in nets.items())
    print(f"{SCRIPT}: {device.type}, {sizes}, steps {start + 1}..{args.steps}, batch {args.batch_size}, out {args.out}")
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    pick = torch.randperm(data["images"].size(0), generator=torch.Generator().manual_seed(0))[:64]
    save_grid(data["images"][pick.to(data["images"].device)].float() / 127.5 - 1, out / "real.png")


class TrainLog:
    """Averages the per-step numbers over --log-every steps without a host sync per step, writes
    log.csv and a loss-curve picture, prints a progress line, and notices NaN/inf losses."""

    def __init__(self, args, names, images_per_step, start):
        self.args, self.names, self.images_per_step = args, names, images_per_step
        self.path = Path(args.out) / "log.csv"
        self.sum, self.count, self.bad_step = None, 0, None
        self.start_time = self.t0 = time.time()
        self.steps_since = 0
        last = Path(args.out) / "last.pt"
        self.last_good = last if last.is_file() else None
        rows = []
        if start and self.path.is_file():                    # resuming: keep the rows up to the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if int(r[0]) <= start]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([["step", *names, "img_per_s", "elapsed_s"], *rows])
        self.elapsed0 = float(rows[-1][-1]) if rows else 0.0

    def add(self, step, stats):
        stats = stats.detach().float()
        finite = torch.isfinite(stats).all()
        if self.sum is None:
            self.sum = torch.zeros_like(stats)
            self.bad_step = torch.full((), -1, dtype=torch.long, device=stats.device)
        self.sum += stats
        self.count += 1
        self.steps_since += 1
        # remember the first step whose numbers were not finite, still without waiting for the GPU
        self.bad_step = torch.where(finite | (self.bad_step >= 0), self.bad_step, torch.full_like(self.bad_step, step))

    def check_finite(self):
        if self.bad_step is not None and self.bad_step.item() >= 0:
            kept = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
            fail(f"loss became NaN/inf at step {self.bad_step.item()}; stopping ({kept}). "
                 f"Try a lower --lr, or drop --amp")

    def write(self, step):
        self.check_finite()
        mean = (self.sum / self.count).tolist()
        dt = time.time() - self.t0
        ips = self.steps_since * self.images_per_step / dt
        elapsed = self.elapsed0 + time.time() - self.start_time
        left = (self.args.steps - step) * dt / self.steps_since
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step, *(f"{v:.5g}" for v in mean), f"{ips:.1f}", f"{elapsed:.1f}"])
        values = " ".join(f"{n} {v:.3f}" for n, v in zip(self.names, mean))
        print(f"[{step:>{len(str(self.args.steps))}}/{self.args.steps}] {values} | {ips:,.0f} img/s | "
              f"{format_time(left)} left", flush=True)
        self.sum.zero_()
        self.count, self.steps_since, self.t0 = 0, 0, time.time()

    def plot(self):
        """log.csv as a line chart (loss.png), drawn with PIL so that no plotting package is needed."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) < 2:
            return
        W, H, pad = 800, 420, 60
        img = Image.new("RGB", (W, H), "white")
        draw = ImageDraw.Draw(img)
        steps = [float(r["step"]) for r in rows]
        series = {n: [float(r[n]) for r in rows] for n in self.names}
        lo, hi = min(min(v) for v in series.values()), max(max(v) for v in series.values())
        hi = hi if hi > lo else lo + 1

        def xy(s, v):
            return (pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (W - 2 * pad),
                    H - pad - (v - lo) / (hi - lo) * (H - 2 * pad))

        draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
        draw.text((pad, H - pad + 8), f"step {int(steps[0])}", fill="black")
        draw.text((W - pad - 70, H - pad + 8), f"step {int(steps[-1])}", fill="black")
        draw.text((4, pad - 6), f"{hi:.3g}", fill="black")
        draw.text((4, H - pad - 6), f"{lo:.3g}", fill="black")
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        for i, (name, values) in enumerate(series.items()):
            colour = colours[i % len(colours)]
            draw.line([xy(s, v) for s, v in zip(steps, values)], fill=colour, width=2)
            draw.text((pad + 10 + 110 * i, pad - 20), name, fill=colour)
        draw.text((pad, 10), f"{SCRIPT}: {self.path}", fill="black")
        img.save(self.path.with_name("loss.png"))


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StopOnSignal:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step; the loop then saves last.pt.
    A second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self.old = {}

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit at once)",
                  flush=True)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, handler)
        except ValueError:                                   # not in the main thread: keep Python's handling
            pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False


def end_of_step(args, step, stats, log, stop, checkpoint, sample_grid, G):
    """After every step: log, draw samples, checkpoint, and stop cleanly on Ctrl-C."""
    log.add(step, stats)
    stopping = stop.requested                                # read once: a signal may arrive at any line
    last = step == args.steps or stopping
    out = Path(args.out)
    if step % args.log_every == 0 or last:
        log.write(step)
        log.plot()
    if step % args.sample_every == 0 or last:
        log.check_finite()
        G.eval()                                             # BatchNorm in inference mode for the grid
        save_grid(sample_grid(), out / "samples" / f"{step:06d}.png")
        G.train()
    if step % args.ckpt_every == 0 or last:
        log.check_finite()                                   # never overwrite a good checkpoint with NaNs
        state = checkpoint(step)
        state.update(script=SCRIPT, args=vars(args))
        save_checkpoint(state, out / "last.pt")
        log.last_good = out / "last.pt"
    if stopping:
        print(f"stopped at step {step}; continue with: python {SCRIPT} --resume"
              + (f" --out {args.out}" if args.out != str(Path("runs") / SCRIPT[:-3]) else ""))
        raise SystemExit(130)
    if last:
        print(f"done: samples in {out / 'samples'}, checkpoint {out / 'last.pt'}, log {out / 'log.csv'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                                # outside the training loop: nothing to save
        raise SystemExit(130)
