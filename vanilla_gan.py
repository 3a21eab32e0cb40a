"""Vanilla GAN: Goodfellow et al. 2014, "Generative Adversarial Nets" (arXiv:1406.2661).

Two multilayer perceptrons play a minimax game on V(D, G):

    min_G max_D  V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]

D is a real/fake classifier trained with binary cross-entropy; for the generator the paper
suggests the "non-saturating" loss: maximise log D(G(z)) instead of minimising log(1 - D(G(z))),
which gives G strong gradients early on, when D rejects its samples easily. As in the study notes,
training alternates a few D batches with one or two G batches (--d-steps, --g-steps).

    python vanilla_gan.py                            # MNIST at 28x28
    python vanilla_gan.py --data ./my_images --img-size 32
    python vanilla_gan.py --resume
    python vanilla_gan.py --generate 100 --ckpt runs/vanilla_gan/last.pt
"""
# %% Imports
import math

import torch
import torch.nn as nn

SCRIPT, CONDITIONAL = "vanilla_gan.py", False  # the name checkpoints carry; no class labels
SMALL_IMG_SIZE, PHOTO_IMG_SIZE = None, 64      # default sizes: MNIST's own 28 px; photo folders


# %% Flags
def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam betas")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10000, help="generator updates")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z")
    p.add_argument("--hidden", type=int, default=256, help="G's first hidden width (then 2x, 4x)")
    p.add_argument("--d-steps", type=int, default=1, help="D batches per round (the paper's k)")
    p.add_argument("--g-steps", type=int, default=1, help="G batches per round")
    p.add_argument("--spectral-norm", action="store_true",
                   help="spectral normalisation in D (README: Long runs)")
    args = parse(p, argv)
    check(args.img_size is None or 8 <= args.img_size <= 512, "--img-size must be in 8..512")
    check(0 < args.hidden <= 65536, f"--hidden must be in 1..65536, got {args.hidden}")
    check(args.d_steps >= 1 and args.g_steps >= 1, "--d-steps and --g-steps must be positive")
    check(args.batch_size >= 2, "--batch-size must be at least 2 (G's BatchNorm needs two samples)")
    return args


# %% Models
class Generator(nn.Module):
    """A multilayer perceptron, LeakyReLU(0.2) between layers:

        z                 latent_dim
        -> hidden         (no BatchNorm on the first layer)
        -> 2 hidden       BatchNorm
        -> 4 hidden       BatchNorm
        -> C*H*W pixels   tanh, in [-1, 1], viewed as C x H x W

    BatchNorm on the two wider layers, as in the widely used PyTorch-GAN gan.py: on MNIST it made
    the ten digits appear more evenly and recognisably at the same step than the notes' plain MLP
    (README, Results). G runs in eval mode (running statistics) for sample grids and --generate."""

    def __init__(self, latent_dim, channels, img_size, hidden):
        super().__init__()
        self.shape = (channels, img_size, img_size)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(hidden, 2 * hidden), nn.BatchNorm1d(2 * hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(2 * hidden, 4 * hidden), nn.BatchNorm1d(4 * hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(4 * hidden, math.prod(self.shape)), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z).view(z.size(0), *self.shape)


class Discriminator(nn.Module):
    """The mirror image, without BatchNorm:

        x                 C x H x W, flattened to C*H*W
        -> 2 hidden       LeakyReLU(0.2)
        -> hidden         LeakyReLU(0.2)
        -> 1 logit        D(x) = sigmoid(logit), inside BCEWithLogitsLoss (log D stably)
    """

    def __init__(self, channels, img_size, hidden):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * img_size * img_size, 2 * hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(2 * hidden, hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(hidden, 1),
        )

    def forward(self, x):
        return self.net(x).view(-1)


def build_models(args):
    G = Generator(args.latent_dim, args.channels, args.img_size, args.hidden)
    D = Discriminator(args.channels, args.img_size, args.hidden)
    if args.spectral_norm:                    # the remedy for long runs (README, Long runs)
        spectral_norm_(D)
    return G, D


# %% When training has failed (README, Long runs): the sign in one log interval's means
def failing(m, args):
    """D tells real from fake almost perfectly: G's loss climbs, its samples stop improving."""
    if m["D_x"] > 0.95 and m["D_G_z"] < 0.05:
        return "D wins (D(x) > 0.95, D(G(z)) < 0.05)"


# %% Training: the paper's algorithm (run, defined below, owns data, checkpoints and logs)
def train(run):
    args, device = run.args, run.device
    G, D = [net.to(device) for net in build_models(args)]
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas, fused=run.fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=args.betas, fused=run.fused)
    G, D = run.start(G, D, opt_G, opt_D)      # --resume, the fixed noise of the grids, real.png
    bce = nn.BCEWithLogitsLoss()              # BCE on logits: -[y log D + (1-y) log(1-D)]
    ones = torch.ones(args.batch_size, device=device)     # the label "real"
    zeros = torch.zeros(args.batch_size, device=device)   # the label "fake"

    for step in run.steps():                  # Ctrl-C: finish this step, save, exit
        # (1) k batches for D: maximise log D(x) + log(1 - D(G(z)))
        for _ in range(args.d_steps):
            real = run.real_batch()
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            with run.autocast:
                fake = G(z).detach()          # detach: the D step must not change G
                d_real, d_fake = D(real), D(fake)
                loss_D = bce(d_real, ones) + bce(d_fake, zeros)
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()

        # (2) then G: maximise log D(G(z)) = minimise BCE(D(G(z)), "real") (non-saturating)
        for _ in range(args.g_steps):
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            with run.autocast:
                loss_G = bce(D(G(z)), ones)
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            opt_G.step()

        run.log(loss_D=loss_D, loss_G=loss_G, D_x=d_real.sigmoid().mean(),
                D_G_z=d_fake.sigmoid().mean())


# %% Plumbing shared by every script ==============================================================
# The same in every script down to the end marker: data, checkpoints, logs, errors, Ctrl-C. The
# source copy is dcgan.py's; after editing it, `python tests/sync_plumbing.py` copies it.
import argparse, copy, csv, gzip, hashlib, os, shlex  # noqa: E401
import shutil, signal, struct, sys, time, warnings  # noqa: E401
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
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
                            "Ankle boot",
           "cifar10": "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IPYTHON = sys.modules.get("IPython")    # a Jupyter kernel (Colab, Kaggle): argv is the kernel's
NOTEBOOK = IPYTHON is not None and hasattr(IPYTHON.get_ipython(), "kernel")  # and errors print
OWN_FLAGS = {"resume", "generate", "ckpt", "label", "device", "out", "given", "argv"}  # not resumed
CKPT_KEYS = ("script", "step", "args", "G", "D", "opt_G", "opt_D", "fixed_noise", "rng")


def fail(msg):
    """Bad input: one line on stderr and exit status 1, never a traceback."""
    raise SystemExit(f"{SCRIPT}: error: {msg}")


def check(ok, msg):
    if not ok:
        fail(msg)


def warn(msg):
    print(f"{SCRIPT}: warning: {msg}", file=sys.stderr, flush=True)


def why(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]


def main(argv=None):
    """The command line's and a notebook's entry. In a notebook an error is one printed line and
    main() returns, so that the next cell still runs."""
    run = None
    try:
        args = parse_args(argv)
        if args.generate is not None:
            return generate(args)
        run = Run(args)
        return train(run.open())
    except (SystemExit, KeyboardInterrupt) as e:  # KeyboardInterrupt: Ctrl-C while importing
        code = getattr(e, "code", 130)
    finally:
        if run:
            run.close()
    if not NOTEBOOK:
        raise SystemExit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)


# %% Flags shared by every script
def make_parser(doc):
    p = argparse.ArgumentParser(SCRIPT, description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail                                          # argparse's own errors: one line too
    g = p.add_argument_group("shared by every script").add_argument
    g("--data", default="mnist", help="mnist, fashion-mnist, cifar10, mnist-mini, or a folder")
    g("--data-root", default="./data", help="where named datasets are found or downloaded")
    g("--img-size", type=int, help=f"default: {SMALL_IMG_SIZE} (MNIST-like), {PHOTO_IMG_SIZE} (a "
                                   f"folder)")
    g("--channels", type=int, choices=(1, 3), help="default: the data's")
    g("--out", help="output folder (default: runs/<script name>)")
    g("--sample-every", type=int, default=500, help="steps between sample grids")
    g("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    g("--log-every", type=int, default=50, help="steps between log lines")
    g("--resume", nargs="?", const="", metavar="PATH", help="continue <out>/last.pt, or PATH")
    g("--seed", type=int, default=0)
    g("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g("--amp", action="store_true", help="bf16 autocast (CUDA)")
    g("--compile", action="store_true", help="torch.compile G and D (CUDA)")
    g("--generate", type=int, metavar="N", help="write N images from --ckpt into --out, then exit")
    g("--ckpt", help="the checkpoint for --generate (default: <out>/last.pt)")
    g("--label", type=int, help="with --generate in cgan.py, acgan.py: draw only this class")
    g("--keep-every", type=int, default=0, metavar="N",
      help="keep a snapshot step_<N>.pt every N steps (default: --steps / 5: five per run)")
    g("--stop-on-collapse", action="store_true",
      help="when the warning that training is failing fires: save and stop, exit status 3")
    g("--ema", type=float, default=0.0, metavar="DECAY",
      help="keep an exponential moving average of G (e.g. 0.999) for grids and --generate")
    return p


def parse(p, argv):
    """Parse and check the shared flags. args.given names the flags given: on --resume and
    --generate the others come from the checkpoint."""
    argv = [str(a) for a in (argv if argv is not None else [] if NOTEBOOK else sys.argv[1:])]
    unset = object()
    defaults = {a.dest: unset for a in p._actions if a.default != argparse.SUPPRESS}
    args = p.parse_args(argv, argparse.Namespace(**defaults))
    given = {k for k, v in vars(args).items() if v is not unset}
    for k in set(vars(args)) - given:
        setattr(args, k, p.get_default(k))
    args.given, args.argv, args.betas = sorted(given), argv, tuple(args.betas)
    check(args.generate is None or args.generate > 0, f"--generate must be positive, got "
                                                      f"{args.generate}")
    check(args.ckpt is None or args.generate is not None,
          "--ckpt goes with --generate; to train on, --resume")
    check(args.label is None or CONDITIONAL and args.generate is not None,
          "--label goes with --generate, in cgan.py and acgan.py")
    check("" not in (args.data, args.data_root, args.out, args.ckpt), "a path must not be empty")
    name = args.data if args.data in DATASETS else expand(args.data).resolve().name
    tag = "" if args.data == "mnist" else "-" + "".join(c if c.isalnum() or c in "._-" else "_"
                                                        for c in name)
    source = args.resume or args.ckpt                       # a checkpoint's folder, else by data
    args.out = args.out or str(expand(source).parent if source else f"runs/{SCRIPT[:-3]}{tag}")
    if args.resume is not None or args.generate is not None:  # the flags not given: its own
        path = expand(source or Path(args.out) / "last.pt")
        args.checkpoint = path, load_checkpoint(path, args)
    for a in p._actions:                                    # the values, given or a checkpoint's
        v = getattr(args, a.dest, None)
        check(a.type is not float or np.isfinite(np.asarray(v, float)).all(),
              f"{a.option_strings[0]} must be a finite number, got {v}")
    for k in ("steps", "batch_size", "latent_dim", "sample_every", "ckpt_every", "log_every"):
        n = getattr(args, k)
        check(0 < n <= 2 ** 31, f"--{k.replace('_', '-')} must be a positive integer, got {n}")
    check(args.batch_size <= 65536, "--batch-size must be at most 65536")
    check(0 <= args.seed < 2 ** 63, f"--seed must be in 0..2^63-1, got {args.seed}")
    check(args.keep_every >= 0, f"--keep-every must not be negative, got {args.keep_every}")
    check(0 <= args.ema < 1, f"--ema must lie in [0, 1), got {args.ema}")
    check(args.lr > 0, f"--lr must be positive, got {args.lr}")
    check(all(0 <= b < 1 for b in args.betas), f"--betas must lie in [0, 1), got {args.betas}")
    return args


def pick_device(name):
    if name == "auto":
        mps = torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
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
    """Create --out, or say in one line why it cannot be (a file, a dangling link, /proc).
    Returns the folders it made, innermost first."""
    made = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        check(os.access(out, os.W_OK), f"--out {out}: cannot write there")
    except OSError as e:
        fail(f"--out {out}: cannot write there ({why(e)})")
    return made


def claim(out):
    """Create --out and lock it, before anything slow, so that two runs never write one folder (the
    operating system frees the lock when the process ends; Windows: no lock). A temporary file in
    it is then one of a save that was killed: removed."""
    made = make_dir(out)
    f = open(out / ".lock", "a")
    try:
        if os.name == "posix":
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another run is writing to {out}; wait for it to end, or give another --out")
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return f, made


# %% Data
def load_data(args, device):
    """uint8 images (N, C, H, W), int64 labels (cgan.py, acgan.py) and class names, kept on the
    training device when they fit, so that a batch is an index into them, not a DataLoader."""
    load = load_named if args.data in DATASETS else load_folder
    images, labels, classes = load(args, device)
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
    """MNIST, Fashion-MNIST, CIFAR-10: IDX files are read where they lie (gzipped or not, also
    read-only), else torchvision downloads; offline, MNIST falls back to the bundled mnist-mini.
    Resized on `device` (a GPU does 60,000 images in milliseconds)."""
    root = expand(args.data_root)
    if args.data == "mnist-mini":
        images, labels = load_mini()
    else:
        images, labels = read_idx(root / DATASETS[args.data] / "raw") or download(args.data, root)
    x = torch.from_numpy(images[:, None] if images.ndim == 3 else images)  # MNIST: add C
    args.channels = args.channels or x.shape[1]
    args.img_size = args.img_size or SMALL_IMG_SIZE or x.shape[-1]
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
            with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
                b = f.read()
            shape = struct.unpack(f">{b[3]}I", b[4:4 + 4 * b[3]])
            arrays.append(np.frombuffer(b, np.uint8, offset=4 + 4 * b[3]).reshape(shape).copy())
            check(b[:3] == b"\0\0\x08" and shape[0] > 0, f"{path} is not an IDX file of bytes")
        except Exception as e:                              # not gzip, truncated, ...
            fail(f"{path} is not a complete IDX file ({why(e)}); delete it to download it again")
    check(len(arrays[0]) == len(arrays[1]),
          f"{raw}: fewer labels than images; delete both files to download them again")
    return arrays


def download(name, root):
    made = [d for d in (root / DATASETS[name], root, *root.parents) if not d.exists()]
    try:
        ds = getattr(torchvision.datasets, DATASETS[name])(str(root), train=True, download=True)
        images = np.asarray(ds.data)
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images  # NHWC to NCHW
        return images, np.asarray(ds.targets)
    except Exception as e:                                  # offline, a proxy, a read-only root
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)     # leave no empty folder or partial file
        check(name == "mnist", f"{name} is not under {root} and could not be downloaded ({why(e)})")
        return load_mini(f"MNIST is not under {root} and could not be downloaded ({why(e)})")


def load_mini(offline=""):
    """data/mnist-mini.npz: the first 10,000 MNIST training images, shipped with the scripts.
    offline: why MNIST itself could not be had (--data mnist falls back to this, with a warning)."""
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
    """Every image under the folder (recursively; not hidden files, nor the outputs of runs), short
    side resized and centre-cropped to --img-size. Decoded once, then read from a cache outside the
    folder (it may be read-only). In cgan.py and acgan.py each first-level subfolder is a class."""
    root = expand(args.data)
    check(root.exists(), f"--data {args.data}: no such folder, and not a dataset name "
                         f"({', '.join(DATASETS)})")
    check(root.is_dir(), f"--data {args.data} is a file; give the folder that holds the images")
    args.img_size, args.channels = args.img_size or PHOTO_IMG_SIZE, args.channels or 3
    runs = {Path(args.out).resolve(), *(lock.parent.resolve() for lock in root.rglob(".lock"))}
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()
                   and "/." not in "/" + f.relative_to(root).as_posix()
                   and runs.isdisjoint(f.resolve().parents))
    check(files, f"no images ({' '.join(IMAGE_EXTS)}) under {root}")
    key = digest([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    name = f"{root.resolve().name}-{digest(root.resolve())}-{args.img_size}px-{args.channels}ch.npz"
    cache = expand(os.environ.get("GAN_CACHE_DIR") or "~/.cache/gan-scripts") / name
    images, keep = read_cache(cache, key)                   # one cache per folder and size
    if images is None:
        with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a skipped image
            decoded = list(pool.map(lambda f: decode_image(f, args.img_size, args.channels), files))
        keep = np.array([not isinstance(d, str) for d in decoded])
        check(keep.any(), f"none of the {len(files)} images under {root} is readable: {decoded[0]}")
        images = np.ascontiguousarray(np.stack([d for d in decoded if not isinstance(d, str)]))
        write_cache(cache, images=images, keep=keep, key=key)
    if not keep.all():
        warn(f"skipped {(~keep).sum()} of {len(files)} images that could not be read "
             f"(the first: {files[keep.argmin()].name})")
    if not CONDITIONAL:
        return torch.from_numpy(images), None, None
    parts = [f.relative_to(root).parts for f, k in zip(files, keep) if k]  # readable images only
    classes = sorted({p[0] for p in parts if len(p) > 1})
    check(len(classes) > 1, f"{SCRIPT} needs the images in one subfolder per class, at least two, "
                            f"under {root} (e.g. {root}/cat/*.jpg, {root}/dog/*.jpg)")
    in_class = np.array([len(p) > 1 for p in parts])
    others = {d.name for d in root.iterdir() if d.is_dir() and d.name[0] != "."} - set(classes)
    if others or not in_class.all():
        warn(f"not used: {(~in_class).sum()} images outside class subfolders; the subfolders "
             f"without readable images: {', '.join(sorted(others)) or 'none'}")
    labels = torch.tensor([classes.index(p[0]) for p in parts if len(p) > 1])
    return torch.from_numpy(images[in_class]), labels, classes


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


def read_cache(cache, key):
    """The decoded images, if the cache holds those of these files (key: names, sizes, times)."""
    try:
        with np.load(cache) as f:
            if str(f["key"]) == key:                       # (each f[...] reads the file)
                images, keep = f["images"], f["keep"]
                print(f"data: {len(images)} images from the decode cache {cache}")
                return images, keep
    except (FileNotFoundError, NotADirectoryError):
        pass
    except Exception as e:                                  # truncated, or not a cache at all
        warn(f"the decode cache {cache} is damaged ({why(e)}); decoding again")
    return None, None


def write_cache(cache, **arrays):
    """Atomically (a temporary file, then a rename); partial files of killed runs are removed."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
        for old in cache.parent.glob(f".{cache.name}.*.tmp"):
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
        print(f"data: decoded once, cached at {cache}")
    except OSError as e:
        warn(f"could not write the decode cache {cache} ({why(e)}); the next run decodes again")
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)                     # also after Ctrl-C or SIGTERM


# %% Checkpoints and --generate
def load_checkpoint(path, args):
    """A checkpoint of this script, loaded safely (tensors and plain data only). The flags not given
    on the command line come from it (and are checked as if given), so --resume and --generate need
    no repeated flags."""
    check(path.is_file(), f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a checkpoint that can be loaded safely ({why(e)})")
    check(isinstance(ckpt, dict) and "script" in ckpt, f"{path} is not a checkpoint of this repo")
    check(ckpt["script"] == SCRIPT, f"{path} was written by {ckpt['script']}, not by {SCRIPT}")
    lost = [k for k in CKPT_KEYS if k not in ckpt] or [k for k, t in (("args", dict), ("step", int))
                                                      if not isinstance(ckpt[k], t)]
    check(not lost, f"{path} is not a whole checkpoint (edited by hand?): {', '.join(lost)}")
    for k, v in ckpt["args"].items():
        if k not in args.given and k not in OWN_FLAGS:
            was = getattr(args, k, None)
            check(was is None or isinstance(v, (type(was), list)), f"{path}: its --{k} is {v!r}")
            setattr(args, k, tuple(v) if isinstance(v, list) else v)
    return ckpt


def load_state(obj, state, name):
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"the checkpoint's {name} does not fit this model ({why(e)})")


def save_atomic(state, path):
    """A temporary file, then a rename: a crash, Ctrl-C or full disk never leaves a broken file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                    # (a full disk: RuntimeError in torch)
        fail(f"could not write {path}, is the disk full? ({why(e)}); the last checkpoint is kept")
    finally:
        tmp.unlink(missing_ok=True)


def generate(args):
    """--generate N: N images from the checkpoint's G as <index>.png (conditional scripts:
    <label>_<index>.png, the labels cycling through the classes, or all --label)."""
    device, out, (_, ckpt) = pick_device(args.device), expand(args.out), args.checkpoint
    torch.manual_seed(args.seed)
    make_dir(out)
    G = build_models(args)[0].to(device).eval()
    load_state(G, ckpt.get("G_ema", ckpt["G"]), "G")       # --ema's average of G, when saved
    n = len(ckpt.get("classes") or [0])
    check(args.label is None or 0 <= args.label < n, f"--label must be in 0..{n - 1}")
    with torch.no_grad():
        for first in range(0, args.generate, 256):
            index = torch.arange(first, min(first + 256, args.generate))
            z = torch.randn(len(index), args.latent_dim, device=device)
            labels = index % n if args.label is None else torch.full_like(index, args.label)
            images = G(z, labels.to(device)) if CONDITIONAL else G(z)
            for i, label, image in zip(index.tolist(), labels.tolist(), images):
                name = f"{label}_{i:06d}.png" if CONDITIONAL else f"{i:06d}.png"
                try:
                    save_grid(image, out / name)
                except OSError as e:
                    fail(f"could not write {out / name} ({why(e)})")
    print(f"wrote {args.generate} images to {out}")


def save_grid(images, path):
    """Images in [-1, 1] as one PNG, 8 to a row (torchvision's make_grid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float(), path, nrow=8, padding=2, normalize=True, value_range=(-1, 1))


def spectral_norm_(D):
    """--spectral-norm (Miyato et al. 2018), in place: every conv and linear layer of D divided by
    its largest singular value (one power iteration per step), so that D stays 1-Lipschitz and
    cannot win outright, and no BatchNorm in D, as in the paper's networks."""
    for module in list(D.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, nn.Identity())
            elif isinstance(child, (nn.Conv2d, nn.Linear)):
                nn.utils.parametrizations.spectral_norm(child)
    return D


# %% The run: everything around the paper's loop
class Run:
    """What train() needs besides the paper: the device, --out and its lock, the data, --resume, the
    fixed noise of the sample grids, the log, checkpoints, NaN/inf checks, Ctrl-C and SIGTERM."""
    observers = []                                          # see log()

    def __init__(self, args):
        self.args, self.out, self.handlers, self.lock, self.made = args, expand(args.out), {}, 0, []
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.last_good, self.ckpt = vars(args).pop("checkpoint", (None, None))  # --resume's
        self.stop = self.training = 0                       # stop: the exit status to stop with
        self.bad = self.good = self.warned = 0              # failing and healthy log lines in a row

    def open(self):
        args, self.device = self.args, pick_device(self.args.device)
        self.fused = self.device.type == "cuda"             # one kernel for a whole optimizer step
        if self.world > 1:                                  # torchrun: a process per device
            if self.fused:
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.fused else "gloo")
            sys.stdout = open(os.devnull, "w") if self.rank else sys.stdout  # rank 0 prints
        if self.rank == 0:                                  # first of all, before anything slow
            self.lock, self.made = claim(self.out)
        last = self.out / "last.pt"                         # a folder holds one run: it writes
        held = last.exists() or any(self.out.glob("step_*.pt"))  # there only when it continues
        check(not held or self.ckpt, f"{self.out} holds a run already: add --resume to continue "
                                     f"it, or give another --out")
        if self.ckpt:
            step = self.ckpt["step"]
            check(not held or self.last_good.resolve() == last.resolve(), f"{self.out} holds "
                  f"another run; continuing {self.last_good} there would replace its checkpoints: "
                  f"give a new folder, e.g. --out {self.out}-from-{step}")
            check(step < args.steps, f"the checkpoint is at step {step}; pass a larger --steps")
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.handlers[sig] = signal.signal(sig, self.on_signal)
        torch.manual_seed(args.seed + self.rank)            # each process its own random stream
        self.data = load_data(args, self.device)
        ours, theirs = self.data["classes"], (self.ckpt or {}).get("classes", self.data["classes"])
        check(theirs == ours, f"the checkpoint was trained on the classes {', '.join(theirs or [])}"
                              f"; this data has {', '.join(ours or [])}")
        return self

    def on_signal(self, signum, frame):
        if self.stop or not self.training:                  # before the loop, or a second time
            raise SystemExit(128 + signum)
        self.stop = 128 + signum                            # the shell's status: 130 Ctrl-C, 143
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              f"(again to quit at once)", flush=True)

    def close(self):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        if self.lock:
            self.lock.close()                               # frees the lock
            with suppress(OSError):                         # a refused run leaves no folder
                if [p.name for p in self.out.iterdir()] == [".lock"]:
                    (self.out / ".lock").unlink()
                    for folder in self.made:
                        folder.rmdir()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def start(self, G, D, opt_G, opt_D, fixed=None):
        """Restore --resume's checkpoint, write real.png, print the header. fixed: G's inputs for
        the sample grids (default: 64 z). Returns G and D to call in the loop (under torchrun
        wrapped in DistributedDataParallel, with --compile compiled); checkpoints hold the plain
        modules, and --ema's average of G."""
        args, self.step, self.sums, self.images, self.t0 = self.args, 0, None, 0, time.time()
        self.nets = {"G": G, "D": D, "opt_G": opt_G, "opt_D": opt_D}
        self.fixed = fixed or (torch.randn(64, args.latent_dim, device=self.device),)
        if args.ema:                                        # a copy of G, averaged after each step
            self.nets["G_ema"] = copy.deepcopy(G).eval().requires_grad_(False)
        try:
            self.restore(self.ckpt) if self.ckpt else None
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
            fail(f"{self.last_good} is damaged or was edited by hand ({why(e)})")
        sizes = ", ".join(f"{k} {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params"
                          for k, net in (("G", G), ("D", D)))
        print(f"{SCRIPT}: {self.device.type}, {sizes}, steps {self.step + 1}..{args.steps}, "
              f"batch {args.batch_size}, out {self.out}")
        images = self.data["images"]
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:64]
        if self.rank == 0:
            self.picture(images[pick.to(images.device)] / 127.5 - 1, self.out / "real.png")
        self.log_rows = read_log(self.out / "log.csv", self.step)
        bf16 = self.fused and torch.cuda.get_device_capability(self.device)[0] >= 8
        amp = torch.autocast("cuda", torch.bfloat16) if args.amp and bf16 else None
        self.autocast = amp or nullcontext()
        for flag in [f for f in ("amp", "compile") if getattr(args, f) and not self.fused]:
            print(f"--{flag} is for CUDA; running without it on {self.device.type}")
        if args.amp and self.fused and not bf16:
            print("--amp: this GPU has no native bfloat16 (such as a T4); running in float32")
        if self.world > 1:                                  # gradients averaged over the processes;
            G, D = (torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
                    for net in (G, D))                      # BatchNorm statistics: each its own
            print(f"{self.world} processes: batch {args.batch_size} each, "
                  f"{args.batch_size * self.world} in all")
        return (torch.compile(G), torch.compile(D)) if args.compile and self.fused else (G, D)

    def restore(self, ckpt):
        """Models, optimizer moments, fixed noise, step and random streams; the optimizers keep
        this run's --lr and --betas (the checkpoint's unless given again)."""
        for name, obj in self.nets.items():
            groups = getattr(obj, "param_groups", [])       # an optimizer's: lr, betas, ...
            flags = [{k: v for k, v in group.items() if k != "params"} for group in groups]
            load_state(obj, ckpt.get(name, ckpt["G"]), name)  # (G_ema: G's, if not saved)
            for group, flag in zip(getattr(obj, "param_groups", []), flags):
                group.update(flag)
        self.fixed = tuple(t.to(self.device) for t in (ckpt["fixed_noise"],
                                                       ckpt.get("fixed_labels"))[:len(self.fixed)])
        rng = ckpt["rng"].get("ranks", [ckpt["rng"]])      # a stream per process
        check(len(rng) == self.world, f"the checkpoint was written by {len(rng)} processes; resume "
                                      f"it with as many (torchrun --nproc_per_node={len(rng)})")
        torch.set_rng_state(rng[self.rank]["cpu"].cpu())
        if self.fused and rng[self.rank]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng[self.rank]["cuda"]])
        self.step = ckpt["step"]
        print(f"resumed from step {self.step}")

    def real_batch(self):
        """A batch of real images (and their labels in cgan.py, acgan.py), counted for img/s."""
        self.images += self.args.batch_size
        return sample_real(self.data, self.args.batch_size, self.device, with_labels=CONDITIONAL)

    def log(self, **stats):
        """The step's numbers by name, summed on the device (no host sync) until the next log line,
        with the first step at which one of them was NaN or inf. Then Run.observers, functions
        f(run, stats) that get them every step (run.step: this step), e.g. to plot in a notebook."""
        values = torch.stack([v.detach().float().reshape(()) for v in stats.values()])
        if self.sums is None:
            self.names, self.sums, self.count = list(stats), torch.zeros_like(values), 0
            self.bad_step = torch.full((), -1, device=values.device)
        self.sums += values
        self.count += 1
        ok = torch.isfinite(values).all() | (self.bad_step >= 0)
        self.bad_step = torch.where(ok, self.bad_step, self.step)
        for observe in self.observers:
            observe(self, stats)

    def steps(self):
        """The step numbers from the checkpoint's to --steps. After each step: --ema's average, the
        log line, sample grids, last.pt and the kept snapshots, and a clean stop on Ctrl-C, SIGTERM
        or (with --stop-on-collapse) failed training."""
        args, self.training = self.args, True
        keep = args.keep_every or max(1, args.steps // 5)    # by default a run keeps five snapshots
        for step in range(self.step + 1, args.steps + 1):
            self.step = step
            yield step
            G = self.nets["G"]
            if args.ema:                                     # G_ema = decay G_ema + (1 - decay) G
                with torch.no_grad():
                    for average, now in zip(self.nets["G_ema"].parameters(), G.parameters()):
                        average.lerp_(now, 1 - args.ema)
                    for copied, now in zip(self.nets["G_ema"].buffers(), G.buffers()):
                        copied.copy_(now)                    # BatchNorm's running statistics
            # the processes of a torchrun agree on stopping at log lines only (write_log)
            sync = step % args.log_every == 0 or step == args.steps or self.world == 1 and self.stop
            if sync:
                self.write_log()                             # (may set self.stop: collapse)
            stop = self.stop if sync else 0                  # a signal may come at any line
            if self.rank == 0 and (step % args.sample_every == 0 or step == args.steps or stop):
                with torch.no_grad(), self.autocast:
                    sampler = self.nets["G_ema"] if args.ema else G.eval()  # running statistics
                    self.picture(sampler(*self.fixed), self.out / "samples" / f"{step:06d}.png")
                G.train()
            snapshots = [self.out / f"step_{step:06d}.pt"] if step % keep == 0 else []
            if step % args.ckpt_every == 0 or step == args.steps or stop or snapshots:
                self.save(self.out / "last.pt", *snapshots)
            if stop:                                         # 3: failing training; a signal
                print(f"stopped at step {step}; " + (f"training is failing; snapshots: {self.out}/"
                      f"step_*.pt" if stop == 3 else f"continue with: {self.continue_command()}"))
                raise SystemExit(stop)
        print(f"done: samples in {self.out / 'samples'}, checkpoint {self.out / 'last.pt'}")

    def check_finite(self, what="a loss", step=None):
        step = step or self.bad_step.item()
        kept = f"the last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint"
        check(step < 0, f"{what} became NaN/inf at step {step}; stopping ({kept}); lower --lr?")

    def picture(self, images, path):
        """A grid of the run; one that cannot be written (a folder in its place) never stops it."""
        try:
            save_grid(images, path)
        except OSError as e:
            warn(f"could not write {path} ({why(e)}); training goes on")

    def continue_command(self):
        """The checkpoint holds every flag: its folder and --resume (and --device, if given)."""
        flags = ["--out", str(self.out), *["--device", self.args.device] * ("device" in
                                                                              self.args.given)]
        run = f"torchrun --nproc_per_node={self.world}" if self.world > 1 else "python"
        return f"main({flags + ['--resume']})" if NOTEBOOK else f"{run} " + shlex.join(
            [SCRIPT, *flags, "--resume"])

    def save(self, *paths):
        """The checkpoint, a plain dict (the keys CKPT_KEYS), written only if every weight and every
        optimizer state in it is finite: the last good checkpoint always resumes."""
        self.check_finite()
        tensors = [t for net in (self.nets["G"], self.nets["D"]) for t in net.state_dict().values()]
        tensors += [t for k in ("opt_G", "opt_D") for state in self.nets[k].state.values()
                    for t in state.values() if torch.is_tensor(t)]
        if not torch.stack([t.isfinite().all() for t in tensors if t.is_floating_point()]).all():
            self.check_finite("a weight or an optimizer's state", self.step)
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.fused else []}
        if self.world > 1:                                  # every process's stream, for --resume
            ranks = [None] * self.world
            dist.all_gather_object(ranks, rng)
            rng = {**rng, "ranks": ranks}
        state = {k: v.state_dict() for k, v in self.nets.items()}
        state.update(script=SCRIPT, step=self.step, args=vars(self.args), fixed_noise=self.fixed[0],
                     rng=rng)
        if CONDITIONAL:
            state.update(fixed_labels=self.fixed[1], classes=self.data["classes"])
        for path in paths if self.rank == 0 else []:        # rank 0 alone writes files
            save_atomic(state, path)
        if self.world > 1:            # the others wait for the files. The handle outlives close():
            self.saved = dist.barrier(async_op=True)    # torch < 2.8 can hang destroying the group
            self.saved.wait()         # if gloo's threads still hold a collective's tensors then
        self.last_good = paths[0]

    def write_log(self):
        """A row of log.csv, loss.png, the progress line, and the warning when training is failing.
        The log never stops a run. Under torchrun: the means over all processes, and all agree on a
        NaN/inf or a stop."""
        if self.world > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.world
            agreed = torch.stack([self.bad_step.float(), self.sums.new_tensor(float(self.stop))])
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            self.bad_step, self.stop = agreed[0].long(), int(agreed[1])
        self.check_finite()
        means = dict(zip(self.names, (self.sums / self.count).tolist()))
        dt, total = time.time() - self.t0, self.args.steps
        ips = self.images * self.world / max(dt, 1e-9)
        header = ["step", *means, "img_per_s"]
        self.log_rows = [r for r in self.log_rows if len(r) == len(header)]
        self.log_rows.append([self.step, *(float(f"{v:.5g}") for v in means.values()), round(ips)])
        try:
            if self.rank == 0:
                with open(self.out / "log.csv", "w", newline="") as f:
                    csv.writer(f).writerows([header, *self.log_rows])
                plot(self.log_rows, header, self.out / "loss.png")
        except OSError as e:
            warn(f"could not write the log ({why(e)}); training goes on")
        left = int((total - self.step) * dt / self.count)
        values = " ".join(f"{k} {v:.3f}" for k, v in means.items())
        print(f"[{self.step:>{len(str(total))}}/{total}] {values} | {ips:,.0f} img/s | "
              f"{left // 3600}h{left % 3600 // 60:02d}m{left % 60:02d}s left", flush=True)
        warm = self.step <= min(1000, self.args.steps // 10)  # at first D often wins for a while
        sign = None if warm else failing(means, self.args)   # the loss family's sign of failure
        self.bad, self.good = (self.bad + 1, 0) if sign else (0, self.good + 1)
        self.warned = self.warned and self.good < 20         # 20 healthy lines: a new episode
        if self.bad >= 5 and not self.warned:                # 5 failing lines in a row: say it once
            self.warned = True
            warn(f"step {self.step}: training is failing: {sign}. Earlier snapshots are in "
                 f"{self.out}/step_<N>.pt; README, Long runs, has the remedy")
            self.stop = self.stop or (3 if self.args.stop_on_collapse else 0)
        self.sums.zero_()
        self.count, self.images, self.t0 = 0, 0, time.time()


def read_log(path, step):
    """On --resume: log.csv's rows up to the checkpoint's step; damaged rows are dropped."""
    try:
        with open(path, newline="", errors="replace") as f:
            rows = list(csv.reader(f))[1:] if step else []
        return [[int(r[0]), *map(float, r[1:])] for r in rows if r and r[0].isdigit()
                and int(r[0]) <= step]
    except (OSError, ValueError):
        return []


def plot(rows, header, path, W=800, H=420, pad=60):
    """log.csv as a line chart, drawn with PIL, so that no plotting package is needed."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x0, x1 = rows[0][0], max(rows[-1][0], rows[0][0] + 1)
    series = [[r[i] for r in rows] for i in range(1, len(header) - 1)]
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


if __name__ == "__main__":
    main()
# %% End of the shared plumbing ===================================================================
