"""Speed of kernels/ against eager PyTorch and torch.compile, in one run, printed as one table
(needs a CUDA GPU).

    python benchmarks/kernels.py                 # from the repository root; 5-10 minutes on an H100
    python benchmarks/kernels.py --no-compile    # skip the torch.compile rows (most of the time)

Rows:
  gradient_penalty, forward + backward (torch.autograd.grad of the penalty w.r.t. grads), float32,
      B in {64, 256, 1024} x per-sample size in {1x28x28, 3x64x64, 3x128x128}:
      eager (the reference, impl="torch"), torch.compile of it, Triton (impl="triton").
  clip_weights_, float32, c=0.01, on a DCGAN 64x64 critic, an MLP critic and 100M parameters in
      1000 tensors: a per-parameter clamp_ loop (eager, the "vs eager" baseline),
      torch._foreach_clamp_min_/max_ (= the reference, impl="torch"), torch.compile of the loop,
      Triton (impl="triton").
"(graph)" rows replay the same call from a CUDA graph: no host time per launch, as inside a
--cuda-graph training step, so they show what the GPU itself spends.
Times are medians of triton.testing.do_bench (which clears the L2 cache before every call). GB/s
counts the bytes the operation must move at least, the same for every implementation: the penalty
reads grads twice (forward, backward) and writes the gradient once (3 x grads bytes); clipping reads
and writes every parameter (2 x parameter bytes). "% copy" is that rate over the device's copy
bandwidth, measured in the same run as dst.copy_(src) on 1 GiB (2 GiB moved).
"""
import argparse
import os
import sys

import torch
from torch import nn

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PENALTY_BATCHES = [64, 256, 1024]
PENALTY_SIZES = [(1, 28, 28), (3, 64, 64), (3, 128, 128)]
CLIP_C = 0.01


def bench_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def graphed(step):
    """step() captured once as a CUDA graph (after warm-up calls on the capture stream): replaying
    it costs no host time per kernel launch."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = step()
    torch.cuda.current_stream().wait_stream(stream)

    def replay():
        graph.replay()
        return out
    return replay


def with_graphs(impls):
    """Each implementation as it is, and (unless it is torch.compile's) replayed from a graph."""
    return {**impls, **{f"{name} (graph)": step for name, step in impls.items()
                        if step is not None and "compile" not in name}}


def copy_bandwidth_gbps():
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()      # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


# %% Penalty
def penalty_rows(use_compile):
    from kernels.gradient_penalty import _gradient_penalty_torch, gradient_penalty
    compiled = torch.compile(_gradient_penalty_torch, dynamic=False) if use_compile else None
    rows = []
    for size in PENALTY_SIZES:
        for B in PENALTY_BATCHES:
            grads = (torch.randn(B, *size, device="cuda") * 0.01).requires_grad_()
            nbytes = 3 * grads.nbytes
            impls = {"eager": lambda g: gradient_penalty(g, impl="torch"),
                     "torch.compile": compiled,
                     "triton": lambda g: gradient_penalty(g, impl="triton")}
            reference = torch.autograd.grad(impls["eager"](grads), grads)[0]
            case = f"B={B} {'x'.join(map(str, size))}"
            steps = {name: None if penalty is None else
                     (lambda penalty=penalty: torch.autograd.grad(penalty(grads), grads)[0])
                     for name, penalty in impls.items()}
            for name, step in with_graphs(steps).items():
                if step is None:
                    continue
                if name.endswith("(graph)"):
                    step = lazily_graphed(step)
                rows.append(measure("penalty fwd+bwd", case, name, step, nbytes, reference))
            print(f"  penalty {case} done", file=sys.stderr, flush=True)
    return rows


# %% Clipping
def dcgan_critic(nc=3, ndf=64):
    """The DCGAN 64x64 discriminator (Radford et al.), as WGAN clips it."""
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        *[layer for k in (1, 2, 4) for layer in (
            nn.Conv2d(ndf * k, ndf * 2 * k, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2 * k),
            nn.LeakyReLU(0.2))],
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False))


def mlp_critic(img=28 * 28, hidden=512):
    return nn.Sequential(nn.Linear(img, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden // 2),
                         nn.LeakyReLU(0.2), nn.Linear(hidden // 2, 1))


def many_tensors(total=100_000_000, count=1000, seed=0):
    """`count` tensors of uneven sizes (50k..150k elements, none a multiple of the block) summing to
    `total`."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(total // count // 2, total // count * 3 // 2, (count,), generator=gen)
    sizes[-1] += total - int(sizes.sum())
    return [nn.Parameter(torch.randn(int(n), device="cuda")) for n in sizes]


def clip_rows(use_compile):
    from kernels import clip_weights_

    def loop_(params):
        with torch.no_grad():
            for p in params:
                p.clamp_(-CLIP_C, CLIP_C)

    def foreach_(params):
        with torch.no_grad():
            torch._foreach_clamp_min_(params, -CLIP_C)
            torch._foreach_clamp_max_(params, CLIP_C)

    compiled_loop_ = torch.compile(loop_, dynamic=False) if use_compile else None
    rows = []
    for case, make in [("DCGAN 64x64 critic", lambda: list(dcgan_critic().cuda().parameters())),
                       ("MLP critic", lambda: list(mlp_critic().cuda().parameters())),
                       ("100M params / 1000 tensors", many_tensors)]:
        params = make()
        count = sum(p.numel() for p in params)
        nbytes = 2 * sum(p.nbytes for p in params)
        case = f"{case} ({count / 1e6:.2f}M, {len(params)} tensors)"
        with torch.no_grad():
            # most values beyond the bounds
            initial = [p.detach().clone().mul_(100) for p in params]
        reference = [p.clamp(-CLIP_C, CLIP_C) for p in initial]
        clips = {"clamp_ loop (eager)": loop_, "foreach clamp_min_/max_": foreach_,
                 "torch.compile": compiled_loop_,
                 "triton": lambda params: clip_weights_(params, CLIP_C, impl="triton")}
        steps = {name: None if clip is None else (lambda clip=clip, params=params:
                                                   clip(params) or params)
                 for name, clip in clips.items()}
        for name, step in with_graphs(steps).items():
            if step is None:
                continue
            with torch.no_grad():
                for p, x in zip(params, initial):
                    p.copy_(x)
            if name.endswith("(graph)"):
                step = lazily_graphed(step)
            rows.append(measure("clip_weights_", case, name, step, nbytes, reference))
        print(f"  clip {case} done", file=sys.stderr, flush=True)
        del params, initial, reference
        torch.cuda.empty_cache()
    return rows


def lazily_graphed(step):
    """graphed(step), captured at the first call (inside measure(), which reports a failure)."""
    replay = []

    def call():
        if not replay:
            replay.append(graphed(step))
        return replay[0]()
    return call


# %% Measuring and the table
def measure(op, case, impl, step, nbytes, reference):
    try:
        out = step()                                  # also compiles / warms up
        outs = out if isinstance(out, list) else [out]
        refs = reference if isinstance(reference, list) else [reference]
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(outs, refs))
        ms = bench_ms(step)
    # one failing implementation does not lose the table
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
        return dict(op=op, case=case, impl=impl, error=error)
    return dict(op=op, case=case, impl=impl, us=ms * 1e3, gbps=nbytes / ms / 1e6, ok=ok)


def print_table(rows, copy_gbps):
    baselines = {(r["op"], r["case"]): r["us"] for r in rows
                 if r["impl"] in ("eager", "clamp_ loop (eager)") and "us" in r}
    header = (f"| {'op':<16} | {'case':<50} | {'implementation':<32} | {'us':>9} | {'GB/s':>7} | "
              f"{'% copy':>6} | {'vs eager':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['op']:<16} | {r['case']:<50} | {r['impl']:<32} | {r['error']} |")
            continue
        speedup = baselines.get((r["op"], r["case"]), float("nan")) / r["us"]
        flag = "" if r["ok"] else "  (result differs!)"
        print(f"| {r['op']:<16} | {r['case']:<50} | {r['impl']:<32} | {r['us']:9.1f} | "
              f"{r['gbps']:7.0f} | {100 * r['gbps'] / copy_gbps:5.0f}% | {speedup:7.2f}x |{flag}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py: no CUDA device found; it measures GPU kernels")
    try:
        import triton
    except ImportError:
        sys.exit("benchmarks/kernels.py: Triton is not installed (pip install triton)")
    from torch import _dynamo
    _dynamo.config.cache_size_limit = 64                # one compiled graph per shape, 9 shapes
    torch.manual_seed(0)

    copy_gbps = copy_bandwidth_gbps()
    print(f"  copy bandwidth {copy_gbps:.0f} GB/s", file=sys.stderr, flush=True)
    rows = penalty_rows(not args.no_compile) + clip_rows(not args.no_compile)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, float32; measured copy bandwidth {copy_gbps:.0f} GB/s "
          f"(dst.copy_(src), 1 GiB); do_bench medians\n")
    print_table(rows, copy_gbps)


if __name__ == "__main__":
    main()
