"""The CPU convolution kernels (`vcl_jax.kernels.conv3x3`) against ``lax.conv``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.kernels import conv3x3 as cpu_conv
from vcl_jax.models import layers
from vcl_jax.models.unet import ContextUNet

OK, WHY = cpu_conv.available()
needs_kernels = pytest.mark.skipif(not OK, reason=f"CPU kernels unavailable: {WHY}")


def _xla(x, k):
    return layers.conv_same(x, k, "xla")


def _value_and_grads(conv, x, k, ct, input_grad=True):
    """The conv's output and the gradients of <conv(x, k), ct> (w.r.t. x and k), jitted."""
    def run(x, k):
        y, vjp = jax.vjp(conv, x, k)
        dx, dk = vjp(ct)
        return (y, dx, dk) if input_grad else (y, dk)
    return jax.jit(run)(x, k)


def _assert_close(ours, ref, tol=2e-5):
    for a, b in zip(ours, ref, strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=tol)


@needs_kernels
@pytest.mark.parametrize("b,h,w,ci,co", [
    (3, 5, 5, 16, 16),      # one tile row, a partial pixel tile
    (2, 7, 6, 32, 48),      # non-square image, a 3-vector channel tile
    (1, 1, 1, 16, 32),      # a single pixel: every tap but the centre reads the zero border
    (2, 28, 28, 64, 64),    # the U-Net's full-resolution layers
    (2, 6, 9, 80, 112),     # channel tiles 4 + 1 vectors, channel rows 6 x 13 + 2
])
def test_conv3x3_equals_lax_conv(b, h, w, ci, co):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (b, h, w, ci))
    k = jax.random.normal(keys[1], (3, 3, ci, co))
    ct = jax.random.normal(keys[2], (b, h, w, co))
    _assert_close(_value_and_grads(cpu_conv.conv3x3, x, k, ct), _value_and_grads(_xla, x, k, ct))


@needs_kernels
def test_weight_gradient_is_the_same_bits_every_call():
    """The same seed must train to the same numbers: the weight gradient's sum over pixels is
    split among threads, and its order must not depend on which thread took which part.
    Many blocks (a batch of 64 at 28×28) and repeated calls give the scheduler its chances."""
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (64, 28, 28, 16))
    k = jax.random.normal(keys[1], (3, 3, 16, 16))
    ct = jax.random.normal(keys[2], (64, 28, 28, 16))
    grad = jax.jit(jax.grad(lambda k: jnp.vdot(cpu_conv.conv3x3(x, k), ct)))
    first = np.asarray(grad(k))
    for _ in range(30):
        np.testing.assert_array_equal(np.asarray(grad(k)), first)


@needs_kernels
@pytest.mark.parametrize("ci", [1, 7, 24])
def test_conv3x3_input_channels_off_the_vector_width(ci):
    """The U-Net's first conv (1 input channel) and concatenations: the input gradient goes
    through XLA, the forward pass and the weight gradient through the kernels."""
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, 9, 8, ci))
    k = jax.random.normal(keys[1], (3, 3, ci, cpu_conv.lanes()))
    ct = jax.random.normal(keys[2], (2, 9, 8, cpu_conv.lanes()))
    _assert_close(_value_and_grads(cpu_conv.conv3x3, x, k, ct), _value_and_grads(_xla, x, k, ct))


@needs_kernels
def test_conv3x3_under_vmap_of_weight_draws():
    """VCL's weight draws: ``vmap`` over kernels, with the batch mapped (one slice per draw)
    or shared (every draw on the whole batch)."""
    keys = jax.random.split(jax.random.key(2), 3)
    ks = jax.random.normal(keys[0], (3, 3, 3, 16, 32))
    xs = jax.random.normal(keys[1], (3, 2, 6, 6, 16))
    ct = jax.random.normal(keys[2], (3, 2, 6, 6, 32))
    for x_axis in (0, None):
        x = xs if x_axis == 0 else xs[0]

        def loss(conv, x, ks, x_axis=x_axis):
            y = jax.vmap(conv, in_axes=(x_axis, 0))(x, ks)
            return jnp.sum(y * ct)

        ours = jax.jit(jax.value_and_grad(lambda x, k: loss(cpu_conv.conv3x3, x, k), (0, 1)))
        ref = jax.jit(jax.value_and_grad(lambda x, k: loss(_xla, x, k), (0, 1)))
        (lo, (gxo, gko)), (lr, (gxr, gkr)) = ours(x, ks), ref(x, ks)
        np.testing.assert_allclose(lo, lr, rtol=1e-5)
        _assert_close((gxo, gko), (gxr, gkr))


@needs_kernels
@pytest.mark.parametrize("n", [1, 20])  # 20 > _UNROLL: the per-example calls become a loop
def test_conv3x3_under_vmap_of_examples(n):
    """``vmap`` over examples with one kernel (one call on the joined batch) and per-example
    kernel gradients (``vmap`` of ``grad``: one weight-gradient call per example)."""
    assert (n > cpu_conv._UNROLL) == (n == 20)
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (n, 1, 5, 7, 16))
    k = jax.random.normal(keys[1], (3, 3, 16, 16))
    ct = jax.random.normal(keys[2], (n, 1, 5, 7, 16))
    np.testing.assert_allclose(jax.jit(jax.vmap(cpu_conv.conv3x3, (0, None)))(x, k),
                               jax.vmap(_xla, (0, None))(x, k), rtol=1e-4, atol=1e-4)

    def per_example_grads(conv):
        return jax.jit(jax.vmap(jax.grad(lambda k, x, c: jnp.sum(conv(x, k) * c)), (None, 0, 0)))(
            k, x, ct)

    _assert_close([per_example_grads(cpu_conv.conv3x3)], [per_example_grads(_xla)])


@needs_kernels
def test_conv3x3_rejects_what_it_cannot_compute():
    x = jnp.ones((1, 4, 4, 16))
    with pytest.raises(ValueError, match="output channels a multiple of"):
        cpu_conv.conv3x3(x, jnp.ones((3, 3, 16, 3)))
    with pytest.raises(ValueError, match="3×3 kernel"):
        cpu_conv.conv3x3(x, jnp.ones((5, 5, 16, 16)))


@needs_kernels
# 8: the 8-channel layers fall back to lax.conv; 16 (every layer in our kernels) is slow: ~30 s
@pytest.mark.parametrize("n_feat", [pytest.param(16, marks=pytest.mark.slow), 8])
def test_unet_with_ffi_convs_equals_xla_convs(n_feat):
    b = 3
    args = (jax.random.normal(jax.random.key(0), (b, 28, 28, 1)), jnp.full((b,), 0.3),
            jnp.array([0, 1, 2]), jnp.array([1.0, 0.0, 1.0]))
    ref = ContextUNet(n_feat=n_feat, n_tasks=3, embed_dim=4, impl="xla")
    ffi = ref.clone(impl="ffi")
    params = jax.jit(ref.init)(jax.random.key(1), *args)

    def loss_and_grads(model):
        # At XLA's default optimisation, as the experiments run: at the suite's LLVM level 1
        # (conftest) XLA:CPU's gradient of this U-Net differs from level 3's by 3% of its
        # largest entry whichever convolutions it uses, and the two disagree with each other
        # (NaN at level 0; benchmarks/xla_opt_levels.py)
        f = jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, *args) ** 2)))
        return f.lower(params).compile(
            compiler_options={"xla_backend_optimization_level": 3})(params)

    (l_ref, g_ref), (l_ffi, g_ffi) = loss_and_grads(ref), loss_and_grads(ffi)
    np.testing.assert_allclose(l_ffi, l_ref, rtol=1e-5)
    # relative to the largest gradient: the conv biases before GroupNorm have gradients ~0
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
    for a, r in zip(jax.tree.leaves(g_ffi), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(r) / scale, atol=1e-5)


def test_missing_compiler_is_a_clear_error(tmp_path):
    with pytest.raises(cpu_conv.KernelUnavailable, match="no C\\+\\+ compiler 'no-such-c\\+\\+'"):
        cpu_conv._build("no-such-c++", tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()


def test_failed_build_is_a_clear_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_conv, "SOURCE", broken)
    with pytest.raises(cpu_conv.KernelUnavailable, match="building broken.cc failed"):
        cpu_conv._build("g++", tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()


def test_auto_conv_impl_on_cpu(monkeypatch):
    """``auto``: our kernels where they build; without them, im2col for vmapped kernels
    (XLA:CPU's grouped convolutions are slow) and XLA's convolution otherwise. Asking for
    ``ffi`` where the kernels cannot run says why."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU rule")
    assert layers.resolve_impl("auto", vmapped_kernels=False) == ("ffi" if OK else "xla")
    assert layers.resolve_impl("auto", vmapped_kernels=True) == ("ffi" if OK else "im2col")
    monkeypatch.setattr(cpu_conv, "available", lambda: (False, "no C++ compiler 'g++'"))
    assert layers.resolve_impl("auto", vmapped_kernels=False) == "xla"
    assert layers.resolve_impl("auto", vmapped_kernels=True) == "im2col"
    assert layers.resolve_impl("xla", vmapped_kernels=True) == "xla"
    with pytest.raises(ValueError, match="'ffi' is unavailable here: no C\\+\\+ compiler"):
        layers.resolve_impl("ffi", vmapped_kernels=False)
