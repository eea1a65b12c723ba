"""Epochs over data held on the device, with no Python per training step.

Two ways to run an epoch, same math:

* ``unroll=0``: the whole epoch is one ``lax.scan`` inside one jitted call
  (best on GPU/TPU).
* ``unroll=k``: the epoch is a Python loop over jitted calls that each run ``k``
  steps as a fully unrolled scan. XLA:CPU runs convolutions inside a while loop
  an order of magnitude slower when their kernel is loop-carried (BENCHMARKS.md),
  so CPU presets use this.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict]]


def epoch_steps(n: int, batch_size: int, multiple: int = 1) -> int:
    """Steps in an epoch of ``n`` examples: every example at least once, in full batches,
    rounded up to a multiple of ``multiple``."""
    steps = -(-n // batch_size)
    return -(-steps // multiple) * multiple


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def epoch_indices(key: jax.Array, n: int, batch_size: int, multiple: int = 1) -> jax.Array:
    """A shuffled epoch as ``[steps, batch_size]`` indices.

    Every example appears at least once; the batches are completed (and the
    number of steps rounded up to a multiple of ``multiple``) with examples of
    a second permutation, so every batch is full and every call has one shape.
    """
    steps = epoch_steps(n, batch_size, multiple)
    k1, k2 = jax.random.split(key)
    perm = jax.random.permutation(k1, n)
    extra = steps * batch_size - n
    while extra > 0:
        k2, sub = jax.random.split(k2)
        more = jax.random.permutation(sub, n)[:extra]
        perm = jnp.concatenate([perm, more])
        extra -= more.shape[0]
    return perm.reshape(steps, batch_size)


def row_bucket(n: int, smallest: int = 256) -> int:
    """Rows a dataset of ``n`` examples is padded to (a power of two, at least ``smallest``),
    so that tasks and coresets of different sizes reuse a few compiled epoch functions."""
    return max(smallest, 1 << max(n - 1, 0).bit_length())


def pad_rows(data: PyTree, rows: int) -> PyTree:
    """``data``'s leaves zero-padded along the first axis to ``rows``."""
    def pad(a):
        extra = rows - a.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad {a.shape[0]} rows to {rows}")
        return jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)) if extra else a

    return jax.tree.map(pad, data)


def scan_steps(step: StepFn, state: PyTree, data: PyTree, indices: jax.Array, key: jax.Array,
               *, first: jax.Array | int = 0, unroll: bool = False,
               shared: dict | None = None) -> tuple[PyTree, dict]:
    """Runs ``step(state, batch, key)`` over every row of ``indices`` in a ``lax.scan``.

    The key of step i is ``fold_in(key, first + i)``. With ``shared`` (a dict), every
    batch is the dict ``{**data[idx], **shared}``: arrays the step reads whole, e.g. a
    replay pool it draws from. Returns the final state and the per-step metrics stacked
    ``[steps, ...]``.
    """

    def body(state, xs):
        i, idx = xs
        batch = jax.tree.map(lambda a: a[idx], data)
        if shared is not None:
            batch = {**batch, **shared}
        return step(state, batch, jax.random.fold_in(key, i))

    steps = jnp.arange(indices.shape[0]) + first
    if unroll and indices.shape[0] == 1:
        # lax.scan(unroll=True) of one step still emits a while loop, where XLA:CPU's
        # convolutions are slow: one step runs as plain code instead
        state, metrics = body(state, (steps[0], indices[0]))
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(body, state, (steps, indices), unroll=bool(unroll) or 1)


class EpochRunner:
    """Runs whole epochs of a pure train step over device-held data.

    Args:
      step: the pure train step ``(state, batch, key) -> (state, metrics)``.
      batch_size: examples per step.
      unroll: 0 for one rolled scan per epoch; k > 0 for jitted calls of k unrolled steps.
      donate: donate the state buffers to each call.
      multiple: steps per epoch are rounded up to a multiple of this (default: ``unroll``;
        a multiple of ``unroll``), so that runners with other ``unroll`` values can draw
        the same epochs.
    """

    def __init__(self, step: StepFn, batch_size: int, unroll: int = 0, donate: bool = True,
                 multiple: int | None = None):
        self.batch_size = batch_size
        self.unroll = unroll
        self.multiple = max(unroll, 1) if multiple is None else multiple
        if unroll and self.multiple % unroll:
            raise ValueError(f"steps per epoch rounded to multiples of {self.multiple} cannot "
                             f"be run in calls of {unroll} steps")
        donate_args = (0,) if donate else ()
        if unroll:
            self._call = jax.jit(
                lambda s, d, idx, k, first, sh: scan_steps(step, s, d, idx, k, first=first,
                                                           unroll=True, shared=sh),
                donate_argnums=donate_args)
        else:
            self._call = jax.jit(
                lambda s, d, idx, k, first, sh: scan_steps(step, s, d, idx, k, shared=sh),
                donate_argnums=donate_args)

    def __call__(self, state: PyTree, data: PyTree, key: jax.Array,
                 shared: dict | None = None, n: int | None = None) -> tuple[PyTree, dict]:
        """One epoch; returns the new state and the metrics averaged over its steps.
        ``shared``: arrays every step receives whole (see :func:`scan_steps`). ``n``: the
        number of real examples when ``data`` is padded (:func:`pad_rows`); the padding
        is never drawn, so the epoch is the one of the unpadded data."""
        n = jax.tree.leaves(data)[0].shape[0] if n is None else n
        k_perm, k_steps = jax.random.split(key)
        idx = epoch_indices(k_perm, n, self.batch_size, self.multiple)
        if not self.unroll:
            state, metrics = self._call(state, data, idx, k_steps, 0, shared)
            return state, jax.tree.map(jnp.mean, metrics)
        chunks = []
        for c in range(0, idx.shape[0], self.unroll):
            state, m = self._call(state, data, idx[c:c + self.unroll], k_steps, c, shared)
            chunks.append(m)
        metrics = jax.tree.map(lambda *ms: jnp.mean(jnp.concatenate(ms)), *chunks)
        return state, metrics
