"""Model shapes, parameter structure, and the two convolution paths."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vcl_jax.models.classifier import Classifier
from vcl_jax.models.layers import GroupNorm, conv_same
from vcl_jax.models.unet import ContextUNet, variational_mask


@pytest.mark.parametrize("k,c_in,c_out", [(3, 1, 8), (3, 16, 4), (1, 5, 7), (5, 3, 2)])
def test_im2col_conv_equals_xla_conv(k, c_in, c_out):
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, c_in))
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out))
    np.testing.assert_allclose(conv_same(x, w, "im2col"), conv_same(x, w, "xla"),
                               rtol=1e-4, atol=1e-4)
    gx = jax.grad(lambda w: jnp.sum(conv_same(x, w, "xla") ** 2))(w)
    gi = jax.grad(lambda w: jnp.sum(conv_same(x, w, "im2col") ** 2))(w)
    np.testing.assert_allclose(gi, gx, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("k,c_in,c_out,hw",
                         [(3, 16, 1, (9, 7)), (3, 7, 2, (5, 5)), (5, 4, 3, (8, 6))])
def test_taps_first_conv_equals_xla_conv(k, c_in, c_out, hw):
    """The few-output-channel form (the U-Net's last conv under ``impl="ffi"``)."""
    from vcl_jax.models.layers import conv_taps_first

    x = jax.random.normal(jax.random.key(0), (2, *hw, c_in))
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out))
    ct = jax.random.normal(jax.random.key(2), (2, *hw, c_out))

    def run(conv):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(ct))

    for a, b in zip(run(conv_taps_first), run(lambda x, w: conv_same(x, w, "xla")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,groups", [((3, 7, 7, 16), 8), ((2, 5, 5, 6), 1), ((4, 9, 12), 4)])
def test_group_norm_equals_flax_group_norm(shape, groups):
    x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5
    ours, flax_gn = GroupNorm(groups), nn.GroupNorm(groups)
    params = flax_gn.init(jax.random.key(1), x)
    shapes = functools.partial(jax.tree.map, jnp.shape)
    assert shapes(ours.init(jax.random.key(1), x)) == shapes(params)  # checkpoints carry over
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(jax.jit(ours.apply)(params, x), jax.jit(flax_gn.apply)(params, x),
                               rtol=1e-5, atol=1e-5)

    def grads(module):  # w.r.t. params and input, through a nonlinear loss
        loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1)))(params, x)

    for a, b in zip(grads(ours), grads(flax_gn), strict=True):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4), a, b)
    with pytest.raises(ValueError, match="groups"):
        GroupNorm(5).init(jax.random.key(0), x)


def _unet_io(size, channels, b=3):
    return (jnp.zeros((b, size, size, channels)), jnp.full((b,), 0.5),
            jnp.array([0, 1, 2])[:b], jnp.array([True, False, True])[:b])


def _param_shapes(model, *args):
    """The params' shapes and dtypes, by shape inference (nothing is compiled or run)."""
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_unet_output_shape(size, channels):
    model = ContextUNet(n_feat=8, n_tasks=5, channels=channels, embed_dim=4)
    args = _unet_io(size, channels)
    params = _param_shapes(model, *args)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, *args), params)
    assert out.shape == (3, size, size, channels)
    assert params["task_embeddings"].shape == (5, 4)


def test_unet_parameter_count_scales_with_width():
    counts = {}
    for n in (8, 16):
        params = _param_shapes(ContextUNet(n_feat=n, n_tasks=10, embed_dim=4), *_unet_io(28, 1))
        counts[n] = sum(p.size for p in jax.tree.leaves(params))
    # Dominated by n² conv weights: doubling the width gives close to 4× the params.
    assert 3.5 < counts[16] / counts[8] < 4.1


@pytest.mark.slow  # ~25 s; im2col is the fallback where our CPU kernels do not build
def test_conv_impls_give_the_same_unet():
    args = _unet_io(28, 1)
    a = ContextUNet(n_feat=8, n_tasks=3, embed_dim=4, impl="xla")
    b = ContextUNet(n_feat=8, n_tasks=3, embed_dim=4, impl="im2col")
    params = jax.jit(a.init)(jax.random.key(0), *args)
    np.testing.assert_allclose(jax.jit(a.apply)(params, *args), jax.jit(b.apply)(params, *args),
                               rtol=1e-4, atol=1e-4)


def test_unet_is_unchanged_by_its_group_norm(monkeypatch):
    """The U-Net with `layers.GroupNorm` is the U-Net it was with Flax's: same parameter
    tree (earlier checkpoints load), same outputs."""
    from vcl_jax.models import unet

    args = _unet_io(28, 1)
    model = ContextUNet(n_feat=8, n_tasks=3, embed_dim=4)
    params = jax.jit(model.init)(jax.random.key(0), *args)
    ours = jax.jit(model.apply)(params, *args)
    monkeypatch.setattr(unet, "GroupNorm", nn.GroupNorm)
    flax_params = jax.jit(model.init)(jax.random.key(0), *args)
    assert jax.tree.structure(flax_params) == jax.tree.structure(params)
    np.testing.assert_allclose(ours, jax.jit(model.apply)(params, *args), rtol=1e-4, atol=1e-4)


def test_task_embedding_changes_the_output():
    model = ContextUNet(n_feat=8, n_tasks=3, embed_dim=4)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    t, keep = jnp.full((2,), 0.3), jnp.ones(2, bool)
    params = jax.jit(model.init)(jax.random.key(1), x, t, jnp.zeros(2, int), keep)
    apply = jax.jit(model.apply)
    a = apply(params, x, t, jnp.array([0, 0]), keep)
    b = apply(params, x, t, jnp.array([1, 1]), keep)
    assert not np.allclose(a, b)


def test_variational_mask_excludes_embeddings_and_norms():
    params = _param_shapes(ContextUNet(n_feat=8, n_tasks=3, embed_dim=4), *_unet_io(28, 1))
    flat = traverse_util.flatten_dict(variational_mask(params))
    assert flat[("task_embeddings",)] is False and flat[("null_embedding",)] is False
    assert not any(v for k, v in flat.items() if any("GroupNorm" in p for p in k))
    assert flat[("out_conv2", "kernel")] is True
    assert sum(flat.values()) > 0.8 * len(flat) / 2
    with_norms = traverse_util.flatten_dict(variational_mask(params, norms=True))
    added = {k for k in flat if with_norms[k] and not flat[k]}
    assert added and all(any("GroupNorm" in p or p == "out_norm" for p in k) for k in added)
    assert with_norms[("task_embeddings",)] is False


def test_an_unknown_context_is_refused():
    x = jnp.zeros((2, 28, 28, 1))
    t, task, keep = jnp.full((2,), 0.3), jnp.array([0, 1]), jnp.array([True, False])
    for retired in ("bogus", "per_task"):  # per_task: an option since retired
        with pytest.raises(ValueError, match="unknown context"):
            _param_shapes(ContextUNet(n_feat=8, context=retired), x, t, task, keep)


def test_classifier_outputs():
    model = Classifier(num_classes=10, width=4, features=16)
    x = jnp.zeros((5, 28, 28, 1))
    params = model.init(jax.random.key(0), x)
    logp, feats = model.apply(params, x, return_features=True)
    assert logp.shape == (5, 10) and feats.shape == (5, 16)
    np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, rtol=1e-5)


def test_torch_reference_has_the_same_parameters():
    """The PyTorch twin used by ``make bench`` is the same architecture (parameter count)."""
    import pytest

    torch_reference = pytest.importorskip("benchmarks.torch_reference")
    import jax

    from vcl_jax.models.unet import ContextUNet

    for n in (8, 16):
        params = _param_shapes(ContextUNet(n_feat=n, n_tasks=10, embed_dim=32),
                               *_unet_io(28, 1, b=2))
        assert sum(p.size for p in jax.tree.leaves(params)) == torch_reference.num_params(n)


@pytest.mark.slow  # ~12 s; `make test-all` (keeps `make test` clear of the 10-minute budget)
def test_step_profile_finds_every_convolution():
    from benchmarks import profile_step

    out = profile_step.profile(n_feat=8, batch=4)
    kernels = {r["kind"]: r["kernels"] for r in out["rows"]}
    # ContextUNet has 16 trainable 3×3 convs: 16 weight gradients, 16 forward passes and
    # 15 input gradients (none for the first conv, whose input is the data)
    assert kernels["conv, weight gradient (whole-map window)"] == 16
    assert kernels["conv, 3×3 window"] == 31
    assert abs(sum(r["share"] for r in out["rows"]) - 1) < 1e-6


def test_unknown_conv_impl_is_an_error():
    """(Which impl ``auto`` picks on the CPU: ``tests/test_kernels.py``.)"""
    from vcl_jax.models.layers import resolve_impl

    assert resolve_impl("xla", vmapped_kernels=True) == "xla"
    with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
        resolve_impl("fft", vmapped_kernels=False)


def test_film_context_gives_each_task_its_own_scales_and_a_random_null_pair():
    from vcl_jax.models.unet import variational_mask

    model = ContextUNet(n_feat=8, n_tasks=3, embed_dim=4, context="film", impl="xla")
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    t = jnp.full((4,), 0.3)
    task, keep = jnp.array([0, 0, 2, 1]), jnp.array([True, True, True, False])
    params = jax.jit(model.init)(jax.random.key(1), x, t, task, keep)["params"]
    assert params["task_film1"].shape == (3, 16) and params["task_film2"].shape == (3, 8)
    assert params["null_film1"].shape == (16,) and "task_embeddings" not in params
    bound = 1 / np.sqrt(16)  # the author's kaiming_uniform(a=√5) of a [1, 2n] vector
    assert np.abs(params["task_film1"]).max() <= bound
    mask = variational_mask(params)
    assert not mask["task_film1"] and not mask["task_film2"]  # deterministic per task
    assert mask["null_film1"] and mask["null_film2"]  # the null pair is in the KL
    g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, task, keep))))(params)
    # task 1's only example is unconditional: its scales get no gradient, task 0's and 2's do
    rows = np.abs(np.asarray(g["task_film1"])).sum(1)
    assert rows[1] == 0 and rows[0] > 0 and rows[2] > 0
    assert np.abs(np.asarray(g["null_film1"])).sum() > 0


def test_pytorch_init_is_uniform_within_one_over_root_fan_in():
    from vcl_jax.models.layers import kernel_init

    w = kernel_init("pytorch")(jax.random.key(0), (3, 3, 16, 32))
    bound = 1 / np.sqrt(3 * 3 * 16)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    # PyTorch takes a transposed conv's fan-in from its output channels
    wt = kernel_init("pytorch", transpose=True)(jax.random.key(0), (2, 2, 64, 8))
    assert np.abs(wt).max() <= 1 / np.sqrt(2 * 2 * 8) and np.abs(wt).max() > 1 / np.sqrt(2 * 2 * 64)
    paper = kernel_init("paper")(jax.random.key(0), (3, 3, 16, 32))
    assert np.abs(paper).max() <= np.sqrt(15 / (3 * 3 * 16))
    with pytest.raises(ValueError, match="unknown init"):
        kernel_init("xavier")


@pytest.mark.slow  # ~25 s: the reference compile at XLA's default optimisation
def test_unet_init_compiled_for_speed_gives_the_default_compile_s_numbers():
    from vcl_jax.models.unet import init_unet

    model = ContextUNet(n_feat=4, n_tasks=3, embed_dim=4, context="film", weight_init="pytorch")
    x, t, task, keep = jnp.zeros((2, 28, 28, 1)), jnp.ones((2,)), jnp.zeros((2,), jnp.int32), \
        jnp.ones((2,), bool)
    key = jax.random.key(3)
    # XLA's default optimisation, named: the test suite itself compiles at level 1 (conftest)
    full = jax.jit(lambda k: model.init(k, x, t, task, keep)["params"]).lower(key).compile(
        compiler_options={"xla_backend_optimization_level": 3})(key)
    quick = init_unet(model, key, (28, 28, 1))
    assert jax.tree.structure(quick) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
