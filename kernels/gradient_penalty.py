"""Gradient penalty of WGAN-GP (Gulrajani et al. 2017): weight * mean_b (||grads_b||_2 - target)^2.

Read in this order: `gradient_penalty` (the public op, one signature for both paths), the PyTorch
reference it falls back to, then the Triton path: the autograd.Function, its launches, the kernels.

Forward, two launches, deterministic (no atomics; every sum is taken in a fixed order):
  1. `_sum_squares_kernel`: one program per (row, chunk of BLOCK elements) writes the chunk's sum of
     squares, accumulated in float32 (float64 for float64 input), to partial[row, chunk].
  2. `_penalty_finish_kernel`: one program adds each row's chunks in order, takes the norm, the loss
     and the per-row factor that the backward needs.
Backward, one launch: `_penalty_backward_kernel` scales each row of `grads` by its factor. The
result flows on into the graph that made `grads` (autograd.grad(..., create_graph=True)): the
critic's double backward.
"""
import contextlib
import functools

import torch

from ._dispatch import INTERPRET, first_use, jit, tl, triton, use_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def gradient_penalty(grads, weight=10.0, target=1.0, one_sided=False, impl="auto"):
    """WGAN-GP's penalty: weight * mean_b f(||grads_b||_2 - target), f(d) = d^2 (max(0, d)^2 if
    one_sided).

    grads:  (B, ...) the critic's gradient w.r.t. its input, from
            torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)[0]; the norm is over
            all non-batch axes. float32, float16, bfloat16 or float64; any layout.
    impl:   "auto" (default): on CUDA tensors the path that was faster end to end (see
            kernels/_dispatch.py), else the PyTorch reference; "triton": the fused kernels (CPU
            tensors only under TRITON_INTERPRET=1); "torch": the reference. GAN_KERNELS=torch or
            =triton makes "auto" take that path.
    Returns a 0-dim tensor, float32 (float64 for float64 grads); sums of squares are accumulated in
    float32. loss.backward() flows on into the graph that produced `grads`. A row whose norm is zero
    gets a zero gradient, as torch's norm gives.
    """
    if (grads.dtype in _DTYPES and grads.dim() >= 2 and grads.numel() > 0
            and use_triton(impl, grads, "gradient_penalty")):
        return first_use(("gradient_penalty forward", grads.dtype),
                         ("gradient_penalty", grads.dtype), impl,
                         lambda: _GradientPenalty.apply(grads, weight, target, one_sided, impl),
                         lambda: _gradient_penalty_torch(grads, weight, target, one_sided))
    return _gradient_penalty_torch(grads, weight, target, one_sided)


# %% The PyTorch reference
def _gradient_penalty_torch(grads, weight=10.0, target=1.0, one_sided=False):
    g = grads.flatten(1)                              # the norm is over all non-batch axes
    if g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()                                 # accumulate in float32
    d = g.norm(2, dim=1) - target
    if one_sided:
        d = d.clamp(min=0)
    return weight * d.square().mean()


# %% The Triton path
class _GradientPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grads, weight, target, one_sided, impl):
        g = _rows(grads)
        loss, scale = _triton_forward(g, weight, target, one_sided)
        ctx.save_for_backward(g, scale)
        ctx.shape, ctx.impl = grads.shape, impl
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        g, scale = ctx.saved_tensors
        grad = first_use(("gradient_penalty backward", g.dtype), ("gradient_penalty", g.dtype),
                         ctx.impl, lambda: _triton_backward(g, scale, grad_loss),
                         lambda: (g.to(scale.dtype) * (scale * grad_loss)[:, None]).to(g.dtype))
        return grad.view(ctx.shape), None, None, None, None


def _rows(grads):
    """(B, ...) -> a (B, N) view with contiguous rows (a copy only when the layout allows none)."""
    g = grads.flatten(1)
    return g if g.stride(1) == 1 else g.contiguous()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=16)
def _scalars(weight, target, dtype, device):
    # [weight, target] in the accumulation dtype (a float64 penalty keeps float64 constants; a
    # Python float argument would reach the kernel as float32), made once: no copy per call.
    return torch.tensor([weight, target], dtype=dtype, device=device)


def _block_size(N):
    if INTERPRET:                     # the interpreter pays per program: one program per row
        return min(triton.next_power_of_2(N), 1 << 16)
    # up to 4096 elements (16 KiB of float32) per program; for short rows (MNIST: 784) one program
    # per row without wasting most lanes
    return max(128, min(triton.next_power_of_2(N), 4096))


def _num_warps(block):
    return 4 if block <= 1024 else 8  # 8 or 16 elements per thread: 128-bit loads, bytes in flight


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _triton_forward(g, weight, target, one_sided):
    B, N = g.shape
    acc = _acc_dtype(g.dtype)
    block = _block_size(N)
    C = triton.cdiv(N, block)
    partial = torch.empty(B * C, dtype=acc, device=g.device)
    scale = torch.empty(B, dtype=acc, device=g.device)
    loss = torch.empty((), dtype=acc, device=g.device)
    # finish: tiles of up to 4096 partial sums (64 Ki in the interpreter), so that B <= 4096 / C
    # rows take one loop iteration; it is a single program, its latency is what counts
    block_c = min(triton.next_power_of_2(C), 64)
    block_b = min(triton.next_power_of_2(B), max(1, (1 << 16 if INTERPRET else 4096) // block_c))
    with _device(g):
        _sum_squares_kernel[(B * C,)](g, partial, g.stride(0), N, C, BLOCK=block,
                                      num_warps=_num_warps(block))
        _penalty_finish_kernel[(1,)](partial, _scalars(float(weight), float(target), acc, g.device),
                                     scale, loss, B, C, ONE_SIDED=bool(one_sided), BLOCK_B=block_b,
                                     BLOCK_C=block_c, num_warps=8)
    return loss, scale


def _triton_backward(g, scale, grad_loss):
    B, N = g.shape
    block = _block_size(N)
    C = triton.cdiv(N, block)
    out = torch.empty((B, N), dtype=g.dtype, device=g.device)
    with _device(g):
        _penalty_backward_kernel[(B * C,)](g, scale, grad_loss.to(scale.dtype).contiguous(), out,
                                           g.stride(0), N, C, BLOCK=block,
                                           num_warps=_num_warps(block))
    return out


@jit
def _sum_squares_kernel(g_ptr, partial_ptr, row_stride, N, C, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)          # int64: row * row_stride may pass 2**31
    row = pid // C
    cols = (pid % C) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(g_ptr + row * row_stride + cols, mask=cols < N, other=0.0)
    x = x.to(partial_ptr.dtype.element_ty)       # float32 accumulation (float64 for float64 input)
    tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


@jit
def _penalty_finish_kernel(partial_ptr, scalars_ptr, scale_ptr, loss_ptr, B, C,
                           ONE_SIDED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    weight = tl.load(scalars_ptr)
    target = tl.load(scalars_ptr + 1)
    total = tl.zeros([BLOCK_B], dtype=partial_ptr.dtype.element_ty)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        sum_sq = tl.zeros([BLOCK_B], dtype=partial_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < B) & (cols[None, :] < C)
            sum_sq += tl.sum(tl.load(partial_ptr + rows[:, None] * C + cols[None, :], mask=mask,
                                     other=0.0), axis=1)
        norm = tl.sqrt(sum_sq)
        d = norm - target
        if ONE_SIDED:
            d = tl.maximum(d, 0.0)
        total += tl.where(rows < B, d * d, 0.0)
        # d loss / d grads_b = weight / B * f'(d_b) * grads_b / norm_b, f'(d) = 2 d; zero for a
        # zero-norm row (as torch's norm backward), computed without dividing by zero
        factor = tl.where(norm > 0, 2.0 * d / tl.where(norm > 0, norm, 1.0), 0.0) * weight / B
        tl.store(scale_ptr + rows, factor, mask=rows < B)
    tl.store(loss_ptr, weight * tl.sum(total, axis=0) / B)


@jit
def _penalty_backward_kernel(g_ptr, scale_ptr, grad_loss_ptr, out_ptr, row_stride, N, C,
                             BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // C
    cols = (pid % C) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    s = tl.load(scale_ptr + row) * tl.load(grad_loss_ptr)    # grad_loss read on the device: no sync
    x = tl.load(g_ptr + row * row_stride + cols, mask=mask, other=0.0).to(s.dtype)
    tl.store(out_ptr + row * N + cols, (x * s).to(out_ptr.dtype.element_ty), mask=mask)
