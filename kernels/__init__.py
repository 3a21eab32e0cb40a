"""Fused GPU kernels for the GAN scripts, each with a plain PyTorch reference under one signature.

    from kernels import gradient_penalty, clip_weights_
    gp = gradient_penalty(grads, weight=10.0, target=1.0, one_sided=False)  # autograd.grad output
    clip_weights_(critic.parameters(), c=0.01)                               # in place

gradient_penalty  WGAN-GP: weight * mean_b (||grads_b||_2 - target)^2, the norm over all non-batch
                  axes, float32 sums; its backward flows on into the critic's double backward.
clip_weights_     WGAN: clamp every floating-point parameter to [-c, c], a launch per device/dtype.

Both take impl="auto" | "triton" | "torch"; kernels/_dispatch.py says how "auto" chooses (per op,
from the last end-to-end measurement), and how GAN_KERNELS=torch or =triton overrides it.
"""
from .clip import clip_weights_
from .gradient_penalty import gradient_penalty

__all__ = ["gradient_penalty", "clip_weights_"]
