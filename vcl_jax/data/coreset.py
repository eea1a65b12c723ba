"""Coreset selection (Nguyen et al. 2018): random, or greedy k-center, on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("random", "kcenter")


def _check_size(size: int, n: int) -> None:
    if size < 0:
        raise ValueError(f"coreset size must be ≥ 0, got {size}")
    if size > n:
        raise ValueError(f"coreset of {size} points per task is larger than the task "
                         f"({n} examples); use a size ≤ {n}")


def random_coreset(key: jax.Array, n: int, size: int) -> np.ndarray:
    """``size`` distinct indices in ``[0, n)``, uniformly at random."""
    _check_size(size, n)
    return np.asarray(jax.random.choice(key, n, (size,), replace=False), dtype=np.int32)


@jax.jit(static_argnames="size")
def _kcenter(x: jax.Array, size: int) -> jax.Array:
    def body(i, carry):
        chosen, dists = carry
        nxt = jnp.argmax(dists)
        d = jnp.sum((x - x[nxt]) ** 2, axis=-1)
        return chosen.at[i].set(nxt), jnp.minimum(dists, d)

    chosen = jnp.zeros((size,), jnp.int32)
    dists = jnp.sum((x - x[0]) ** 2, axis=-1)
    chosen, _ = jax.lax.fori_loop(1, size, body, (chosen, dists))
    return chosen


def kcenter_coreset(x: np.ndarray | jax.Array, size: int) -> np.ndarray:
    """Greedy k-center: start at the first point, then repeatedly add the point
    farthest (Euclidean) from those chosen.

    Args:
      x: ``[N, ...]`` examples (flattened internally).
      size: number of points.

    Returns:
      ``[size]`` int32 indices.
    """
    x = jnp.asarray(x, jnp.float32).reshape(len(x), -1)
    _check_size(size, x.shape[0])
    if size == 0:
        return np.zeros((0,), np.int32)
    return np.asarray(_kcenter(x, size))


def select(method: str, key: jax.Array, x: np.ndarray, size: int) -> np.ndarray:
    """Coreset indices by ``method`` (``random`` or ``kcenter``)."""
    if method == "random":
        return random_coreset(key, len(x), size)
    if method == "kcenter":
        return kcenter_coreset(x, size)
    raise ValueError(f"unknown coreset method {method!r}; accepted: {', '.join(METHODS)}")


def complement(indices: np.ndarray, n: int) -> np.ndarray:
    """The indices in ``[0, n)`` not in ``indices`` (the task data left for training)."""
    keep = np.ones(n, bool)
    keep[indices] = False
    return np.nonzero(keep)[0].astype(np.int32)
