"""kernels/: the Triton path against the plain PyTorch reference and a float64 one (Liger-Kernel
style: odd shapes, a tolerance per dtype, forward and backward). Without a GPU the kernels run in
Triton's interpreter (TRITON_INTERPRET=1 from conftest.py); with one, the same tests run the
compiled kernels on it, and a few more (sync-free calls, "auto" on CUDA) run only there."""
import importlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from common import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from kernels import clip_weights_, gradient_penalty  # noqa: E402

gp_mod = importlib.import_module("kernels.gradient_penalty")  # (kernels.gradient_penalty: the op)
clip_mod = importlib.import_module("kernels.clip")
dispatch = importlib.import_module("kernels._dispatch")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_TRITON = dispatch.triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON or not (CUDA or dispatch.INTERPRET),
                                  reason="needs Triton and a GPU, or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU")
# The interpreter computes bf16 wrongly, so bf16 is tested on a GPU only.
DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if CUDA else [])
# (value rtol, gradient rtol, gradient atol) against the float64 reference of the same input values
TOL = {torch.float32: (1e-5, 1e-4, 1e-6), torch.float64: (1e-10, 1e-9, 1e-12),
       torch.float16: (1e-5, 2e-3, 1e-5), torch.bfloat16: (1e-5, 1.6e-2, 1e-4)}
SHAPES = [(1, 5), (3, 1025), (16, 1, 28, 28), (7, 3, 33, 17)]


def make_grads(shape, dtype, seed=0, zero_rows=()):
    """Rows with norms spread over (0, 2), on both sides of target=1 (so one_sided matters)."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape[1:]).numel()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    norms = 2 * torch.rand(shape[0], generator=gen, dtype=torch.float64) / n ** 0.5
    g *= norms.view(-1, *[1] * (len(shape) - 1))
    g[list(zero_rows)] = 0
    return g.to(DEVICE, dtype)


def value_and_grad(grads, **kw):
    g = grads.detach().clone().requires_grad_()
    loss = gradient_penalty(g, **kw)
    loss.backward()
    return loss.detach(), g.grad


def check_penalty(grads, **kw):
    """Triton vs fallback vs float64 reference, value and gradient."""
    rtol, grad_rtol, grad_atol = TOL[grads.dtype]
    loss_t, grad_t = value_and_grad(grads, impl="triton", **kw)
    loss_f, grad_f = value_and_grad(grads, impl="torch", **kw)
    loss_r, grad_r = value_and_grad(grads.double(), impl="torch", **kw)
    acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
    assert loss_t.dtype == loss_f.dtype == acc
    assert grad_t.dtype == grads.dtype and grad_t.shape == grads.shape
    torch.testing.assert_close(loss_t.double(), loss_r, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(loss_f.double(), loss_r, rtol=rtol, atol=1e-12)
    # The gradient is rounded to the input dtype once, by both paths: so is the reference compared.
    torch.testing.assert_close(grad_t, grad_f, rtol=grad_rtol, atol=grad_atol)
    torch.testing.assert_close(grad_t.double(), grad_r, rtol=grad_rtol, atol=grad_atol)
    return loss_t, grad_t


# %% gradient_penalty
@needs_triton
@pytest.mark.parametrize("one_sided", [False, True], ids=["two-sided", "one-sided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_penalty_matches_fallback_and_float64(shape, dtype, one_sided):
    check_penalty(make_grads(shape, dtype), weight=10.0, target=1.0, one_sided=one_sided)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_zero_rows_give_zero_gradient(dtype):
    grads = make_grads((5, 3, 7, 9), dtype, zero_rows=(0, 3))
    loss, grad = check_penalty(grads, weight=2.5, target=0.75)
    assert torch.isfinite(loss) and torch.all(grad[[0, 3]] == 0)
    # all rows zero: loss = weight * target^2, gradient zero
    zeros = torch.zeros(4, 10, device=DEVICE, dtype=dtype)
    loss, grad = check_penalty(zeros, weight=3.0, target=0.5)
    assert loss.item() == pytest.approx(0.75) and torch.all(grad == 0)


@needs_triton
def test_penalty_non_contiguous_input():
    base = make_grads((6, 9, 11, 3), torch.float32)
    # channels-last: the rows are copied to contiguous ones
    check_penalty(base.permute(0, 3, 1, 2))
    # rows strided in the batch: no copy
    check_penalty(make_grads((12, 3, 5, 7), torch.float32)[::3])
    check_penalty(base[:, ::2])                        # strided inside a row


@needs_triton
def test_penalty_weight_target_in_float64():
    """weight and target reach the kernel as tensors of the accumulation dtype: no float32 rounding.
    """
    grads = make_grads((4, 33), torch.float64)
    kw = dict(weight=0.1, target=0.3)                  # neither is representable in float32
    torch.testing.assert_close(gradient_penalty(grads, impl="triton", **kw),
                               gradient_penalty(grads, impl="torch", **kw), rtol=1e-13, atol=0)


@needs_triton
@pytest.mark.parametrize("one_sided", [False, True], ids=["two-sided", "one-sided"])
def test_penalty_gradcheck_float64(one_sided):
    grads = make_grads((3, 2, 4), torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda g: gradient_penalty(g, weight=10.0, one_sided=one_sided,
                                                               impl="triton"),
                                    (grads,), eps=1e-6, atol=1e-6)


def small_critic(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(8, 16, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 1)).to(DEVICE, dtype)


def critic_param_grads(dtype, impl):
    """One WGAN-GP critic penalty step, as wgan_gp.py does it: interpolates, autograd.grad with
    create_graph, penalty, backward through the double-backward graph into the critic's parameters.
    """
    critic = small_critic(dtype)
    gen = torch.Generator().manual_seed(1)
    real, fake = (torch.randn(6, 3, 11, 11, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                  for _ in "rf")
    # one per sample
    eps = torch.rand(6, 1, 1, 1, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_()
    grads = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)[0]
    gradient_penalty(grads, weight=10.0, impl=impl).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in critic.parameters()]


@needs_triton
def test_penalty_double_backward_into_critic():
    triton_grads = critic_param_grads(torch.float32, "triton")
    torch_grads = critic_param_grads(torch.float32, "torch")
    reference = critic_param_grads(torch.float64, "torch")
    triton64 = critic_param_grads(torch.float64, "triton")
    # (the biases get none: with LeakyReLU the input gradient does not depend on them; the last
    # one is unused)
    # every weight gets a penalty gradient
    assert all(g.abs().max() > 0 for g in triton_grads[0::2])
    for gt, gf, gr, gt64 in zip(triton_grads, torch_grads, reference, triton64):
        torch.testing.assert_close(gt, gf, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gt.double(), gr, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gt64, gr, rtol=1e-10, atol=1e-13)


def test_penalty_fallback_is_the_formula():
    grads = make_grads((4, 2, 3), torch.float32)
    norm = grads.double().flatten(1).norm(dim=1)
    expected = 10.0 * ((norm - 1) ** 2).mean()
    torch.testing.assert_close(gradient_penalty(grads, impl="torch").double(), expected,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(gradient_penalty(grads, one_sided=True, impl="torch").double(),
                               10.0 * ((norm - 1).clamp(min=0) ** 2).mean(), rtol=1e-6, atol=0)


def test_penalty_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        gradient_penalty(make_grads((2, 3), torch.float32), impl="cuda")


# %% clip_weights_
def as_bits(t):
    return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def next_float(x, away_from_zero):
    """The neighbour of x (a 0-dim tensor) one ulp away from zero, or towards it."""
    return (as_bits(x) + (1 if away_from_zero else -1)).view(x.dtype)


def clip_params(dtype, c, seed=0):
    """Many tensors of odd sizes (a block-size multiple, blocks with a tail, one element) whose
    values sit at the bounds, one ulp inside and outside them, far beyond, inf, -inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(1,), (3, 5), (17,), (4096,), (4097,), (64, 3, 4, 4), (1 << 16,), ((1 << 16) + 3,),
             (2, 1000)]
    bound = torch.tensor(c, dtype=dtype)
    special = torch.stack([bound, -bound, next_float(bound, True), next_float(-bound, True),
                           next_float(bound, False), next_float(-bound, False)]
                          + [torch.tensor(v, dtype=dtype)
                             for v in (float("inf"), -float("inf"), float("nan"), 1e3)])
    params = []
    for size in sizes:
        x = (torch.randn(size, generator=gen, dtype=torch.float64) * 2 * c).to(dtype)
        k = min(x.numel(), special.numel())
        x.view(-1)[:k] = special[:k]
        params.append(nn.Parameter(x.to(DEVICE)))
    return params


def expected_clamp(params, c):
    return [as_bits(p.detach().clone().clamp_(-c, c)) for p in params]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [0.01, 0.1, 1.7])
def test_clip_bit_equal_to_clamp(dtype, c):
    params = clip_params(dtype, c)
    expected = expected_clamp(params, c)
    # a generator, as critic.parameters()
    clip_weights_((p for p in params), c, impl="triton")
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)


@needs_triton
def test_clip_float64_bound_not_representable_in_float32():
    c = 0.1
    assert float(torch.tensor(c, dtype=torch.float32)) != c
    half = nn.Parameter(torch.full((9,), 0.5, dtype=torch.float64, device=DEVICE))
    params = clip_params(torch.float64, c) + [half]
    expected = expected_clamp(params, c)
    clip_weights_(params, c, impl="triton")
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)
    # exactly float64 0.1, not float32 0.1
    assert torch.all(params[-1] == c)


@needs_triton
def test_clip_one_launch_per_device_dtype_group(monkeypatch):
    launches = []
    kernel = clip_mod._clip_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(clip_mod, "_clip_kernel", Counting())
    params = [p for dtype in (torch.float32, torch.float16, torch.float64)
              for p in clip_params(dtype, 0.5)]
    integers = nn.Parameter(torch.ones(3, dtype=torch.int64, device=DEVICE), requires_grad=False)
    params.append(integers)                                     # skipped
    expected = expected_clamp(params[:-1], 0.5)
    clip_weights_(params, 0.5, impl="triton")
    assert len(launches) == 3
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)
    assert params[-1].tolist() == [1, 1, 1]


@needs_triton
def test_clip_non_contiguous_and_misaligned_parameters_use_clamp():
    storage = torch.randn(1 + 7 * 5, device=DEVICE)
    transposed = nn.Parameter(torch.randn(7, 5, device=DEVICE).t())          # not contiguous
    # a view 4 bytes into an allocation
    misaligned = nn.Parameter(storage[1:])
    params = [transposed, misaligned] + clip_params(torch.float32, 0.3)
    expected = expected_clamp(params, 0.3)
    clip_weights_(params, 0.3, impl="triton")
    assert not transposed.is_contiguous()
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)


@needs_triton
def test_clip_table_cache_follows_the_parameters():
    params = clip_params(torch.float32, 1.0)
    clip_weights_(params, 1.0, impl="triton")
    # a changed pointer (what .to() or a re-assigned .data does): a new table
    params[3].data = torch.randn(5000, device=DEVICE) * 3
    params[0].data = torch.randn(3, 3, device=DEVICE) * 3
    expected = expected_clamp(params, 1.0)
    clip_weights_(params, 1.0, impl="triton")
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)
    # the same addresses seen through other parameter objects of another dtype and size: not the
    # old table
    halves = [nn.Parameter(p.data.view(torch.float16)) for p in params if p.numel() % 2 == 0]
    for h in halves:
        h.data.mul_(100)
    expected = expected_clamp(halves, 0.5)
    clip_weights_(halves, 0.5, impl="triton")
    for p, e in zip(halves, expected):
        assert torch.equal(as_bits(p), e)
    # a new bound: the same table, new bounds
    expected = expected_clamp(params, 0.25)
    clip_weights_(params, 0.25, impl="triton")
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)


@needs_triton
def test_clip_bumps_the_version_counter():
    p = nn.Parameter(torch.randn(10, device=DEVICE))
    before = p._version
    clip_weights_([p], 0.1, impl="triton")
    assert p._version > before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16],
                         ids=str)
def test_clip_fallback_is_clamp(dtype):
    """The reference (torch._foreach_clamp_min_ then _foreach_clamp_max_ on the list) is bit-equal
    to p.clamp_(-c, c): bounds in the parameter dtype, NaN kept (not clamped to a bound)."""
    params = clip_params(dtype, 0.2)
    expected = expected_clamp(params, 0.2)
    versions = [p._version for p in params]
    clip_weights_(iter(params), 0.2, impl="torch")
    for p, e in zip(params, expected):
        assert torch.equal(as_bits(p), e)
    assert params[-1].view(-1)[8].isnan()                   # clip_params' NaN
    assert all(p._version > v for p, v in zip(params, versions))  # autograd sees the change


def test_clip_fallback_mixed_dtypes_empty_and_integer_tensors():
    """A list of several dtypes, an empty tensor, an integer one (left alone) and an empty list."""
    mixed = clip_params(torch.float64, 0.3) + clip_params(torch.float16, 0.3)
    mixed += [nn.Parameter(torch.empty(0, device=DEVICE)),
              nn.Parameter(torch.full((3,), 7, device=DEVICE), requires_grad=False)]
    expected = expected_clamp(mixed[:-1], 0.3)
    clip_weights_(mixed, 0.3, impl="torch")
    for p, e in zip(mixed, expected):
        assert torch.equal(as_bits(p), e)
    assert mixed[-1].tolist() == [7, 7, 7]
    clip_weights_([], 0.3, impl="torch")


# %% Dispatch
def penalty_path(grads, **kw):
    """Which path computed the penalty: the Triton autograd.Function, or the reference's ops."""
    loss = gradient_penalty(grads.detach().clone().requires_grad_(), **kw)
    return "triton" if "GradientPenalty" in type(loss.grad_fn).__name__ else "torch"


@needs_triton
def test_impl_and_the_environment_variable(monkeypatch):
    grads = make_grads((4, 3, 5, 5), torch.float32)
    monkeypatch.delenv("GAN_KERNELS", raising=False)
    assert penalty_path(grads, impl="triton") == "triton"
    assert penalty_path(grads, impl="torch") == "torch"
    # "auto": the path that won end to end on a GPU (the reference, in the last measurement)
    monkeypatch.setitem(dispatch.AUTO_ON_CUDA, "gradient_penalty", "torch")
    assert penalty_path(grads) == "torch"
    monkeypatch.setitem(dispatch.AUTO_ON_CUDA, "gradient_penalty", "triton")
    assert penalty_path(grads) == ("triton" if CUDA else "torch")   # CUDA tensors only
    monkeypatch.setenv("GAN_KERNELS", "torch")
    assert penalty_path(grads) == "torch"
    assert penalty_path(grads, impl="triton") == "triton"            # a forced impl is obeyed
    monkeypatch.setitem(dispatch.AUTO_ON_CUDA, "gradient_penalty", "torch")
    monkeypatch.setenv("GAN_KERNELS", "triton")
    assert penalty_path(grads) == ("triton" if CUDA else "torch")
    with pytest.raises(ValueError, match="impl"):
        gradient_penalty(grads, impl="cuda")


@pytest.mark.skipif(dispatch.INTERPRET or not HAS_TRITON, reason="runs without the interpreter")
def test_triton_on_cpu_tensors_needs_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gradient_penalty(torch.ones(2, 3), impl="triton")


def test_failure_at_first_use_warns_once_and_falls_back():
    key = ("test op", torch.float16)

    def broken():
        raise RuntimeError("the compiler says no")

    try:
        with pytest.warns(RuntimeWarning, match="the compiler says no"):
            assert dispatch.first_use(key, key, "auto", broken, lambda: "reference") == "reference"
        assert key in dispatch._broken                    # "auto" takes the reference from now on
        with pytest.raises(RuntimeError):                 # a forced impl is never hidden
            dispatch.first_use(key, key, "triton", broken, lambda: "reference")
        ok = ("test op ok", torch.float16)                # a kernel that has worked once ...
        assert dispatch.first_use(ok, ok, "auto", lambda: "kernel", lambda: "reference") == "kernel"
        with pytest.raises(RuntimeError), warnings.catch_warnings():
            warnings.simplefilter("error")                # ... is never silently replaced later
            dispatch.first_use(ok, ok, "auto", broken, lambda: "reference")
    finally:
        dispatch._broken.discard(key)
        dispatch._worked.discard(("test op ok", torch.float16))


@needs_triton
def test_repeated_calls_make_no_tensors_from_python_values(monkeypatch):
    """(GPU speed issue) A torch.tensor(...) from Python numbers on a CUDA device is a host-to-
    device copy that waits for the GPU. After the first call, neither op makes one: the penalty's
    constants and the clipping table and bounds are cached on the device."""
    grads = make_grads((8, 3, 7, 7), torch.float32).requires_grad_()
    params = clip_params(torch.float32, 0.05)
    gradient_penalty(grads, weight=10.0, impl="triton").backward()
    clip_weights_(params, 0.05, impl="triton")
    made = []
    real_tensor = torch.tensor

    def counting_tensor(*a, **k):
        made.append(a)
        return real_tensor(*a, **k)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    for _ in range(3):
        gradient_penalty(grads, weight=10.0, impl="triton").backward()
        clip_weights_(params, 0.05, impl="triton")
    assert made == []


@needs_cuda
def test_kernels_and_training_steps_never_sync_the_host(tmp_path, monkeypatch):
    """(GPU speed issue) gradient_penalty forward + backward, clip_weights_, and whole training
    steps of wgan.py and wgan_gp.py under torch.cuda.set_sync_debug_mode("error"): any call that
    waits for the GPU raises. (The first calls, which compile and cache, run before the check.)"""
    grads = make_grads((64, 3, 32, 32), torch.float32).requires_grad_()
    params = [nn.Parameter(torch.randn(1000, device="cuda")) for _ in range(5)]
    for _ in range(2):
        gradient_penalty(grads, impl="triton").backward()
        clip_weights_(params, 0.01, impl="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gradient_penalty(grads, impl="triton").backward()
        clip_weights_(params, 0.01, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from common import load_script, make_folder, run
    data = make_folder(tmp_path / "images", n=8)
    monkeypatch.setenv("GAN_KERNELS", "triton")               # the steps use the kernels
    for script in ("wgan.py", "wgan_gp.py"):
        module = load_script(script)

        def strict_after_warmup(run_, stats):             # the first steps warm up (cudnn, caches)
            torch.cuda.set_sync_debug_mode("error" if 2 <= run_.step < 4 else "default")

        monkeypatch.setattr(module.Run, "observers", [strict_after_warmup])
        try:
            run(script, "--data", data, "--steps", 5, "--out", script, "--device", "cuda",
                "--log-every", 100, "--sample-every", 100, "--ckpt-every", 100,
                "--keep-every", 100)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# %% The compiler: a kernel that only the compiler rejects fails here, without a GPU
TRITON_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64"}


def compile_sm90(kernel, signature, constexprs, num_warps):
    """triton.compile for an H100 (sm_90) through a GPUTarget: Triton's code generator, MLIR passes
    and ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    sig = {name: signature.get(name, "constexpr") for name in names}
    # pointers 16-byte aligned and integers multiples of 16, as Triton specialises a launch on
    # real tensors
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if name in signature
             and (signature[name][0] == "*" or signature[name] in ("i32", "i64"))}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_all_for_sm90():
    """Run in a child process without TRITON_INTERPRET: a process that imported Triton with it set
    has interpreter versions of Triton's own helpers (tl.sum's combine function...) and cannot
    compile."""
    results = {}
    for dtype, ty in TRITON_TY.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        finish = {"partial_ptr": f"*{acc}", "scalars_ptr": f"*{acc}", "scale_ptr": f"*{acc}",
                  "loss_ptr": f"*{acc}", "B": "i32", "C": "i32"}
        jobs = {
            "sum_squares": (gp_mod._sum_squares_kernel,
                            {"g_ptr": f"*{ty}", "partial_ptr": f"*{acc}", "row_stride": "i64",
                             "N": "i32", "C": "i32"}, {"BLOCK": 4096}, 8),
            "finish": (gp_mod._penalty_finish_kernel, finish,
                       {"ONE_SIDED": True, "BLOCK_B": 256, "BLOCK_C": 16}, 8),
            "finish1": (gp_mod._penalty_finish_kernel, finish,      # rows of one chunk
                        {"ONE_SIDED": False, "BLOCK_B": 4096, "BLOCK_C": 1}, 8),
            "backward": (gp_mod._penalty_backward_kernel,
                         {"g_ptr": f"*{ty}", "scale_ptr": f"*{acc}", "grad_loss_ptr": f"*{acc}",
                          "out_ptr": f"*{ty}", "row_stride": "i64", "N": "i32", "C": "i32"},
                         {"BLOCK": 4096}, 8),
            "clip": (clip_mod._clip_kernel, {"anchor_ptr": f"*{ty}", "block_start_ptr": "*i64",
                                             "block_count_ptr": "*i32", "bounds_ptr": f"*{ty}"},
                     {"BLOCK": 4096, "ALIGN": 16 // torch.empty(0, dtype=dtype).element_size()}, 8),
        }
        for name, job in jobs.items():
            try:
                ptx = compile_sm90(*job).asm["ptx"]
            except Exception as e:
                results[f"{name} {ty}"] = f"{type(e).__name__}: {e}"
                continue
            results[f"{name} {ty}"] = "ok"
            # the alignment hint works: full blocks use 128-bit loads and stores
            if name == "clip":
                vector = r"\.v2\.b64" if dtype == torch.float64 else r"\.v4\.b32"
                for op in ("ld", "st"):
                    if not re.search(op + r"\.global\S*" + vector, ptx):
                        results[f"{name} {ty}"] = f"compiled, but without 128-bit {op}.global"
    return results


def can_compile_sm90():
    """Triton's NVIDIA backend, and the ASTSource(constexprs=...) of Triton 3.2 and newer (an
    internal API that older Triton spells otherwise)."""
    try:
        import inspect

        from triton.backends import backends
        from triton.compiler import ASTSource
        return "nvidia" in backends and "constexprs" in inspect.signature(ASTSource).parameters
    except Exception:
        return False


@pytest.fixture(scope="module")
def sm90_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--compile-sm90"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON or not can_compile_sm90(),
                    reason="Triton without its NVIDIA backend, or older than 3.2")
@pytest.mark.parametrize("kernel", ["sum_squares", "finish", "finish1", "backward", "clip"])
@pytest.mark.parametrize("dtype", list(TRITON_TY), ids=str)
def test_kernel_compiles_for_sm90(sm90_results, kernel, dtype):
    assert sm90_results[f"{kernel} {TRITON_TY[dtype]}"] == "ok"


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    print(json.dumps(compile_all_for_sm90()))
