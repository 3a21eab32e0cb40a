"""How an op of this package picks its path: the Triton kernel or the plain PyTorch reference.

Both ops take impl="auto" | "triton" | "torch" (as StyleGAN2-ADA's bias_act: impl="cuda" | "ref"):
  "auto"    the path that was faster end to end on a CUDA GPU for that op (AUTO_ON_CUDA below),
            the reference on CPU, MPS or without Triton. A kernel that fails at its first use
            warns once, and the reference takes over for that op and dtype.
  "triton"  the kernel, always; CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 set
            before this package is imported: that is how the tests run without a GPU).
  "torch"   the reference: the few plain PyTorch lines that define what the kernel computes.
GAN_KERNELS=torch or GAN_KERNELS=triton in the environment makes "auto" take that path for CUDA
tensors; an explicit impl is always obeyed.
"""

import os
import types
import warnings

try:
    import triton
    import triton.language as tl
except Exception:                    # no Triton (macOS, Windows, some CPU-only installs): the
    triton = None                    # kernels are defined but never run; their annotations need tl
    tl = types.SimpleNamespace(constexpr=int)

ENV_VAR = "GAN_KERNELS"
# What "auto" takes for CUDA tensors, per op: the faster path end to end in the last measurement
# (H100, torch 2.11, triton 3.6, 2026-11-25, eager training steps of benchmarks/train_speed.py).
# Both kernels lost there: the loop was bound by the host's time per launch, and a Triton launch
# from Python costs more of it than the reference's few ATen ops (wgan_gp.py 4.8k critic img/s
# with the penalty kernel, 5.0k with the reference; wgan.py --no-critic-warmup 11.0k with the clip
# kernel, 14.2k with the reference, then a clamp_ per parameter). The clipping reference is now two
# multi-tensor launches (torch._foreach_clamp_min_/_max_), not measured yet: no figure says the
# kernel beats it, so "torch" stays. benchmarks/gpu_check.sh measures both ops again, eager and
# inside a captured step (--cuda-graph), where a launch costs no host time; set "triton" here only
# for an op where the kernel then wins end to end.
AUTO_ON_CUDA = {"gradient_penalty": "torch", "clip_weights_": "torch"}
# triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when this package is imported
INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"
_worked, _broken = set(), set()      # (op or kernel, dtype) that ran, or failed at first use


def jit(fn):
    """triton.jit, or the plain function when there is no Triton (its kernel is then never run)."""
    return triton.jit(fn) if triton is not None else fn


def use_triton(impl, t, op):
    """Whether `op` on tensor `t` runs the Triton kernel, for impl "auto", "triton" or "torch"."""
    if impl == "torch":
        return False
    if impl == "triton":
        if triton is None:
            raise RuntimeError(f"{op}: impl='triton' but Triton could not be imported")
        if not t.is_cuda and not INTERPRET:
            raise RuntimeError(
                f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                f"before `kernels` is imported, for CPU tensors)"
            )
        return True
    if impl != "auto":
        raise ValueError(f"{op}: impl must be 'auto', 'triton' or 'torch', not {impl!r}")
    return (
        triton is not None
        and t.is_cuda
        and not INTERPRET
        and os.environ.get(ENV_VAR, AUTO_ON_CUDA.get(op, "triton")) == "triton"
        and (op, t.dtype) not in _broken
    )


def first_use(kernel_key, op_key, impl, fast, slow):
    """Run `fast` (the kernel). Under impl="auto", a failure before this kernel has ever worked (no
    compiler for this GPU, this dtype, this Triton) warns once, sends the op to the reference from
    then on, and returns `slow()`. A kernel that has worked once, or a forced impl, never hides."""
    if impl != "auto" or kernel_key in _worked:
        return fast()
    try:
        out = fast()
    except Exception as e:
        _broken.add(op_key)
        warnings.warn(
            f"kernels: Triton {kernel_key[0]} ({kernel_key[1]}) failed at first use, "
            f"using the PyTorch reference from now on: {type(e).__name__}: {e}",
            RuntimeWarning,
        )
        return slow()
    _worked.add(kernel_key)
    return out
