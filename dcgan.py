"""DCGAN: Radford, Metz & Chintala 2015, "Unsupervised Representation Learning with
Deep Convolutional Generative Adversarial Networks" (arXiv:1511.06434).

The GAN game of Goodfellow et al. 2014, played by two convolutional networks:

    D maximises   E_x[log D(x)] + E_z[log(1 - D(G(z)))]        (a real/fake classifier)
    G maximises   E_z[log D(G(z))]                             (the non-saturating G loss)

and the paper's rules for making that stable:
  * no pooling: D downsamples with strided convolutions, G upsamples with transposed ones;
  * BatchNorm everywhere except D's input layer and G's output layer;
  * ReLU in G (tanh at the output), LeakyReLU(0.2) in D;
  * weights from N(0, 0.02); Adam with lr 2e-4 and beta1 0.5.

    python dcgan.py                              # MNIST at 32x32 (offline: the bundled subset)
    python dcgan.py --data ./my_images           # any folder of images, 64x64 by default
    python dcgan.py --resume                     # continue runs/dcgan/last.pt
    python dcgan.py --generate 100 --ckpt runs/dcgan/last.pt
"""
# %% Imports
import math
import sys

# Ctrl-C while torch loads, the first seconds: exit 130 without a traceback
sys.excepthook = lambda kind, e, tb: kind is KeyboardInterrupt or sys.__excepthook__(kind, e, tb)
import torch
import torch.nn as nn

SCRIPT, CONDITIONAL = "dcgan.py", False  # the name checkpoints carry; no class labels
SMALL_IMG_SIZE, PHOTO_IMG_SIZE = 32, 64  # default sizes: MNIST-like data (28 px), folders of photos


# %% Flags: the paper's defaults
def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (paper: 0.0002)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.999),
                   help="Adam betas (paper: beta1 = 0.5)")
    p.add_argument("--batch-size", type=int, default=128, help="paper: 128")
    p.add_argument("--steps", type=int, default=5000, help="generator updates")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z (paper: 100)")
    p.add_argument("--ngf", type=int, default=64, help="G's width: its last hidden layer's")
    p.add_argument("--ndf", type=int, default=64, help="D's width: channels of its first layer")
    p.add_argument("--spectral-norm", action="store_true",
                   help="spectral normalisation in D in place of BatchNorm (docs/long-runs.md)")
    args = parse(p, argv)
    check(args.img_size in (None, 16, 32, 64, 128, 256), "--img-size must be 16, 32, ..., 256")
    check(0 < args.ngf <= 4096 and 0 < args.ndf <= 4096, "--ngf and --ndf must be in 1..4096")
    return args


# %% Models
def init_weights(m):
    """DCGAN paper: all weights from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Each step a stride-2 transposed convolution: twice the size, half the channels.

        z             latent_dim x 1 x 1
        -> 4x4        8 ngf           (64 px; at 32 px the first layer has 4 ngf)
        -> 8x8        4 ngf
        -> 16x16      2 ngf
        -> 32x32      ngf
        -> 64x64      channels, tanh  (no BatchNorm at G's output)
    """

    def __init__(self, latent_dim, channels, img_size, ngf):
        super().__init__()
        n = int(math.log2(img_size)) - 2                       # upsampling steps after 4x4
        width = [ngf * min(2 ** i, 8) for i in reversed(range(n))]  # 64 px: 8, 4, 2, 1 x ngf
        layers = [nn.ConvTranspose2d(latent_dim, width[0], 4, 1, 0, bias=False),  # 1x1 -> 4x4
                  nn.BatchNorm2d(width[0]), nn.ReLU(True)]
        for c_in, c_out in zip(width, width[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.size(0), -1, 1, 1))


class Discriminator(nn.Module):
    """The mirror image, stride-2 convolutions down to 4x4, then one 4x4 convolution to a logit.

        x             channels x 64 x 64
        -> 32x32      ndf             (no BatchNorm at D's input)
        -> 16x16      2 ndf
        -> 8x8        4 ndf
        -> 4x4        8 ndf
        -> 1x1        1 logit; D(x) = sigmoid(logit) lives in BCEWithLogitsLoss (the stable form)
    """

    def __init__(self, channels, img_size, ndf):
        super().__init__()
        n = int(math.log2(img_size)) - 2
        width = [ndf * min(2 ** i, 8) for i in range(n)]       # 64 px: 1, 2, 4, 8 x ndf
        layers = [nn.Conv2d(channels, width[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(width, width[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False)]  # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


def build_models(args):
    G = Generator(args.latent_dim, args.channels, args.img_size, args.ngf)
    D = Discriminator(args.channels, args.img_size, args.ndf)
    G.apply(init_weights)
    D.apply(init_weights)
    if args.spectral_norm:                    # the remedy for long runs (docs/long-runs.md)
        spectral_norm_(D)
    return G, D


# %% Training: the paper's algorithm (run, defined below, owns data, checkpoints and logs)
def train(run):
    args, device = run.args, run.device
    G, D = (net.to(device) for net in build_models(args))
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas, fused=run.cuda)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=args.betas, fused=run.cuda)
    G, D = run.start(G, D, opt_G, opt_D)      # --resume, the fixed noise of the grids, real.png
    bce = nn.BCEWithLogitsLoss()              # BCE on logits: -[y log D + (1-y) log(1-D)]
    ones = torch.ones(args.batch_size, device=device)     # the label "real"
    zeros = torch.zeros(args.batch_size, device=device)   # the label "fake"

    def step():                               # one generator update
        real = run.real_batch()
        z = torch.randn(args.batch_size, args.latent_dim, device=device)

        # (1) Update D: maximise log D(x) + log(1 - D(G(z)))
        with run.autocast:
            fake = G(z)
            d_real = D(real)
            d_fake = D(fake.detach())         # detach: this step must not change G
            loss_D = bce(d_real, ones) + bce(d_fake, zeros)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()

        # (2) Update G: maximise log D(G(z)), i.e. minimise -log D(G(z)) (non-saturating loss)
        with run.autocast:
            loss_G = bce(D(fake), ones)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        return dict(loss_D=loss_D, loss_G=loss_G, D_x=d_real.sigmoid().mean(),
                    D_G_z=d_fake.sigmoid().mean())

    run.loop(step)                            # every step, then the log, grids, checkpoints


# %% When training has failed (docs/long-runs.md): the sign in one log interval's means
def failing(m, args):
    """D tells real from fake almost perfectly: G's loss climbs, its samples stop improving."""
    if m["D_x"] > 0.95 and m["D_G_z"] < 0.05:
        return "D wins (D(x) > 0.95, D(G(z)) < 0.05)"


# %% Plumbing shared by every script ==============================================================
# The same in every script down to the end marker, in parts with one job each. The source copy is
# dcgan.py's; after editing it, `python tests/sync_plumbing.py` copies it.
import argparse, copy, csv, errno, gzip, hashlib, io, itertools, os  # noqa: E401
import shlex, shutil, signal, struct, sys, time, warnings  # noqa: E401
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext, redirect_stderr, suppress
from pathlib import Path

import numpy as np
import torch.distributed as dist
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageOps
from torchvision.utils import save_image

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10",
            "mnist-mini": ""}
CLASSES = {"fashion-mnist": "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,"
           "Ankle boot", "cifar10": "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IPYTHON = sys.modules.get("IPython")    # a Jupyter kernel (Colab, Kaggle): argv is the kernel's
NOTEBOOK = IPYTHON is not None and hasattr(IPYTHON.get_ipython(), "kernel")  # and errors print
OWN_FLAGS = {"resume", "generate", "eval", "ckpt", "label", "device", "out"}  # not resumed
CKPT_KEYS = ("script", "step", "args", "G", "D", "opt_G", "opt_D", "fixed_noise", "rng")


def fail(msg):
    """Bad input: one line on stderr (a newline in a name said as \\n) and exit status 1."""
    raise SystemExit(f"{SCRIPT}: error: " + msg.replace("\n", "\\n"))


def check(ok, msg):
    if not ok:
        fail(msg)


def warn(msg):
    print(f"{SCRIPT}: warning: " + msg.replace("\n", "\\n"), file=sys.stderr, flush=True)


def why(e):
    """An exception in one line; one ending in ':' with its reason (its cause, or last line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    inner = lines[0][-1:] in ":" and (e.__cause__ or e.__context__)
    tail = " " + lines[-1] if lines[0].endswith(":") and len(lines) > 1 else ""
    return why(inner) if inner else f"{type(e).__name__}: {lines[0]}{tail}"[:200]


def hms(seconds):
    return f"{int(seconds) // 3600}h{int(seconds) % 3600 // 60:02d}m{int(seconds) % 60:02d}s"


def main(argv=None):
    """The command line's and a notebook's entry (a notebook's error: one printed line, no exit)."""
    for stream in (sys.stdout, sys.stderr):                 # a name that is not UTF-8: \x..
        with suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = parse_args(argv)
        if args.generate is not None or args.eval:
            return judge_checkpoint(args) if args.eval else generate(args)
        with closing(Run(args)) as run:
            return train(run)
    except (SystemExit, KeyboardInterrupt) as e:  # KeyboardInterrupt: Ctrl-C before the handlers
        code = getattr(e, "code", 130)
    except (OSError, MemoryError) as e:                     # a name too long; out of memory
        code = f"{SCRIPT}: error: {why(e)}" + "; a smaller --img-size?" * isinstance(e, MemoryError)
    if not NOTEBOOK:
        raise SystemExit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)


# %% Flags shared by every script
class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):                     # a default said once, None never
        said = action.default is None or action.default is False or "default" in action.help
        return action.help if said else super()._get_help_string(action)


def make_parser(doc):
    p = argparse.ArgumentParser(SCRIPT, description=doc.split("\n\n")[0], formatter_class=Help)
    p.error = fail                                          # argparse's own errors: one line too
    g = p.add_argument_group("shared by every script").add_argument
    g("--data", default="mnist", help="mnist, fashion-mnist, cifar10, mnist-mini, or a folder")
    g("--data-root", default="./data", help="where named datasets are found or downloaded")
    g("--img-size", type=int, help=f"default: {SMALL_IMG_SIZE} (MNIST), {PHOTO_IMG_SIZE} (photos)")
    g("--channels", type=int, choices=(1, 3), help="default: the data's")
    g("--out", help="output folder (default: runs/<script>[-<data>], or --resume PATH's folder)")
    g("--sample-every", type=int, default=500, help="steps between sample grids")
    g("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    g("--log-every", type=int, default=50, help="steps between log lines")
    g("--resume", nargs="?", const="", metavar="PATH", help="continue <out>/last.pt, or PATH")
    g("--seed", type=int, default=0, help="the seed of every random stream")
    g("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda/mps/cpu")
    g("--amp", action="store_true", help="bf16 autocast (CUDA)")
    g("--compile", action="store_true", help="torch.compile G and D (CUDA)")
    g("--cuda-graph", action="store_true", help="capture a whole step as one CUDA graph (CUDA)")
    g("--generate", type=int, metavar="N", help="write N images from --ckpt, then exit")
    g("--eval", action="store_true", help="print --ckpt's FID, KID, precision, recall; then exit")
    g("--ckpt", help="for --generate, --eval (default: runs/<script>[-<data>]/last.pt)")
    if CONDITIONAL:
        g("--label", type=int, help="with --generate: draw only this class")
    g("--eval-every", type=int, metavar="N", help="default: the snapshots' on CUDA, else 0 (none)")
    g("--eval-samples", type=int, default=5000, metavar="N", help="G's images per evaluation")
    g("--eval-features", default="inception-v3-compat", help="torch-fidelity's feature extractor")
    g("--fid-weights", metavar="PATH", help="its weights, offline (default: torch hub's cache)")
    g("--keep-every", type=int, default=0, metavar="N", help="snapshots (default: --steps / 5)")
    g("--stop-on-collapse", action="store_true", help="when training is failing: save, exit 3")
    g("--ema", type=float, default=0.0, metavar="DECAY", help="average G's weights (e.g. 0.999)")
    return p


def parse(p, argv):
    """Flags typed (args.given), then a checkpoint's, read by one parser: refused alike."""
    argv = [str(a) for a in (argv if argv is not None else [] if NOTEBOOK else sys.argv[1:])]
    unset = object()
    typed = vars(p.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in p._actions})))
    given, args = sorted(k for k, v in typed.items() if v is not unset), p.parse_args(argv)
    check(args.generate is None or args.generate > 0, f"--generate must be positive, got "
                                                      f"{args.generate}")
    check(args.ckpt is None or args.generate or args.eval, "--ckpt goes with --generate or --eval")
    check(getattr(args, "label", None) is None or args.generate, "--label goes with --generate")
    check("" not in (args.data, args.data_root, args.out, args.ckpt), "a path must not be empty")
    name = args.data if args.data in DATASETS else Path(os.path.abspath(expand(args.data))).name
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"-{name}") * (args.data !=
                                                                                  "mnist")
    out = expand(f"runs/{SCRIPT[:-3]}{tag}")                # by default, the run of this data
    source = args.resume or args.ckpt                       # a checkpoint, or its folder
    source = source and expand(source) / ("last.pt" if expand(source).is_dir() else "")
    if args.resume is not None or args.generate is not None or args.eval:
        path = source or (expand(args.out or out) if args.resume is not None else out) / "last.pt"
        ckpt = load_checkpoint(path)
        args = p.parse_args(saved_flags(p, path, ckpt, given) + argv)
        args.checkpoint, out = (path, ckpt), path.parent / ("generated" if args.generate else "")
        args.n_classes = len(ckpt.get("classes") or []) or None  # cgan, acgan: as many as names
    args.given, args.out, args.data_root = given, args.out or str(out), os.path.abspath(
        expand(args.data_root))                             # (checkpoints keep absolute paths)
    args.data = args.data if args.data in DATASETS else os.path.abspath(expand(args.data))
    return check_flags(p, args)


def saved_flags(p, path, ckpt, given):
    """The checkpoint's flags that were not typed, as they would be typed; checked as if typed."""
    argv = []
    for a in [a for a in p._actions if a.option_strings and a.dest not in {*OWN_FLAGS, *given}]:
        v, flag = ckpt["args"].get(a.dest), a.option_strings[0]
        if a.nargs == 0 and v is not None:                  # --flag, or --no-flag (wgan.py)
            check(type(v) is bool, f"{path}: its {flag} is {v!r}")
            argv += a.option_strings[:1] if v else a.option_strings[1:]
        elif v is not None:                                 # (=: a value may begin with -)
            many = a.nargs and isinstance(v, (list, tuple))
            argv += [flag, *map(str, v)] if many else [f"{flag}={v}"]
    error, p.error = p.error, lambda msg: fail(f"{path} holds a flag that would be refused: {msg}")
    try:
        check_flags(p, p.parse_args(argv))
    finally:
        p.error = error
    return argv


def check_flags(p, args):
    """Every value, typed or a checkpoint's: finite numbers, counts within their limits."""
    top = dict.fromkeys(("steps", "latent_dim", "log_every", "sample_every", "ckpt_every",
                         "eval_samples"), 2 ** 31) | {"batch_size": 65536}  # (eval_samples: >= 10)
    bad = [f"--{k.replace('_', '-')} must be in 1..{n:,}, got {getattr(args, k):,}"
           for k, n in top.items() if not 0 < getattr(args, k) <= n] + [
        f"{a.option_strings[0]} must be a finite number, got {getattr(args, a.dest)}"
        for a in p._actions if a.type is float and not np.isfinite(getattr(args, a.dest)).all()]
    bad += [m for ok, m in ((0 <= args.seed < 2 ** 63, "--seed must be in 0..2^63-1"), (
        args.eval_samples >= 10, f"--eval-samples must be at least 10, got {args.eval_samples}"), (
        min(args.keep_every, args.eval_every or 0) >= 0, "--keep-every, --eval-every must be >= 0"),
        (0 <= args.ema < 1, "--ema must lie in [0, 1)"), (args.lr > 0, "--lr must be positive"),
        (all(0 <= b < 1 for b in args.betas), "--betas must lie in [0, 1)")) if not ok]
    p.error(bad[0]) if bad else None                        # (a checkpoint's: said as its)
    args.betas = tuple(args.betas)
    return args


def pick_device(name):
    if name == "auto":                                      # the first of cuda, mps, cpu
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() \
            else "cpu"
    check(name != "cuda" or torch.cuda.is_available(), "--device cuda, but CUDA is not available")
    check(name != "mps" or torch.backends.mps.is_available(), "--device mps, but no MPS here")
    torch.backends.cudnn.benchmark = True                   # CUDA: the fastest convolutions, once
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def expand(path):
    """A path with ~ expanded; one line for ~nosuchuser, or ~ without a home folder."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:
        fail(f"{path}: cannot expand ~ ({why(e)})")


def make_dir(out):
    """Create --out, or say in one line why not; returns the folders it made, innermost first."""
    made = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        check(os.access(out, os.W_OK), f"--out {out}: cannot write there")
    except OSError as e:
        fail(f"--out {out}: cannot write there ({why(e)})")
    return made


def locked(path):
    """The file at path, open and locked (fcntl; Windows: no lock), or None if another holds it."""
    f = open(path, "a")
    with suppress(ImportError):
        import fcntl
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:                             # (another's: the file is not ours)
            return f.close()
    return f


# %% Data
def load_data(args, device):
    """uint8 images (N, C, H, W), labels, class names, on the device if they fit (no DataLoader)."""
    images, labels, classes = (load_named if args.data in DATASETS else load_folder)(args, device)
    about = f", {len(classes)} classes: {', '.join(classes)}" if CONDITIONAL else ""
    print(f"data: {args.data}, {len(images)} images of {args.channels}x{args.img_size}x"
          f"{args.img_size}{about}")
    if device.type == "cuda" and images.numel() > torch.cuda.mem_get_info(device)[0] / 2:
        warn("the images fill over half of the free GPU memory; sampling them from host memory")
        images, device = images.pin_memory(), torch.device("cpu")
    labels = labels.to(device) if CONDITIONAL else None
    return {"images": images.to(device), "labels": labels, "classes": classes}


def sample_real(data, batch_size, device, with_labels=False):
    """Random training images as floats in [-1, 1] (tanh's range), indexed on the device."""
    idx = torch.randint(0, len(data["images"]), (batch_size,), device=data["images"].device)
    x = data["images"][idx].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return (x, data["labels"][idx].to(device)) if with_labels else x


def load_named(args, device="cpu"):
    """MNIST, Fashion-MNIST, CIFAR-10: IDX files where they lie (.gz, read-only too), else
    downloaded; offline, MNIST falls back to mnist-mini. Resized on `device`."""
    root = expand(args.data_root)
    images, labels = load_mini() if args.data == "mnist-mini" else read_idx(
        root / DATASETS[args.data] / "raw") or download(args, root)
    x = torch.from_numpy(images[:, None] if images.ndim == 3 else images)  # MNIST: add C
    args.channels, args.img_size = args.channels or x.shape[1], args.img_size or SMALL_IMG_SIZE \
        or x.shape[-1]
    x = torch.cat([fit(chunk.to(device), args.channels, args.img_size) for chunk in x.split(8192)])
    classes = CLASSES.get(args.data, "0,1,2,3,4,5,6,7,8,9").split(",")
    check(0 <= labels.min() and labels.max() < len(classes), f"{args.data}: labels outside "
          f"0..{len(classes) - 1} under {root}; delete its files to download them again")
    return x, torch.from_numpy(labels).long(), classes


def fit(x, channels, size):
    """uint8 (N, C, H, W) to `channels` (grey repeated, colour to luminance) and size x size."""
    x = x.float()
    if x.shape[1] != channels:
        x = x.expand(-1, 3, -1, -1) if channels == 3 else TF.rgb_to_grayscale(x)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def read_idx(raw):
    """MNIST's IDX files: 0, 0, 0x08 (bytes), the number of dims, big-endian sizes, the data."""
    arrays = []
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        path = next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            check(not arrays, f"{raw} holds the images but no {stem}")
            return None
        try:
            b = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
            shape = struct.unpack(f">{b[3]}I", b[4:4 + 4 * b[3]])
            arrays.append(np.frombuffer(b, np.uint8, offset=4 + 4 * b[3]).reshape(shape).copy())
            check(b[:3] == b"\0\0\x08" and shape[0] > 0, f"{path} is not an IDX file of bytes")
        except Exception as e:                              # not gzip, truncated, ...
            fail(f"{path} is not a complete IDX file ({why(e)}); delete it to download it again")
    check(len(arrays[0]) == len(arrays[1]),
          f"{raw}: fewer labels than images; delete both files to download them again")
    return arrays


def download(args, root):
    made = [d for d in (root / DATASETS[args.data], root, *root.parents) if not d.exists()]
    try:
        ds = getattr(torchvision.datasets, DATASETS[args.data])(root, train=True, download=True)
        images = np.asarray(ds.data)
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images  # NHWC to NCHW
        return images, np.asarray(ds.targets)
    except Exception as e:                                  # offline, a proxy, a read-only root
        shutil.rmtree(made[-1], ignore_errors=True) if made else None  # no empty folder left
        said = f"{DATASETS[args.data]} is not under {root} and could not be downloaded ({why(e)})"
        check(args.data == "mnist", said)
        args.data = "mnist-mini"                            # what it trains on, said as such
        return load_mini(said)


def load_mini(offline=""):
    """data/mnist-mini.npz: MNIST's first 10,000 images (offline: why --data mnist could not be)."""
    here = [Path(__file__).resolve().parent] if "__file__" in globals() else []  # not in notebooks
    for path in [folder / "data" / "mnist-mini.npz" for folder in here + [Path.cwd()]]:
        if path.is_file():
            if offline:
                warn(f"{offline}; training on the bundled 10,000-image subset (--data mnist-mini)")
            with np.load(path) as f:
                return f["images"], f["labels"]
    call = 'main(["--data", "/path/to/images"])' if NOTEBOOK else "--data PATH"
    fail(f"{offline or 'no MNIST'}, and the bundled data/mnist-mini.npz is not next to {SCRIPT}; "
         f"train on your own images: {call}")


def load_folder(args, device=None):
    """Every image under the folder (through links; not hidden, nor a run's), resized and
    cropped, decoded once. cgan.py, acgan.py: each first-level subfolder is a class."""
    root = expand(args.data)
    check(root.exists(), f"--data {args.data}: no such folder, and not a dataset name "
                         f"({', '.join(DATASETS)})")
    check(root.is_dir() and not (root / ".lock").exists(), f"--data {args.data} is a file, or the "
          f"folder of a run or of --generate (not read as data); give the folder of the images")
    args.img_size, args.channels = args.img_size or PHOTO_IMG_SIZE, args.channels or 3
    files, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        new = os.path.realpath(folder) not in seen and ".lock" not in names  # (not a run's)
        seen.add(os.path.realpath(folder))
        dirs[:] = [d for d in dirs if d[0] != "." and new]
        files += [Path(folder, n) for n in names if new and n[0] != "." and n.lower().endswith(
            IMAGE_EXTS)]
    outside = {f for f in files if CONDITIONAL and f.parent == root}  # (cgan, acgan: in no class)
    files = sorted(set(files) - outside)
    check(files, f"no images ({' '.join(IMAGE_EXTS)}) under {root}" + CONDITIONAL * (
        f" in class subfolders (e.g. {root}/cat/*.jpg, {root}/dog/*.jpg)"))
    images, bad, first = decode_folder(root, files, args.img_size, args.channels)
    if bad:
        warn(f"skipped {len(bad)} of {len(files)} images that could not be read (first: {first})")
    if not CONDITIONAL:
        return torch.from_numpy(images), None, None
    kept = [f.relative_to(root).parts[0] for i, f in enumerate(files) if i not in bad]
    classes = sorted(set(kept))
    check(len(classes) > 1, f"{SCRIPT} needs the images in one subfolder per class, at least two, "
                            f"under {root} (e.g. {root}/cat/*.jpg, {root}/dog/*.jpg)")
    others = {d.name for d in root.iterdir() if d.is_dir() and d.name[0] != "."} - set(classes)
    if others or outside:
        warn(f"not used: {len(outside)} images outside class subfolders; the subfolders "
             f"without readable images: {', '.join(sorted(others)) or 'none'}")
    return torch.from_numpy(images), torch.tensor([classes.index(c) for c in kept]), classes


def decode_folder(root, files, size, channels):
    """The files decoded once (threads) into one array, or read from the cache outside the folder
    (keyed by the files' names, sizes, times): the readable images, the others, why the first."""
    try:
        key = digest([(str(f.relative_to(root)), s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                      for f in files for s in [f.stat()]])  # (ctime: a write, mtime kept or not)
    except OSError as e:                                    # (a file gone meanwhile)
        fail(f"{root} changed while it was read ({why(e)}); run again")
    name = f"{root.resolve().name}-{digest(root.resolve())}-{size}px-{channels}ch.npz"
    cache = cache_dir() / name
    try:
        with np.load(cache) as f:
            if str(f["key"]) == key:                        # (each f[...] reads the file: once)
                images, bad, first = f["images"], set(f["bad"].tolist()), str(f["first"])
                print(f"data: {len(images)} images from the decode cache {cache}")
                return images, bad, first
    except (FileNotFoundError, NotADirectoryError):
        pass
    except Exception as e:                                  # cut short, or not a cache at all
        warn(f"the decode cache {cache} is damaged ({why(e)}); decoding again")
    images, bad, first = np.empty((len(files), channels, size, size), np.uint8), [], ""
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a skipped image
        for i, image in enumerate(pool.map(decode_image, files, itertools.repeat(size),
                                           itertools.repeat(channels))):
            if isinstance(image, str):                      # why it could not be read
                bad, first = bad + [i], first or image
            else:                                           # the readable ones, in order
                images[i - len(bad)] = image
    check(len(bad) < len(files), f"none of the {len(files)} images under {root} is readable: "
                                 f"{first}")
    write_cache(cache, images=images[:len(files) - len(bad)], key=key, bad=bad, first=first)
    return images[:len(files) - len(bad)], set(bad), first


def write_cache(cache, **arrays):
    """The decode cache, written atomically; a killed run's temporary file goes after an hour."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomically(cache, write)
        for old in cache.parent.glob(f".{cache.name}.*.tmp"):
            old.unlink() if time.time() - old.stat().st_mtime > 3600 else None
        print(f"data: decoded once, cached at {cache}")
    except OSError as e:
        warn(f"could not write the decode cache {cache} ({why(e)}); the next run decodes again")


def decode_image(path, size, channels):
    """One file -> uint8 (C, H, W), or why it cannot be read (it is then skipped)."""
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))                   # JPEG: decode at a smaller scale
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):                    # 16-bit grey: to 8 bits, not clipped
                img = Image.fromarray((np.asarray(img) / 257).round().clip(0, 255).astype(np.uint8))
            img = TF.center_crop(TF.resize(img.convert(mode), size), size)  # short side, centre
            return np.asarray(img, np.uint8).reshape(size, size, -1).transpose(2, 0, 1)
    except Exception as e:                                  # truncated, not an image, ...
        return f"{path.name}: {why(e)}"


def digest(value):
    return hashlib.sha1(repr(value).encode()).hexdigest()[:12]


def cache_dir():
    return expand(os.environ.get("GAN_CACHE_DIR") or "~/.cache/gan-scripts")


# %% Checkpoints: load, save (with the random streams of every process), restore
def load_checkpoint(path):
    """A checkpoint of this script, loaded safely (tensors and plain data only)."""
    check(path.is_file(), f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a checkpoint that can be loaded safely ({why(e)})")
    check(isinstance(ckpt, dict) and "script" in ckpt, f"{path} is not a checkpoint of this repo")
    check(ckpt["script"] == SCRIPT, f"{path} was written by {ckpt['script']}, not by {SCRIPT}")
    names = ckpt.get("classes")                             # cgan.py, acgan.py: the classes
    whole = {"args": isinstance(ckpt.get("args"), dict), "step": type(ckpt.get("step")) is int
             and ckpt["step"] >= 0, "classes": not CONDITIONAL or isinstance(names, list)
             and len(names) > 0 and all(type(c) is str for c in names)}
    lost = [k for k in CKPT_KEYS if k not in ckpt] or [k for k, ok in whole.items() if not ok]
    check(not lost, f"{path} is not a whole checkpoint (edited by hand?): {', '.join(lost)}")
    return ckpt


def load_state(obj, state, name, differ=""):
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"the checkpoint's {name} does not fit this model ({why(e)}); typed otherwise: "
             f"{differ or 'a flag that shapes it (--spectral-norm, a width)?'}")


def saved_G(args):
    """--generate, --eval: the device, and the checkpoint's G (its EMA, if saved) in eval mode."""
    device, ckpt = pick_device(args.device), args.checkpoint[1]
    G = build_models(args)[0].to(device).eval()
    load_state(G, ckpt.get("G_ema", ckpt["G"]), "G")
    return device, G


def save_checkpoint(run, *paths):
    """A plain dict (CKPT_KEYS), written atomically by rank 0 alone, only if it is all finite."""
    tensors = [t for k in "GD" for t in run.nets[k].state_dict().values()]
    tensors += [t for k in ("opt_G", "opt_D") for state in run.nets[k].state.values()
                for t in state.values() if torch.is_tensor(t)]
    if not torch.stack([t.isfinite().all() for t in tensors if t.is_floating_point()]).all():
        run.meter.check("a weight or an optimizer's state", run.step)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if run.cuda else []}
    if run.world > 1:                                       # every process's stream, for --resume
        ranks = [None] * run.world
        dist.all_gather_object(ranks, rng)
        rng = {**rng, "ranks": ranks}
    state = {k: v.state_dict() for k, v in run.nets.items()}
    state.update(script=SCRIPT, step=run.step, args=vars(run.args), fixed_noise=run.fixed[0],
                 rng=rng)
    if CONDITIONAL:
        state.update(fixed_labels=run.fixed[1], classes=run.data["classes"])
    for path in paths if run.rank == 0 else []:
        try:
            atomically(path, lambda tmp: torch.save(state, tmp))
        except (OSError, RuntimeError) as e:                # (a full disk: RuntimeError in torch)
            fail(f"could not write {path}, is the disk full? ({why(e)}); the last checkpoint is "
                 f"kept")
    if run.world > 1:             # the others wait for the files. The handle outlives close():
        run.saved = dist.barrier(async_op=True)     # torch < 2.8 can hang destroying the group
        run.saved.wait()          # if gloo's threads still hold a collective's tensors then
    run.last_good = paths[0]


def atomically(path, write):
    """write(a temporary file), then a rename: a crash or a full disk never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def restore_checkpoint(run, ckpt):
    """Models, optimizers (with this run's --lr and --betas), fixed noise, step, random streams."""
    for name, obj in run.nets.items():
        groups = [{k: v for k, v in g.items() if k != "params"} for g in getattr(obj,
                                                                                "param_groups", [])]
        load_state(obj, ckpt.get(name, ckpt["G"]), name)    # (G_ema: G's, if not saved)
        for group, flags in zip(getattr(obj, "param_groups", []), groups):
            group.update(flags)                             # (an optimizer's: lr, betas, ...)
    fixed = tuple(t.to(run.device) for t in (ckpt["fixed_noise"],
                                             ckpt.get("fixed_labels"))[:len(run.fixed)])
    check([t.shape for t in fixed] == [t.shape for t in run.fixed], "its fixed noise has the "
          "wrong shape")
    for opt in (run.nets["opt_G"], run.nets["opt_D"]):  # moments of the parameters' own shapes
        check(all(t.shape == p.shape for g in opt.param_groups for p in g["params"]
                  for t in opt.state.get(p, {}).values() if t.dim()), "an optimizer's state does "
              "not fit its parameters")
    run.fixed, streams = fixed, ckpt["rng"].get("ranks", [ckpt["rng"]])  # a stream per process
    launch = f"torchrun --nproc_per_node={len(streams)}" if len(streams) > 1 else "python"
    check(len(streams) == run.world, f"the checkpoint was written by {len(streams)} processes; "
          f"resume it with as many ({launch})")
    torch.set_rng_state(streams[run.rank]["cpu"].cpu())
    if run.cuda and streams[run.rank]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in streams[run.rank]["cuda"]])
    run.step = ckpt["step"]
    print(f"resumed from step {run.step}")


# %% --generate, pictures, D without BatchNorm
def generate(args):
    """--generate N: <index>.png (cgan, acgan: <label>_<index>.png, the classes in turn, or
    --label) of the checkpoint's G, in a locked folder holding none of these names."""
    device, G = saved_G(args)
    n, label = len(args.checkpoint[1].get("classes") or [0]), getattr(args, "label", None)
    check(label is None or 0 <= label < n, f"--label must be in 0..{n - 1}")
    names = [f"{i % n if label is None else label}_{i:06d}.png" if CONDITIONAL else f"{i:06d}.png"
             for i in range(args.generate)]
    with closing(Folder(expand(args.out))) as folder:
        folder.take()
        taken = next((name for name in names if (folder.path / name).exists()), None)
        check(taken is None, f"{folder.path} holds {taken} already; give a folder without such "
                             f"names, e.g. --out {free(folder.path)}")
        folder.ours = True
        torch.manual_seed(args.seed)
        images = (image for batch in samples_of(G, args, device, n, label) for image in batch)
        for name, image in zip(names, images):
            save_grid(image, folder.path / name)
    print(f"wrote {args.generate} images to {folder.path}")


def samples_of(G, args, device, classes=1, label=None, n=None, generator=None):
    """n (default: --generate) images of G, 256 at a time, the classes in turn (or all `label`)."""
    for first in range(0, n or args.generate, 256):
        y = torch.arange(first, min(first + 256, n or args.generate), device=device)
        y = y % classes if label is None else torch.full_like(y, label)
        z = torch.randn(len(y), args.latent_dim, generator=generator, device=device)
        with torch.no_grad():
            yield G(z, y) if CONDITIONAL else G(z)


def free(path):
    """A name beside path that nothing has: path-2, path-3, ..."""
    return next(p for k in itertools.count(2) if not (p := Path(f"{path}-{k}")).exists())


def save_grid(images, path):
    """Images in [-1, 1] as one PNG, 8 to a row (torchvision's make_grid), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomically(path, lambda tmp: save_image(images.float(), tmp, "png", nrow=8, padding=2,
                                            normalize=True, value_range=(-1, 1)))


def without_batchnorm(net):
    """Every BatchNorm of net replaced by nothing, no bias added (docs/long-runs.md)."""
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i, layer in enumerate(seq):
            seq[i] = nn.Identity() if isinstance(layer, nn.modules.batchnorm._BatchNorm) else layer
    return net


def spectral_norm_(D):
    """--spectral-norm (Miyato et al. 2018): every conv and linear layer of D divided by its
    largest singular value (D stays 1-Lipschitz); no BatchNorm in D, as in the paper."""
    for layer in list(without_batchnorm(D).modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(layer)
    return D


# %% The run's folder: its lock, which run may write there, its pictures and logs
class Folder:
    """--out, locked before anything slow: one run a folder (which only its continuation may
    write). Under torchrun rank 0 alone writes."""

    def __init__(self, path):
        self.path, self.lock, self.made, self.ours = path, None, [], False

    def take(self):
        """Create and lock the folder; once ours, its .lock stays (the scan of --data skips it)."""
        self.made, self.new = make_dir(self.path), not (self.path / ".lock").exists()
        self.lock = locked(self.path / ".lock")             # (another run's: close() keeps it)
        check(self.lock, f"another run is writing to {self.path}; wait for it, or another --out")
        for tmp in self.path.glob(".*.tmp"):                # no one else writes here: a killed
            tmp.unlink(missing_ok=True)                     # save's temporary file

    def claim(self, data, resumed, step, typed=False):
        """Take the folder if this run may write there (it holds no run, or `resumed` is its
        last.pt); never --data's images, nor a folder around them."""
        out, images = self.path.resolve(), data not in DATASETS and Path(data).resolve()
        check(not images or not images.is_relative_to(out) and not (
            out.is_relative_to(images) and out.is_dir() and not (out / ".lock").exists() and any(
                f.suffix.lower() in IMAGE_EXTS for f in out.rglob("*"))),
              f"--out {self.path} is, holds or is among the images of --data; give another --out")
        self.take()
        last = self.path / "last.pt"
        snaps = sorted(self.path.glob("step_*.pt"), key=lambda p: (len(p.name), p.name))  # by step
        theirs = typed and last.exists() and not resumed and saved_args(last).get("data")
        check(resumed or not last.exists(), f"{self.path} holds a run already: " + (
            "add --resume to continue it, or give another --out" if not theirs or origin(theirs)
            == origin(data) else f"on {theirs}; give another --out, e.g. --out {free(self.path)}"))
        check(resumed or not snaps, f"{self.path} holds a run's snapshots: continue the last with "
                                    f"--resume {snaps and snaps[-1]} --out NEW, or another --out")
        check(not (last.exists() or snaps) or not resumed or resumed.resolve() == last.resolve(),
              f"{self.path} holds another run; continuing {resumed} there would replace its "
              f"checkpoints: give a new folder, e.g. --out {self.path}-from-{step}")
        self.ours = True

    def picture(self, images, name):
        self.write(name, save_grid, images, self.path / name)

    def append(self, name, *rows):
        """Rows added to a CSV file whole, or not at all (a full disk: the file is cut back)."""
        def add():
            text = io.StringIO()
            csv.writer(text).writerows(rows)
            with open(self.path / name, "ab", buffering=0) as f:
                size, data = f.seek(0, os.SEEK_END), text.getvalue().encode()
                try:
                    if f.write(data) != len(data):
                        raise OSError(errno.ENOSPC, "the row was written in part")
                except OSError:
                    f.truncate(size)
                    raise
        self.write(name, add)

    def write(self, name, how, *args):
        """The pictures and logs: one that cannot be written never stops the run."""
        try:
            how(*args) if self.lock else None
        except OSError as e:
            warn(f"could not write {self.path / name} ({why(e)}); training goes on")

    def close(self):
        if self.lock:
            self.lock.close()                               # frees the lock
            with suppress(OSError):                         # a refused run leaves nothing
                if [p.name for p in self.path.iterdir()] == [".lock"] or self.new and not self.ours:
                    (self.path / ".lock").unlink()
                    for folder in self.made:
                        folder.rmdir()


def read_rows(folder, name, step):
    """--resume: a CSV's rows up to the step; later and damaged ones dropped (a damaged file kept
    as NAME.damaged). Step 0: a new file."""
    path, rows, lines = folder.path / name, [], [[]]
    with suppress(OSError, ValueError), open(path, newline="", errors="replace") as f:
        lines = list(csv.reader(f)) if step else [[]]       # (none yet; a folder in its place)
    for line in lines[1:]:
        with suppress(ValueError, IndexError):              # an empty cell, a blank line
            rows.append([int(line[0]), *map(float, line[1:])])
    damaged = len(rows) < len(lines) - 1 or any(len(r) != len(lines[0]) for r in rows)
    rows = [r for r in rows if len(r) == len(lines[0]) and r[0] <= step]
    text = "".join(",".join(map(str, row)) + "\n" for row in [lines[0], *rows])
    with suppress(OSError):
        if folder.lock and (len(rows) < len(lines) - 1 or not step):  # (torchrun: rank 0's)
            shutil.copyfile(path, f"{path}.damaged") if damaged else None
            atomically(path, lambda tmp: tmp.write_text(text)) if rows else path.unlink()
    return (lines[0] if rows else []), rows                # (no rows: a new file, a header)


def origin(data):
    """The data a run trains on, comparable: a dataset's name, or a folder's real path."""
    return data if data in DATASETS or data is None else str(Path(data).resolve())


def saved_args(path):
    """The flags a checkpoint holds, or {} if it cannot be read."""
    with suppress(Exception):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"]
    return {}


def plot(rows, header, path, last=-1, W=800, H=420, pad=60):
    """A CSV's columns 1..last as lines over its steps (PIL: no plotting package is needed)."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x0, x1 = rows[0][0], max(rows[-1][0], rows[0][0] + 1)
    series = [[r[i] for r in rows] for i in range(1, len(header))[:last]]
    lo, hi = min(map(min, series)), max(map(max, series))
    hi = hi if hi > lo else lo + 1
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    labels = {f"step {x0:.0f}": (pad, H - pad + 8), f"step {x1:.0f}": (W - pad - 70, H - pad + 8),
              f"{hi:.3g}": (4, pad - 6), f"{lo:.3g}": (4, H - pad - 6), str(path): (pad, 10)}
    for text, xy in labels.items():
        draw.text(xy, text, fill="black")
    for i, values in enumerate(series):
        colour = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")[i % 6]
        xy = [(pad + (r[0] - x0) / (x1 - x0) * (W - 2 * pad),
               H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)) for r, v in zip(rows, values)]
        draw.line(xy, fill=colour, width=2)
        draw.text((pad + 10 + 110 * i, pad - 20), header[i + 1], fill=colour)
    img.save(path)


# %% The meter: each step's numbers, summed on the device until a log line
class Meter:
    """Each step's numbers summed on the device (no host sync), the first NaN/inf step kept; at a
    log line (torchrun: all processes agree) a log.csv row and the progress line."""

    def __init__(self, run):
        self.run, self.sums, self.images, self.t0 = run, None, 0, time.time()
        self.header, self.rows = read_rows(run.folder, "log.csv", run.step)

    def add(self, stats, step, images):
        values = torch.stack([v.detach().float().reshape(()) for v in stats.values()])
        if self.sums is None:
            self.names, self.sums, self.count = list(stats), torch.zeros_like(values), 0
            self.bad_step = torch.full((), -1, device=values.device)
        self.sums += values
        self.count, self.images = self.count + 1, self.images + images
        ok = torch.isfinite(values).all() | (self.bad_step >= 0)
        self.bad_step = torch.where(ok, self.bad_step, step)

    def check(self, what="a loss", step=None):
        step, kept = step or self.bad_step.item(), self.run.last_good
        kept = f"the last good checkpoint: {kept}" if kept else "no checkpoint"
        check(step < 0, f"{what} became NaN/inf at step {step}; stopping ({kept}); lower --lr?")

    def eta(self, step, total):
        """After this process's first step, at once: the time left (a CPU: what takes an hour)."""
        self.sums.sum().item()                              # (the device's work done)
        each = (time.time() - self.t0) / self.count
        hint = "" if self.run.cuda or each * (total - step) < 3600 else (
            f"; in an hour: --steps {step + int(3600 / each)}, or half the --img-size (4x faster)")
        print(f"[{step}/{total}] first step {each:.1f} s | {hms(each * (total - step))} left"
              f"{hint}", flush=True)

    def line(self, step, total, stop):
        """The log line at `step`: returns its means and the stop that every process agrees on."""
        run = self.run
        if run.world > 1:
            dist.all_reduce(self.sums)
            self.sums /= run.world
            agreed = torch.stack([self.bad_step.float(), self.sums.new_tensor(float(stop))])
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            self.bad_step, stop = agreed[0].long(), int(agreed[1])
        self.check()
        means = dict(zip(self.names, (self.sums / self.count).tolist()))
        dt, ips = time.time() - self.t0, self.images * run.world / max(time.time() - self.t0, 1e-9)
        row, header = [step, *(float(f"{v:.5g}") for v in means.values()), round(ips)], [
            "step", *means, "img_per_s"]
        run.folder.append("log.csv", *[header] * (header != self.header), row)  # (row by row)
        self.header, self.rows = header, [r for r in self.rows if len(r) == len(row)] + [row]
        print(f"[{step:>{len(str(total))}}/{total}] "
              f"{' '.join(f'{k} {v:.3f}' for k, v in means.items())} | {ips:,.0f} img/s | "
              f"{hms((total - step) * dt / self.count)} left", flush=True)
        self.sums.zero_()
        self.count, self.images, self.t0 = 0, 0, time.time()
        return means, stop


# %% When training is failing (docs/long-runs.md): the script's sign, or FID risen from its best
class FailingRule:
    """Training is failing: failing()'s sign in FAILING_LINES log lines in a row (once a time)."""
    QUIET_STEPS, QUIET_SHARE = 1000, 0.1   # not judged: the first 1000 steps or tenth of a run
    FAILING_LINES, HEALTHY_LINES = 5, 20
    bad = good = warned = 0                # failing and healthy lines in a row; said this episode

    def __call__(self, means, step, args):                 # the sign, when the warning is due
        quiet = step <= min(self.QUIET_STEPS, args.steps * self.QUIET_SHARE)
        sign = None if quiet else failing(means, args)
        self.bad, self.good = (self.bad + 1, 0) if sign else (0, self.good + 1)
        self.warned = self.warned and self.good < self.HEALTHY_LINES
        if self.bad >= self.FAILING_LINES and not self.warned:
            self.warned = True
            return sign


# %% Quality: FID, KID, precision and recall (torch-fidelity), metrics.csv, best.pt
class Judge:
    """G judged (README: Quality): torch-fidelity's FID, KID, precision, recall of --eval-samples
    images against up to 50,000 training images; its own random stream (training unchanged)."""
    RISE, TIMES = 1.25, 2                  # failing: FID 25% over its best at two in a row
    HEADER = ["step", "fid", "kid", "kid_std", "precision", "recall", "samples", "seconds"]

    def __init__(self, args, data, device, folder=None, step=0, every=0):
        self.args, self.device, self.folder, self.worse, self.every = args, device, folder, 0, every
        self.classes, self.fidelity = len(data["classes"] or [0]), fidelity(args, device)
        self.rows = folder and read_rows(folder, "metrics.csv", step)[1] or []
        self.best = min([(r[1], r[0]) for r in self.rows], default=(float("inf"), 0))  # (FID, step)
        if isinstance(self.fidelity, str):                  # why not: a run trains on, --eval stops
            self.fidelity = (warn if folder else fail)(self.fidelity)
            return
        pick = torch.randperm(len(data["images"]), generator=torch.Generator().manual_seed(0))
        real = data["images"][pick[:50000].to(data["images"].device)]  # (real.png's first 64)
        self.real = self.fidelity[1].utils.cache_lookup_one_recompute_on_miss(  # computed once
            f"{real.shape}-{digest(real[:256].cpu().numpy().tobytes())}-{args.eval_features}",
            lambda: self.features(real), cache_root=str(cache_dir()), verbose=False)

    def features(self, images):
        """uint8 images (N, C, H, W), 256 at a time -> the extractor's features (N, D)."""
        with torch.no_grad():
            return torch.cat([self.fidelity[0](x.to(self.device, torch.uint8).expand(-1, 3, -1, -1))
                              [0].double().cpu() for x in images.split(256)])

    def __call__(self, G, step=None):
        """The figures for G; in a run also metrics.csv, fid.png, the progress line, and
        (whether this is the best FID so far, the failing sign or None)."""
        args, tf, t0, n = self.args, self.fidelity[1], time.time(), self.args.eval_samples
        g = torch.Generator(self.device).manual_seed(args.seed)
        fake = torch.cat([self.features(x.float().add(1).mul(127.5).round().clamp(0, 255)) for x
                          in samples_of(G, args, self.device, self.classes, n=n, generator=g)])
        kw = dict(verbose=False, save_cpu_ram=True, prc_batch_size=1000, prc_neighborhood=min(
            3, len(self.real) - 1), kid_subset_size=min(1000, n, len(self.real)))  # (few images)
        fid = tf.metric_fid.fid_statistics_to_metric(*[tf.metric_fid.fid_features_to_statistics(
            f) for f in (fake, self.real)], False)["frechet_inception_distance"]
        kid = tf.metric_kid.kid_features_to_metric(fake, self.real, **kw).values()
        prc = tf.metric_prc.prc_features_to_metric(fake, self.real[:n], **kw)  # as many a side
        m = dict(zip(self.HEADER[1:], (fid, *kid, prc["precision"], prc["recall"], n,
                                       round(time.time() - t0, 1))))
        if step is None:
            return m
        best, self.rows = fid < self.best[0], self.rows + [[step, *m.values()]]
        self.best = (fid, step) if best else self.best
        self.worse = self.worse + 1 if fid >= self.RISE * self.best[0] else 0
        self.folder.append("metrics.csv", *[self.HEADER] * (len(self.rows) == 1), self.rows[-1])
        self.folder.write("fid.png", plot, self.rows, self.HEADER, self.folder.path / "fid.png", 1)
        print(f"[{step}/{args.steps}] FID {fid:.4g} KID {m['kid']:.4f} P {m['precision']:.2f} R "
              f"{m['recall']:.2f}" + " (best)" * best, flush=True)
        return best, self.worse == self.TIMES and (f"FID rose from {self.best[0]:.4g} (step "
                                                   f"{self.best[1]}, best.pt) to {fid:.4g}")

    def said(self):
        return self.rows and (f"; best: FID {self.best[0]:.4g} at step {self.best[1]}, "
                              f"{self.folder.path / 'best.pt'}")


def fidelity(args, device):
    """torch-fidelity (imported only now) and its feature extractor; or why not, in one line."""
    try:
        import torch_fidelity as tf
        layer = tf.registry.FEATURE_EXTRACTORS_REGISTRY[args.eval_features]
        with torch.random.fork_rng([device] if device.type == "cuda" else []), \
                redirect_stderr(io.StringIO()):             # (torch's "Downloading" line)
            return tf.utils.create_feature_extractor(
                args.eval_features, [layer.get_default_feature_layer_for_metric("fid")],
                cuda=device.type == "cuda", feature_extractor_weights_path=args.fid_weights,
                verbose=False), tf
    except ImportError:
        return "FID and the other figures need torch-fidelity: pip install torch-fidelity"
    except KeyError:
        return f"--eval-features {args.eval_features}: torch-fidelity has no such feature extractor"
    except Exception as e:                                  # offline, and no weights
        return (f"the weights of {args.eval_features} could not be had ({why(e)}): give "
                f"--fid-weights PATH, or put the file in {torch.hub.get_dir()}/checkpoints")


def judge_checkpoint(args):
    """--eval: one checkpoint's figures and how they were had, printed; writes only a cache."""
    device, G = saved_G(args)
    judge = Judge(args, load_data(args, device), device)
    m = judge(G)
    print(" ".join(f"{k} {v:.4g}" for k, v in m.items()))
    print(f"FID, {args.eval_features} (torch-fidelity), {m['samples']:,} samples vs "
          f"{len(judge.real):,} training images at {args.img_size}x{args.img_size}")


# %% Fast paths: bf16 autocast, torchrun's DDP, torch.compile, CUDA graphs (kernels/graphs.py)
def fast_paths(run, G, D):
    """--amp, torchrun's DDP, --compile, --cuda-graph: returns the modules the steps call."""
    args, cuda = run.args, run.cuda
    bf16 = cuda and torch.cuda.get_device_capability(run.device)[0] >= 8
    try:                                                    # (the repository's kernels/; a script
        from kernels.graphs import CudaGraphs               # pasted alone: eager steps)
    except ImportError:
        CudaGraphs = None
    graphs = args.cuda_graph and cuda and run.world == 1 and run.data["images"].is_cuda
    run.graphs = CudaGraphs(run, warn, fail) if graphs and CudaGraphs else None
    for said in [f"--{f.replace('_', '-')} is for CUDA; running without it on {run.device.type}"
                 for f in ("amp", "compile", "cuda_graph") if getattr(args, f) and not cuda] + [
            said for on, said in (
                (args.cuda_graph and cuda and not run.graphs, "--cuda-graph: not under torchrun, "
                 "nor with the images off the GPU, nor without kernels/; eager steps"),
                (args.compile and run.graphs, "--compile: not with --cuda-graph (one launch)"),
                (args.amp and cuda and not bf16, "--amp: no native bfloat16 on this GPU (a T4?); "
                 "float32")) if on]:
        print(said)
    run.autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=not run.graphs) if \
        args.amp and bf16 else nullcontext()
    if run.world > 1:                       # gradients averaged over the processes; BatchNorm
        with warnings.catch_warnings():     # statistics: each its own (torch 2.14 renames the flag)
            warnings.simplefilter("ignore", FutureWarning)
            G, D = (torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
                    for net in (G, D))
        print(f"{run.world} processes: batch {args.batch_size} each, "
              f"{args.batch_size * run.world} in all")
    compiled = args.compile and cuda and not run.graphs
    return (torch.compile(G), torch.compile(D)) if compiled else (G, D)


# %% The loop: the steps, and after each one the EMA, the log, evaluations, grids, checkpoints
class Run:
    """What train() needs besides the paper: device, --out, data, --resume, the grids, the loop."""
    observers = []

    def __init__(self, args):
        self.args, self.step, self.stop, self.training, self.handlers = args, 0, 0, False, {}
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.last_good, self.ckpt = vars(args).pop("checkpoint", (None, None))  # --resume's
        self.folder = None
        try:
            self.open()
        except BaseException:
            self.close()
            raise

    def open(self):
        """Rank 0 (alone without torchrun) claims --out before anything slow and before the other
        processes join (they wait in init_process_group; a collective here can hang torch 2.4)."""
        args, self.device = self.args, pick_device(self.args.device)
        self.cuda = self.device.type == "cuda"
        self.folder, step = Folder(expand(args.out)), self.ckpt and self.ckpt["step"]
        if self.rank == 0:
            self.catch_signals()
            self.folder.claim(args.data, self.last_good, step, "data" in args.given)
        if self.world > 1:                                  # torchrun: a process per device
            if self.cuda:
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.cuda else "gloo")
            if self.rank:                                   # rank 0 alone prints
                sys.stdout = sys.stderr = open(os.devnull, "w")
                self.catch_signals()
        check(not self.ckpt or step < args.steps, f"the checkpoint is at step {step}; pass a "
                                                  f"larger --steps")
        fits(args, self.ckpt) if self.ckpt else None        # its models, before data is read
        torch.manual_seed(args.seed + self.rank)            # each process its own random stream
        self.data = load_data(args, self.device)
        same_data(args, self.ckpt, self.data)

    def catch_signals(self):
        for name in ("SIGINT", "SIGTERM", "SIGHUP")[:3 if hasattr(signal, "SIGHUP") else 2]:
            self.handlers[name] = signal.signal(getattr(signal, name), self.on_signal)

    def close(self):
        for name, handler in self.handlers.items():
            signal.signal(getattr(signal, name), handler)
        if self.folder:
            self.folder.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def on_signal(self, signum, frame):
        if signum == getattr(signal, "SIGHUP", None):       # the terminal is gone: print nowhere
            sys.stdout = sys.stderr = open(os.devnull, "w")
        if self.stop or not self.training:                  # before the loop, or a second time
            raise SystemExit(128 + signum)
        self.stop = 128 + signum                            # the shell's status: 130 Ctrl-C, 143
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              f"(again to quit at once)", flush=True)

    def start(self, G, D, opt_G, opt_D, fixed=None):
        """The models (--resume's state restored), real.png, the header; fixed: the grids' inputs.
        Returns G and D for the steps (DDP, compiled); checkpoints hold the plain modules."""
        args = self.args
        self.nets = {"G": G, "D": D, "opt_G": opt_G, "opt_D": opt_D}
        self.fixed = fixed or (torch.randn(64, args.latent_dim, device=self.device),)
        if args.ema:                                        # a copy of G, averaged after each step
            self.nets["G_ema"] = copy.deepcopy(G).eval().requires_grad_(False)
        try:
            restore_checkpoint(self, self.ckpt) if self.ckpt else None
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
            fail(f"{self.last_good} is damaged or was edited by hand ({why(e)})")
        sizes = ", ".join(f"{k} {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params"
                          for k, net in (("G", G), ("D", D)))
        print(f"{SCRIPT}: {self.device.type}, {sizes}, steps {self.step + 1}..{args.steps}, "
              f"batch {args.batch_size}, out {self.folder.path}")
        images = self.data["images"]
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:64]
        self.folder.picture(images[pick.to(images.device)] / 127.5 - 1, "real.png")
        self.meter, self.failing, self.batches, self.judge = Meter(self), FailingRule(), 0, \
            judging(self)
        return fast_paths(self, G, D)

    def real_batch(self):
        """A batch of real images (and their labels in cgan.py, acgan.py), counted for img/s."""
        self.batches += 1
        return sample_real(self.data, self.args.batch_size, self.device, with_labels=CONDITIONAL)

    def loop(self, step, key=None):
        """Every step to --steps: step() (the paper's, returning its numbers), then after_step();
        key(n): what else step() takes (wgan.py: the critic's updates)."""
        self.training, first = True, self.step + 1
        for self.step in range(first, self.args.steps + 1):
            self.batches, args = 0, (key(self.step),) if key else ()
            stats = self.graphs(step, args) if self.graphs else step(*args)
            self.meter.add(stats, self.step, self.batches * self.args.batch_size)
            for observe in self.observers:
                observe(self, stats)
            self.after_step()
            if self.step == first < self.args.steps and first % self.args.log_every:
                self.meter.eta(first, self.args.steps)      # (not at the first log line)
        print(f"done: samples in {self.folder.path / 'samples'}, checkpoint "
              f"{self.folder.path / 'last.pt'}{self.judge and self.judge.said() or ''}")

    def after_step(self):
        """In the order exact resume needs: the EMA, the log line (where torchrun agrees on a stop),
        an evaluation, the grid (G in eval mode), the checkpoints (random streams as they are)."""
        args, step, G, stop, sign, better = self.args, self.step, self.nets["G"], 0, None, False
        average_(self.nets["G_ema"], G, args.ema) if args.ema else None  # (--ema)
        last, sampler = step == args.steps, self.nets["G_ema"] if args.ema else G.eval()
        if step % args.log_every == 0 or last or self.world == 1 and self.stop:
            means, stop = self.meter.line(step, args.steps, self.stop)
            sign = self.failing(means, step, args)
        if self.judge and (step % self.judge.every == 0 or last):
            with torch.no_grad(), self.autocast:            # FID, KID, precision and recall
                better, risen = self.judge(sampler, step)
            sign = sign or risen
        if sign:
            warn(f"step {step}: training is failing: {sign}. Earlier snapshots are in "
                 f"{self.folder.path}/step_<N>.pt; docs/long-runs.md has the remedies")
            self.stop = stop = stop or (3 if args.stop_on_collapse else 0)
        if step % args.sample_every == 0 or last or stop:
            with torch.no_grad(), self.autocast:
                self.folder.picture(sampler(*self.fixed), f"samples/{step:06d}.png")
            if self.meter.rows:                             # log.csv's picture, with each grid
                self.folder.write("loss.png", plot, self.meter.rows, self.meter.header,
                                  self.folder.path / "loss.png")
        G.train()
        keep = args.keep_every or max(1, args.steps // 5)   # by default a run keeps five snapshots
        snapshots = [self.folder.path / f"step_{step:06d}.pt"] if step % keep == 0 else []
        if step % args.ckpt_every == 0 or last or stop or snapshots or better:
            self.meter.check()
            save_checkpoint(self, self.folder.path / "last.pt", *snapshots,
                            *[self.folder.path / "best.pt"] * better)
        if stop:                                            # 3: failing training; a signal
            print(f"stopped at step {step}; " + (f"training is failing; snapshots: "
                  f"{self.folder.path}/step_*.pt" if stop == 3 else f"continue with: "
                  f"{continue_command(self)}") + (self.judge and self.judge.said() or ""))
            raise SystemExit(stop)


def average_(G_ema, G, decay):
    """--ema, in place: G_ema = decay G_ema + (1 - decay) G; BatchNorm's statistics are G's."""
    with torch.no_grad():
        torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - decay)
        torch._foreach_copy_(list(G_ema.buffers()), list(G.buffers()))


def judging(run):
    """A judged run's Judge: --eval-every, by default each snapshot on CUDA, never elsewhere."""
    every = run.args.eval_every if run.args.eval_every is not None else run.cuda and (
        run.args.keep_every or max(1, run.args.steps // 5))
    judge = every and Judge(run.args, run.data, run.device, run.folder, run.step, every)
    return judge if judge and judge.fidelity else None


def fits(args, ckpt):
    """On --resume, before any data is read: the models fit, or one line names the flags typed."""
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()}
    differ = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (it has {saved[k]})"
                       for k in args.given if k in saved and saved[k] != getattr(args, k))
    for name, net in zip("GD", build_models(args)):
        load_state(net, ckpt[name], name, differ)


def same_data(args, ckpt, data):
    """--resume: the data it was trained on (folder or dataset, count, classes), or one line
    (--data typed: said, and trained on). Records the count."""
    n, saved, args.images = len(data["images"]), (ckpt or {"args": {}})["args"], len(data["images"])
    theirs = (ckpt or {}).get("classes", data["classes"])
    check(theirs == data["classes"], f"the checkpoint was trained on the classes "
          f"{', '.join(theirs or [])}; this data has {', '.join(data['classes'] or [])}")
    if ckpt and (origin(saved.get("data", args.data)), saved.get("images", n)) != (
            origin(args.data), n):
        said = (f"the run was trained on {saved.get('data')} ({saved.get('images', n):,} images); "
                f"this is {args.data} ({n:,} images)")
        check("data" in args.given, f"{said}: to train on it anyway, give --data {args.data}")
        print(f"{said}: training on it, as --data says")


def continue_command(run):
    """The checkpoint holds every flag: its folder and --resume (and --device, if given)."""
    flags = ["--out", str(run.folder.path), *["--device", run.args.device] * (
        "device" in run.args.given), "--resume"]
    launch = f"torchrun --nproc_per_node={run.world}" if run.world > 1 else "python"
    return f"main({flags})" if NOTEBOOK else f"{launch} {shlex.join([SCRIPT, *flags])}"


if __name__ == "__main__":
    main()
# %% End of the shared plumbing ===================================================================
