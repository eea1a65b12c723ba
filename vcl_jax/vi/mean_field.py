"""Mean-field Gaussian posteriors over parameter pytrees, as pure functions.

A posterior is a pair of pytrees ``(mean, log_var)`` with the structure of the
model's params. A boolean ``mask`` pytree of the same structure marks which
leaves are random; unmasked leaves (per-task embeddings, normalisation layers)
are deterministic: ``sample`` returns their mean and ``kl`` ignores them. Pass
``mask=None`` to make every leaf random.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

PyTree = Any


class MeanField(NamedTuple):
    """A diagonal Gaussian ``N(mean, exp(log_var))`` over a parameter pytree."""

    mean: PyTree
    log_var: PyTree


def init_from_params(params: PyTree, log_var: float = -10.0) -> MeanField:
    """Posterior centred on ``params`` with a constant log-variance."""
    return MeanField(params, jax.tree.map(lambda p: jnp.full_like(p, log_var), params))


def relative_log_var(params: dict, fraction: float) -> dict:
    """Log-variances that make each layer's σ ``fraction`` × the RMS of its weights.

    A layer is a dict of leaves (Flax's ``{"kernel", "bias"}``): all its leaves take the
    RMS of its ``kernel`` (biases start at zero, so their own RMS says nothing of the
    layer's scale); a leaf without a ``kernel`` sibling takes its own RMS. The same
    log-variance means a much tighter hold, relative to the weights, on a narrow layer
    (large weights at a small fan-in) than on a wide one.
    """
    if fraction <= 0:
        raise ValueError(f"the relative prior width must be > 0, got {fraction}")

    def log_var(a, scale):
        rms = jnp.sqrt(jnp.mean(jnp.square(scale)))
        return jnp.full_like(a, 2.0 * jnp.log(fraction * jnp.maximum(rms, 1e-8)))

    def walk(node):
        if not isinstance(node, dict):
            return log_var(node, node)
        kernel = node.get("kernel")
        return {k: walk(v) if isinstance(v, dict) or kernel is None else log_var(v, kernel)
                for k, v in node.items()}

    return walk(params)


def prior(params: PyTree, sigma: float = 1.0) -> MeanField:
    """The first task's prior ``N(0, σ²I)``, shaped like ``params``."""
    lv = 2.0 * jnp.log(sigma)
    return MeanField(jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(lambda p: jnp.full_like(p, lv), params))


def _mask_or_true(mask: PyTree | None, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda _: True, tree) if mask is None else mask


def _size_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _threefry_key_data(key: jax.Array) -> jax.Array | None:
    """A threefry key's ``uint32[2]`` data (typed or raw key), or None for another PRNG."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key) if str(jax.random.key_impl(key)) == "threefry2x32" \
            else None
    ok = jax.config.jax_default_prng_impl == "threefry2x32" and key.shape == (2,)
    return key if ok else None


def standard_normal(key: jax.Array, shape: tuple[int, ...] = (),
                    dtype: Any = jnp.float32) -> jax.Array:
    """``N(0, 1)`` draws of ``shape``, like ``jax.random.normal`` but 2–3× cheaper on CPU here.

    JAX's partitionable threefry (the default) hashes one counter pair per output
    number and keeps one of the hash's two words. Here element ``i`` of the flattened
    draw is word ``i % 2`` of the threefry hash of the pair ``(i // 2, 0)``: half the
    hashes, and a draw of ``n`` numbers is the first ``n`` of any longer draw with the
    same key (which :func:`normals` relies on). The numbers go through the same
    uniform → ``√2·erf⁻¹`` map as ``jax.random.normal``. Other PRNGs and dtypes than
    float32 fall back to ``jax.random.normal``.
    """
    data = _threefry_key_data(key)
    if data is None or jnp.dtype(dtype) != jnp.float32:
        return jax.random.normal(key, shape, dtype)
    n = int(np.prod(shape, dtype=np.int64))
    half = (n + 1) // 2
    w0, w1 = threefry2x32_p.bind(data[0], data[1], jax.lax.iota(jnp.uint32, half),
                                 jnp.zeros((half,), jnp.uint32))
    bits = jnp.stack([w0, w1], axis=-1).reshape(-1)[:n]
    one = jnp.uint32(np.float32(1.0).view(np.uint32))
    unit = jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0  # [0, 1)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(lo, unit * (1.0 - lo) + lo)
    return (np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)).reshape(shape)


def normals(keys: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
    """``[standard_normal(keys[i], like[i].shape, like[i].dtype) for i …]``, bit for bit,
    with one random-number computation per power-of-two size class instead of one per array.

    A :func:`standard_normal` draw of a shape is the first elements of a longer 1-D draw
    with the same key, so arrays whose sizes round up to the same power of two share one
    ``vmap``-ed draw. XLA:CPU compiles each threefry computation separately, so fewer of
    them shorten the compile of a posterior with many leaves (figures in BENCHMARKS.md).
    """
    if _threefry_key_data(keys[0]) is None:  # another PRNG: no prefix property, one per array
        return [standard_normal(k, a.shape, a.dtype) for k, a in zip(keys, like, strict=True)]
    out: list[jax.Array | None] = [None] * len(like)
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(like):
        if jnp.dtype(a.dtype) == jnp.float32:
            groups.setdefault(_size_bucket(a.size), []).append(i)
        else:  # jax.random.normal's draws: no shared computation
            out[i] = standard_normal(keys[i], a.shape, a.dtype)
    for n, members in groups.items():
        z = jax.vmap(lambda k, n=n: standard_normal(k, (n,)))(
            keys[np.asarray(members)])  # [len(members), n]
        for row, i in enumerate(members):
            out[i] = z[row, :like[i].size].reshape(like[i].shape)
    return out


def _noise(key: jax.Array, q: MeanField, mask: PyTree | None) -> list[jax.Array | None]:
    """Per flattened leaf: its ε (random leaves; one key each) or None (deterministic)."""
    means, treedef = jax.tree.flatten(q.mean)
    random = treedef.flatten_up_to(_mask_or_true(mask, q.mean))
    keys = jax.random.split(key, len(means))
    picked = [i for i, r in enumerate(random) if r]
    eps: list[jax.Array | None] = [None] * len(means)
    if picked:
        for i, e in zip(picked, normals(keys[np.asarray(picked, np.int32)],
                                        [means[i] for i in picked]), strict=True):
            eps[i] = e
    return eps


def sample(key: jax.Array, q: MeanField, mask: PyTree | None = None) -> PyTree:
    """One reparameterised draw ``mean + exp(log_var/2)·ε``, one key per leaf.

    Leaf i's ε is ``standard_normal(jax.random.split(key, n_leaves)[i], shape)``
    (drawn for all random leaves together by :func:`normals`).

    Args:
      key: PRNG key.
      q: the posterior.
      mask: which leaves are random (None: all).

    Returns:
      A params pytree; differentiable w.r.t. ``q``.
    """
    means, treedef = jax.tree.flatten(q.mean)
    log_vars = treedef.flatten_up_to(q.log_var)
    out = [m if e is None else m + _scaled(e, jnp.exp(0.5 * lv), lv.ndim)
           for m, lv, e in zip(means, log_vars, _noise(key, q, mask), strict=True)]
    return jax.tree.unflatten(treedef, out)


def _scaled(eps: jax.Array, std: jax.Array, leaf_ndim: int) -> jax.Array:
    """``σ·ε`` of one leaf; a vector leaf's (``leaf_ndim`` ≤ 1) computed once into a buffer.

    XLA fuses cheap elementwise producers into every consumer, even into one that
    broadcasts them. Vectors (biases, GroupNorm scales and offsets, FiLM vectors) are
    broadcast over the activations: written as a plain product, a GroupNorm scale's 16
    draws (the normal's ``erf_inv`` polynomial of the random bits) were re-computed for each
    of the 64·28·28·16 activations they multiply (BENCHMARKS.md has the cost). XLA:CPU does
    not fuse a reduction into its consumers, so summing ``[σ·ε, 0]`` over a leading axis
    makes the draw a buffer and leaves every value as it was (``x + 0 = x``). Matrices and
    kernels feed a contraction, which reads its operands from buffers anyway; buffering
    them too would only add a pass over the largest leaves (measured on split MNIST's
    10-draw step). ``jax.lax.optimization_barrier`` would say this more plainly, but XLA:CPU
    removes it before fusion.
    """
    draw = std * eps
    if leaf_ndim > 1:
        return draw
    return jnp.stack([draw, jnp.zeros_like(draw)]).sum(0)


def _sum_leading(a: jax.Array) -> jax.Array:
    """``a.sum(0)`` as a chain of adds: XLA:CPU's reduction over a leading axis is much
    slower than adds at memory speed (BENCHMARKS.md)."""
    acc = a[0]
    for i in range(1, a.shape[0]):
        acc = acc + a[i]
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile(x: jax.Array, n: int) -> jax.Array:
    return jnp.broadcast_to(x, (n, *x.shape))


def _tile_fwd(x, n):
    return _tile(x, n), None


def _tile_bwd(n, _, g):
    del n
    return (_sum_leading(g),)


_tile.defvjp(_tile_fwd, _tile_bwd)


def sample_many(keys: jax.Array, q: MeanField, mask: PyTree | None = None) -> PyTree:
    """``K = len(keys)`` draws stacked on a leading axis: draw i is ``sample(keys[i], q, mask)``.

    The same numbers as ``jax.vmap(lambda k: sample(k, q, mask))(keys)``; its gradient sums
    over the draws with K − 1 adds instead of a reduction (:func:`_sum_leading`), which made
    split-MNIST's 10-draw VCL step ~20% faster on XLA:CPU. Deterministic leaves are
    broadcast to ``[K, ...]`` too.
    """
    n = keys.shape[0]
    means, treedef = jax.tree.flatten(q.mean)
    log_vars = treedef.flatten_up_to(q.log_var)
    eps = jax.vmap(lambda k: _noise(k, q, mask))(keys)
    out = [_tile(m, n) if e is None else
           _tile(m, n) + _scaled(e, _tile(jnp.exp(0.5 * lv), n), lv.ndim)
           for m, lv, e in zip(means, log_vars, eps, strict=True)]
    return jax.tree.unflatten(treedef, out)


def kl(q: MeanField, p: MeanField, mask: PyTree | None = None) -> jax.Array:
    """``KL(q ‖ p)`` between diagonal Gaussians, summed over the random leaves.

    Per coordinate: ½[(σ_q² + (μ_q − μ_p)²)/σ_p² − 1 + log σ_p² − log σ_q²], with the
    variance part written as ``expm1(d) − d`` (d = log σ_q² − log σ_p²): in float32,
    ``exp(d) − 1 − d`` loses everything below ~1e-7 per coordinate, which summed over a
    U-Net's 10⁵–10⁶ weights is noise of the size of the KL itself when q is near p.
    """
    mask = _mask_or_true(mask, q.mean)

    def leaf(mq, lq, mp, lp, random):
        if not random:
            return jnp.zeros((), jnp.float32)
        d = lq - lp
        return 0.5 * jnp.sum(jnp.expm1(d) - d + (mq - mp) ** 2 * jnp.exp(-lp))

    terms = jax.tree.map(leaf, q.mean, q.log_var, p.mean, p.log_var, mask)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def num_variational(q: MeanField, mask: PyTree | None = None) -> int:
    """Number of random scalar parameters."""
    mask = _mask_or_true(mask, q.mean)
    return sum(int(m.size) for m, r in zip(jax.tree.leaves(q.mean), jax.tree.leaves(mask),
                                             strict=True) if r)
