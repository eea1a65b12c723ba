"""Mean-field Gaussian posteriors over parameter pytrees, as pure functions.

A posterior is a pair of pytrees ``(mean, log_var)`` with the structure of the
model's params. A boolean ``mask`` pytree of the same structure marks which
leaves are random; unmasked leaves (per-task embeddings, normalisation layers)
are deterministic: ``sample`` returns their mean and ``kl`` ignores them. Pass
``mask=None`` to make every leaf random.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class MeanField(NamedTuple):
    """A diagonal Gaussian ``N(mean, exp(log_var))`` over a parameter pytree."""

    mean: PyTree
    log_var: PyTree


def init_from_params(params: PyTree, log_var: float = -10.0) -> MeanField:
    """Posterior centred on ``params`` with a constant log-variance."""
    return MeanField(params, jax.tree.map(lambda p: jnp.full_like(p, log_var), params))


def prior(params: PyTree, sigma: float = 1.0) -> MeanField:
    """The first task's prior ``N(0, σ²I)``, shaped like ``params``."""
    lv = 2.0 * jnp.log(sigma)
    return MeanField(jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(lambda p: jnp.full_like(p, lv), params))


def _mask_or_true(mask: PyTree | None, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda _: True, tree) if mask is None else mask


def sample(key: jax.Array, q: MeanField, mask: PyTree | None = None) -> PyTree:
    """One reparameterised draw ``mean + exp(log_var/2)·ε``, one key per leaf.

    Args:
      key: PRNG key.
      q: the posterior.
      mask: which leaves are random (None: all).

    Returns:
      A params pytree; differentiable w.r.t. ``q``.
    """
    leaves, treedef = jax.tree.flatten(q.mean)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
    mask = _mask_or_true(mask, q.mean)

    def draw(k, m, lv, random):
        if not random:
            return m
        return m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape, m.dtype)

    return jax.tree.map(draw, keys, q.mean, q.log_var, mask)


def kl(q: MeanField, p: MeanField, mask: PyTree | None = None) -> jax.Array:
    """``KL(q ‖ p)`` between diagonal Gaussians, summed over the random leaves.

    Per coordinate: ½[(σ_q² + (μ_q − μ_p)²)/σ_p² − 1 + log σ_p² − log σ_q²].
    """
    mask = _mask_or_true(mask, q.mean)

    def leaf(mq, lq, mp, lp, random):
        if not random:
            return jnp.zeros((), jnp.float32)
        return 0.5 * jnp.sum(jnp.exp(lq - lp) + (mq - mp) ** 2 * jnp.exp(-lp) - 1.0 + lp - lq)

    terms = jax.tree.map(leaf, q.mean, q.log_var, p.mean, p.log_var, mask)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def num_variational(q: MeanField, mask: PyTree | None = None) -> int:
    """Number of random scalar parameters."""
    mask = _mask_or_true(mask, q.mean)
    return sum(int(m.size) for m, r in zip(jax.tree.leaves(q.mean), jax.tree.leaves(mask),
                                             strict=True) if r)
