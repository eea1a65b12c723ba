"""Layers with a choice of convolution implementation.

XLA's CPU convolutions are slow on small machines (see DESIGN.md). ``impl="xla"`` uses
``lax.conv``; ``impl="im2col"`` writes a 3×3 "same" convolution as patches + one matmul
(the faster form under ``vmap``-ped kernels on the CPU); ``impl="ffi"`` runs the 3×3
convolutions in our CPU kernels (`vcl_jax.kernels.conv3x3`: faster than XLA's at the
U-Net's sizes, BENCHMARKS.md), with ``lax.conv`` for the layers they
do not cover. All compute the same function with the parameter layout of
``flax.linen.Conv`` (kernel ``[kh, kw, in, out]``), so a checkpoint works with any of them.

Transposed convolutions here have stride equal to kernel size (the U-Net's 2×2/2
up-sampling and the k×k projection of the 1×1 bottleneck), so each output pixel
depends on one input pixel: they are a matmul and a reshape, in both impls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcl_jax.kernels import conv3x3 as cpu_conv

IMPLS = ("xla", "im2col", "ffi")
CONV_IMPLS = ("auto", *IMPLS)  # what a config may ask for; "auto" is resolved by `resolve_impl`

# U(−√(15/fan_in), +√(15/fan_in)): the VCL-diffusion paper's weight (mean) init.
paper_uniform = nn.initializers.variance_scaling(5.0, "fan_in", "uniform")
# PyTorch's default for conv and linear weights (``kaiming_uniform_(a=√5)``): U(±1/√fan_in),
# as in the VCL-diffusion author's code; PyTorch takes a transposed conv's fan-in from its
# *output* channels (``torch_uniform_transpose``).
torch_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
torch_uniform_transpose = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                           in_axis=-1, out_axis=-2)
INITS = ("paper", "pytorch")


def kernel_init(init: str, *, transpose: bool = False) -> Callable:
    """The weight initializer named by a config's ``init`` (``paper`` or ``pytorch``)."""
    if init == "paper":
        return paper_uniform
    if init == "pytorch":
        return torch_uniform_transpose if transpose else torch_uniform
    raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")


def resolve_impl(impl: str, vmapped_kernels: bool) -> str:
    """The convolution implementation for a config's ``impl`` (``auto``, ``xla``, ``im2col``,
    ``ffi``).

    ``auto`` is ``xla`` on accelerators. On the CPU it is ``ffi`` where our kernels build
    (`vcl_jax.kernels.conv3x3.available`) and the run has one device; otherwise ``im2col``
    where the kernels are ``vmap``-ped (VCL's weight draws: ``vmap`` turns a batched kernel
    into a grouped convolution, which XLA:CPU runs ~40× slower than the plain one,
    ``BENCHMARKS.md``) and ``xla`` elsewhere. Asking for ``ffi`` where the kernels cannot
    run is an error that says why.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; accepted: {', '.join(CONV_IMPLS)}")
    if impl == "ffi":
        ok, why = cpu_conv.available()
        if not ok:
            raise ValueError(f"conv impl 'ffi' is unavailable here: {why}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    # Our kernels are custom calls, which XLA does not split over devices: with several
    # (data parallel, or several processes) each device would convolve the whole batch.
    if cpu_conv.available()[0] and jax.device_count() == 1:
        return "ffi"
    return "im2col" if vmapped_kernels else "xla"


def conv_same(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """Stride-1 'SAME' convolution of ``x: [B, H, W, C]`` with ``kernel: [kh, kw, C, O]``."""
    kh, kw, c, o = kernel.shape
    if impl == "ffi":
        if kh == kw == 3 and x.dtype == jnp.float32 and cpu_conv.supports(o):
            return cpu_conv.conv3x3(x, kernel)
        if o < c:  # few outputs (the U-Net's last conv, 64 → 1): one matmul, then 9 shifts
            return conv_taps_first(x, kernel)
        impl = "xla"  # the other layers our kernels do not cover
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


def conv_taps_first(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'SAME' convolution as one matmul ``x @ [C, kh·kw·O]`` (every tap's
    contribution at every pixel) followed by a sum of the kh·kw shifted tap maps. For few
    output channels the tap maps are small, so this beats XLA:CPU's convolution (forward and
    both gradients are matmuls and shifts); the same function as ``lax.conv``."""
    kh, kw, c, o = kernel.shape
    b, h, w, _ = x.shape
    taps = (x @ kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * o)).reshape(b, h, w, kh, kw, o)
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    taps = jnp.pad(taps, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0), (0, 0), (0, 0)))
    return sum(taps[:, i:i + h, j:j + w, i, j] for i in range(kh) for j in range(kw))


class Conv(nn.Module):
    """Stride-1 'SAME' convolution; same params as ``nn.Conv``.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      impl: ``xla``, ``im2col`` or ``ffi`` (`conv_same`).
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


def _channel_sums(v: jax.Array) -> jax.Array:
    """Sums of ``[B, ..., C]`` over every axis but the first and the last: ``[B, C]``."""
    return v.sum(tuple(range(1, v.ndim - 1)))


def _group_mean(v: jax.Array, groups: int, n: int) -> jax.Array:
    """``[B, C]`` per-channel sums → ``[B, C]`` means over each group (``n`` elements each)."""
    b, c = v.shape
    return jnp.repeat(v.reshape(b, groups, c // groups).sum(-1) / n, c // groups, axis=-1)


def _group_size(x: jax.Array, groups: int) -> int:
    """Elements per example and group of ``x: [B, ..., C]``."""
    return x.size // (x.shape[0] * groups)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """``[B, C]`` → ``[B, 1, ..., 1, C]`` broadcastable against ``like``."""
    return v.reshape((v.shape[0],) + (1,) * (like.ndim - 2) + (v.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               epsilon: float) -> jax.Array:
    """GroupNorm of ``x: [B, ..., C]`` over (spatial axes, C/G channels), with Flax's math
    (``E[x²] − E[x]²`` variance clipped at 0, ``rsqrt(var + ε)``).

    The statistics are per-channel sums over the spatial axes followed by a sum over each
    group's channels; the gradient is the closed form (one pass for the per-channel sums of
    ``dy`` and ``dy·x``, one elementwise pass for ``dx``). XLA:CPU runs Flax's reduction over
    (H, W, C/G) several times below memory speed, and the autodiff of either form re-reads the
    activations more often (``BENCHMARKS.md``).
    """
    return _group_norm_fwd(x, scale, bias, groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon):
    n = _group_size(x, groups)
    mean = _group_mean(_channel_sums(x), groups, n)
    var = jnp.maximum(0.0, _group_mean(_channel_sums(jnp.square(x)), groups, n) - jnp.square(mean))
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - _bcast(mean, x)) * _bcast(rstd * scale, x) + bias
    return y, (x, scale, mean, rstd)


def _group_norm_bwd(groups, epsilon, res, dy):
    x, scale, mean, rstd = res
    n = _group_size(x, groups)
    s_dy, s_dyx = _channel_sums(dy), _channel_sums(dy * x)  # [B, C]
    s_dyxhat = rstd * (s_dyx - mean * s_dy)  # Σ dy·x̂ per channel
    m1 = _group_mean(scale * s_dy, groups, n)  # group mean of dx̂ = dy·scale
    m2 = _group_mean(scale * s_dyxhat, groups, n)  # group mean of dx̂·x̂
    a = rstd * scale
    k = -jnp.square(rstd) * m2
    dx = _bcast(a, x) * dy + _bcast(k, x) * x + _bcast(-k * mean - rstd * m1, x)
    return dx, s_dyxhat.sum(0), s_dy.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm`` over ``[B, ..., C]`` (same params, epsilon and math) computed by
    `group_norm`. Agreement with ``nn.GroupNorm`` (values and gradients, to float rounding) and
    the same parameter tree are tested (``tests/test_models.py``).

    Attributes:
      num_groups: number of channel groups (divides C).
      epsilon: added to the variance, as in Flax (1e-6).
    """

    num_groups: int
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return group_norm(x, scale, bias, self.num_groups, self.epsilon)


def max_pool2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, ``[B, H, W, C] → [B, H/2, W/2, C]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
