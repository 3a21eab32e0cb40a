"""Fused GPU kernels for the GAN scripts, each with a plain PyTorch fallback under the same signature.

    from kernels import gradient_penalty, clip_weights_
    gp = gradient_penalty(grads, weight=10.0, target=1.0, one_sided=False)   # grads: autograd.grad(create_graph=True)
    clip_weights_(critic.parameters(), c=0.01)                                # in place, returns None

gradient_penalty  WGAN-GP: weight * mean_b (||grads_b||_2 - target)^2, norm over all non-batch axes, float32
                  accumulation; a custom backward continues into the critic's double-backward graph.
clip_weights_     WGAN: clamp every floating-point parameter to [-c, c], one kernel launch per (device, dtype).

Both take impl="auto" | "triton" | "torch" (as StyleGAN2-ADA's bias_act takes impl="cuda" | "ref"):
  "auto"    the Triton kernel for CUDA tensors when Triton imports and the kernel compiles, else the fallback
            (CPU, MPS, no Triton); a kernel that fails at first use warns once and the fallback takes over.
  "triton"  force the kernel; on CPU tensors it runs only in Triton's interpreter (TRITON_INTERPRET=1 set
            before this package is imported), which is how the tests run without a GPU.
  "torch"   force the fallback: the few plain PyTorch lines that define what the kernels compute.
Environment: GAN_KERNELS=torch makes "auto" pick the fallback everywhere (an explicit impl="triton" still
runs the kernel); any other value, or none, leaves the choice to "auto".
"""
from .clip import clip_weights_
from .gradient_penalty import gradient_penalty

__all__ = ["gradient_penalty", "clip_weights_"]
