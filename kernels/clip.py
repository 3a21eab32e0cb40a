"""Weight clipping of WGAN (Arjovsky et al. 2017): every critic parameter clamped to [-c, c] after
each critic step.

Read in this order: `clip_weights_` (the public op), the PyTorch reference, then the Triton path.
One launch per (device, dtype) group clamps all of its parameters. The kernel walks a table with an
entry per block of BLOCK elements: where the block starts, as an int64 element offset from one of
the group's parameters (the "anchor", an ordinary pointer argument), and how many elements it
holds. The table is built once and cached on the device: a call makes no host-to-device copy. It is
rebuilt when the parameter list or a data pointer changes.
"""
import contextlib
import operator
import weakref

import torch

from ._dispatch import INTERPRET, first_use, jit, tl, use_triton


def clip_weights_(params, c, impl="auto"):
    """WGAN weight clipping: clamp every floating-point parameter to [-c, c] in place; returns None.

    params: an iterable of tensors, e.g. critic.parameters() (a generator is fine); tensors that are
            not floating point are left alone.
    c:      the bound (WGAN: 0.01).
    impl:   "auto" (default): on CUDA tensors the path that was faster end to end (see
            kernels/_dispatch.py), else the PyTorch reference (`p.clamp_(-c, c)` for every p,
            as torch._foreach_clamp_min_ and _foreach_clamp_max_ on the list, under no_grad);
            "triton": the kernel, one launch per (device, dtype) (CPU tensors only under
            TRITON_INTERPRET=1); "torch": the reference. GAN_KERNELS=torch or =triton makes
            "auto" take that path.
    The result is bit-equal to torch.clamp; the bounds are converted to the parameter dtype once, as
    clamp_ does. A non-contiguous (or not 16-byte aligned) parameter is clamped by the reference.
    """
    params = list(params)
    c = float(c)
    if impl == "torch" or (impl == "auto" and not (params and use_triton(impl, params[0],
                                                                         "clip_weights_"))):
        return _clip_torch_([p for p in params if p.is_floating_point()], c)
    plan = _plan_for(params)
    launched = False
    for group in plan.groups:
        if group.strided:
            _clip_torch_([params[i] for i in group.strided], c)
        if not group.dense:
            continue
        if group.device.type == "cuda" and INTERPRET and impl == "triton":
            raise RuntimeError("clip_weights_: impl='triton' under TRITON_INTERPRET=1 works on CPU "
                               "tensors only")
        if use_triton(impl, params[group.dense[0]], "clip_weights_"):
            first_use(("clip_weights_", group.dtype), ("clip_weights_", group.dtype), impl,
                      lambda: _launch(params, group, c),
                      lambda: _clip_torch_([params[i] for i in group.dense], c))
            launched = True
        else:
            _clip_torch_([params[i] for i in group.dense], c)
    if launched:
        _bump_versions(params)


# %% The PyTorch reference
@torch.no_grad()
def _clip_torch_(tensors, c):
    # p.clamp_(-c, c) for every p, in two multi-tensor launches on CUDA (one per tensor where
    # devices or dtypes are mixed, and on CPU): bit-equal to clamp_, NaN kept; no table, no cache
    if tensors:
        torch._foreach_clamp_min_(tensors, -c)
        torch._foreach_clamp_max_(tensors, c)


# %% The Triton path: the table of blocks, cached per parameter list, then the kernel
# GPU: 4096 elements per program with 8 warps (16 per thread: four 128-bit accesses in float32);
# the interpreter pays per program, so there a block is 64 Ki elements.
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 8


class _Group:
    """The parameters of one (device, dtype): `dense` ones go to the kernel, `strided` to the
    reference."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.dense, self.strided = [], []     # indices into the parameter list
        self.table = None                     # (anchor index, block starts, block counts)
        self.c, self.bounds = None, None

    def build_table(self, params):
        anchor_ptr = params[self.dense[0]].data_ptr()
        size = params[self.dense[0]].element_size()
        starts, counts = [], []
        for i in self.dense:
            first, n = (params[i].data_ptr() - anchor_ptr) // size, params[i].numel()
            starts += range(first, first + n, BLOCK)
            counts += [BLOCK] * (n // BLOCK) + ([n % BLOCK] if n % BLOCK else [])
        self.table = (self.dense[0], torch.tensor(starts, dtype=torch.int64, device=self.device),
                      torch.tensor(counts, dtype=torch.int32, device=self.device))

    def bounds_for(self, c):
        if self.c != c:                       # one small copy when c changes, not every step
            self.c, self.bounds = c, torch.tensor([-c, c], dtype=self.dtype, device=self.device)
        return self.bounds


class _Plan:
    def __init__(self, params):
        self.refs = [weakref.ref(p) for p in params]
        groups = {}
        for i, p in enumerate(params):
            if not p.is_floating_point() or p.numel() == 0:
                continue
            group = groups.setdefault((p.device, p.dtype), _Group(p.device, p.dtype))
            # Clamping is elementwise, so any dense layout can be walked as a flat array; a 16-byte
            # aligned start keeps the kernel's alignment hint true (the caching allocator gives 512)
            dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
                memory_format=torch.channels_last))
            (group.dense if dense and p.data_ptr() % 16 == 0 else group.strided).append(i)
        self.groups = list(groups.values())

    def is_for(self, params):
        return all(map(operator.is_, [r() for r in self.refs], params))


_plans = {}                                   # tuple of data pointers -> _Plan
_MAX_PLANS = 8


def _plan_for(params):
    # Keyed by every data pointer (a moved, re-allocated or swapped `.data` gives a new plan) and
    # checked against the parameter objects themselves (a new model whose tensors reuse the freed
    # addresses of an old one, e.g. in another dtype, must not inherit its table).
    key = tuple(map(torch.Tensor.data_ptr, params))
    plan = _plans.get(key)
    if plan is None or not plan.is_for(params):
        if len(_plans) >= _MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        plan = _plans[key] = _Plan(params)
    return plan


def _bump_versions(tensors):
    # The kernel writes behind autograd's back; tell autograd, as an in-place torch op would.
    try:
        torch.autograd.graph.increment_version(tensors)
    except (TypeError, RuntimeError):         # older torch: one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _launch(params, group, c):
    if group.table is None:
        group.build_table(params)
    anchor, starts, counts = group.table
    cuda = group.device.type == "cuda"
    with torch.cuda.device(group.device) if cuda else contextlib.nullcontext():
        _clip_kernel[(starts.numel(),)](params[anchor], starts, counts, group.bounds_for(c),
                                        BLOCK=BLOCK, num_warps=NUM_WARPS,
                                        ALIGN=max(1, 16 // params[anchor].element_size()))


@jit
def _clip_kernel(anchor_ptr, block_start_ptr, block_count_ptr, bounds_ptr, BLOCK: tl.constexpr,
                 ALIGN: tl.constexpr):
    pid = tl.program_id(0)
    # Every block starts on a 16-byte boundary (checked on the host): the hint lets full blocks use
    # 128-bit loads and stores although the start is read from memory.
    start = tl.multiple_of(tl.load(block_start_ptr + pid), ALIGN)
    count = tl.load(block_count_ptr + pid)
    lo = tl.load(bounds_ptr)                 # bounds in the parameter dtype: float64 c stays exact
    hi = tl.load(bounds_ptr + 1)
    ptrs = anchor_ptr + start + tl.arange(0, BLOCK)
    # torch.clamp semantics: NaN stays NaN (comparisons with NaN are false), max(min(...)) order.
    if count == BLOCK:                       # a full block: no mask, so the accesses vectorise
        x = tl.load(ptrs)
        x = tl.where(x < lo, lo, x)
        x = tl.where(x > hi, hi, x)
        tl.store(ptrs, x)
    else:                                    # the last block of a parameter
        mask = tl.arange(0, BLOCK) < count
        x = tl.load(ptrs, mask=mask)
        x = tl.where(x < lo, lo, x)
        x = tl.where(x > hi, hi, x)
        tl.store(ptrs, x, mask=mask)
