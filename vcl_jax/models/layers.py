"""Layers with a choice of convolution implementation.

XLA's CPU convolutions are slow on small machines (see DESIGN.md); a 3×3 "same"
convolution written as patches + one matmul ("im2col") runs several times
faster there, with identical math. ``impl="xla"`` uses ``lax.conv``; ``impl="im2col"``
the patches form. Both share the parameter layout of ``flax.linen.Conv``
(kernel ``[kh, kw, in, out]``), so a checkpoint works with either.

Transposed convolutions here have stride equal to kernel size (the U-Net's 2×2/2
up-sampling and the k×k projection of the 1×1 bottleneck), so each output pixel
depends on one input pixel: they are a matmul and a reshape, in both impls.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ("xla", "im2col")
CONV_IMPLS = ("auto", *IMPLS)  # what a config may ask for; "auto" is resolved by `resolve_impl`

# U(−√(15/fan_in), +√(15/fan_in)): the VCL-diffusion paper's weight (mean) init.
paper_uniform = nn.initializers.variance_scaling(5.0, "fan_in", "uniform")


def resolve_impl(impl: str, vmapped_kernels: bool) -> str:
    """The convolution implementation for a config's ``impl`` (``auto``, ``xla``, ``im2col``).

    ``auto`` is ``xla`` except where the kernels are ``vmap``-ped (VCL's weight draws) on a
    CPU backend: ``vmap`` turns a batched kernel into a grouped convolution, which XLA:CPU
    runs ~40× slower than the plain one (``BENCHMARKS.md``), while the patches form becomes
    a batched matmul. Both forms compute the same function with the same params.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; accepted: {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    return "im2col" if vmapped_kernels and jax.default_backend() == "cpu" else "xla"


def conv_same(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """Stride-1 'SAME' convolution of ``x: [B, H, W, C]`` with ``kernel: [kh, kw, C, O]``."""
    kh, kw, c, o = kernel.shape
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if impl != "im2col":
        raise ValueError(f"unknown conv impl {impl!r}; accepted: {', '.join(IMPLS)}")
    if kh == kw == 1:
        return x @ kernel.reshape(c, o)
    b, h, w, _ = x.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    patches = jnp.concatenate(
        [xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ kernel.reshape(kh * kw * c, o)


class Conv(nn.Module):
    """Stride-1 'SAME' convolution; same params as ``nn.Conv``.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      impl: ``xla`` or ``im2col``.
    """

    features: int
    kernel_size: int = 3
    impl: str = "im2col"
    kernel_init: Callable = paper_uniform

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return conv_same(x, kernel, self.impl) + bias


class PatchTranspose(nn.Module):
    """Transposed convolution with stride = kernel = ``size``: ``[B, H, W, C] → [B, sH, sW, O]``."""

    features: int
    size: int = 2
    kernel_init: Callable = paper_uniform

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, (b, h, w, c) = self.size, x.shape
        kernel = self.param("kernel", self.kernel_init, (s, s, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel)
        return y.reshape(b, h * s, w * s, self.features) + bias


def max_pool2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, ``[B, H, W, C] → [B, H/2, W/2, C]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
