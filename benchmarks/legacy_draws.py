"""The posterior draws as written before 2026-12-01, kept so that benchmarks can time them
against `vcl_jax.vi.mean_field` (which replaced them with the same distribution)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_leaf_sample(key, q, mask=None):
    """One draw from the mean-field posterior ``q``: ``jax.random.normal`` per leaf (one
    threefry computation each); leaves whose ``mask`` entry is False keep their mean."""
    leaves, treedef = jax.tree.flatten(q.mean)
    keys = jax.random.split(key, len(leaves))
    random = treedef.flatten_up_to(mask) if mask is not None else [True] * len(leaves)
    out = [m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape, m.dtype) if r else m
           for m, lv, k, r in zip(leaves, treedef.flatten_up_to(q.log_var), keys, random,
                                  strict=True)]
    return jax.tree.unflatten(treedef, out)


def vmapped_per_leaf_draws(keys, q, mask=None):
    """``len(keys)`` stacked draws as ``vmap`` of `per_leaf_sample` (whose gradient reduces
    over the draw axis)."""
    return jax.vmap(lambda k: per_leaf_sample(k, q, mask))(keys)
