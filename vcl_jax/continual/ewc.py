"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher.

After task k the method stores the anchor θ*_k and the diagonal empirical Fisher
F_k = E[g²] of per-example gradients g of the task's loss at θ*_k. Training on
later tasks minimises

    batch_loss(θ) + λ · Σ_k ½ Σ_i F_k,i (θ_i − θ*_k,i)²

with a separate anchor per past task. The state has a fixed size (one slot per
task of the stream), so the train step traces once for the whole run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vcl_jax.continual.base import BatchLoss, Method, stack

PyTree = Any
ExampleLoss = Callable[[PyTree, PyTree], jax.Array]  # (params, one example) -> scalar


class EWCState(NamedTuple):
    """Attributes: anchors and fishers ``[n_tasks, ...params]``; active ``[n_tasks]`` bool."""

    anchors: PyTree
    fishers: PyTree
    active: jax.Array


def _rows(data: PyTree, start: int, size: int) -> PyTree:
    return jax.tree.map(lambda a: a[start:start + size], data)


def per_example_grads(example_loss: ExampleLoss, params: PyTree, data: PyTree,
                      chunk: int = 256) -> PyTree:
    """``∇ example_loss`` for every example, stacked ``[N, ...params]``, ``chunk`` at a time."""
    grad = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))
    n = jax.tree.leaves(data)[0].shape[0]
    outs = [grad(params, _rows(data, i, chunk))
            for i in range(0, n, chunk)]
    return jax.tree.map(lambda *gs: jnp.concatenate(gs), *outs)


@functools.partial(jax.jit, static_argnums=0)
def _sum_sq_grads(example_loss: ExampleLoss, params: PyTree, data: PyTree) -> PyTree:
    grads = jax.vmap(jax.grad(example_loss), (None, 0))(params, data)
    return jax.tree.map(lambda g: jnp.sum(g ** 2, axis=0), grads)


def diag_fisher(example_loss: ExampleLoss, params: PyTree, data: PyTree,
                chunk: int = 256) -> PyTree:
    """Diagonal empirical Fisher ``E[g²]`` over the examples of ``data``, without
    keeping all per-example gradients (summed chunk by chunk; compiled once per
    ``example_loss`` and chunk shape, so later tasks reuse it)."""
    n = jax.tree.leaves(data)[0].shape[0]
    total = None
    for i in range(0, n, chunk):
        part = _sum_sq_grads(example_loss, params, _rows(data, i, chunk))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda t: t / n, total)


def penalty(params: PyTree, state: EWCState) -> jax.Array:
    """``Σ_k ½ Σ_i F_k,i (θ_i − θ*_k,i)²`` over the active tasks."""

    def leaf(p, anchors, fishers):
        per_task = 0.5 * jnp.sum((fishers * (p[None] - anchors) ** 2).reshape(len(anchors), -1),
                                 axis=1)
        return jnp.sum(jnp.where(state.active, per_task, 0.0))

    terms = jax.tree.map(leaf, params, state.anchors, state.fishers)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def ewc(batch_loss: BatchLoss, example_loss: ExampleLoss, *, n_tasks: int, lam: float,
        chunk: int = 256) -> Method:
    """Builds diagonal EWC.

    Args:
      batch_loss: ``(params, batch, key) -> scalar`` task loss.
      example_loss: ``(params, example) -> scalar`` loss of one example (``data`` sliced
        on its first axis), whose gradients give the Fisher.
      n_tasks: tasks in the stream (slots of the state).
      lam: λ, the penalty weight.
      chunk: examples per vmapped gradient call when computing the Fisher.
    """
    if lam < 0:
        raise ValueError(f"EWC needs λ ≥ 0, got {lam}")

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros((n_tasks, *p.shape), p.dtype), params)
        return params, EWCState(zeros, zeros, jnp.zeros((n_tasks,), bool))

    def begin_task(params, state, task, n_data):
        del task, n_data
        return params, state

    def loss(params, state, batch, key):
        value = batch_loss(params, batch, key)
        pen = penalty(params, state)
        return value + lam * pen, {"loss": value, "penalty": pen}

    def end_task(params, state, task, data=None):
        if data is None:
            raise ValueError("EWC's end_task needs the finished task's data for its Fisher")
        fisher = diag_fisher(example_loss, params, data, chunk)
        put = lambda slots, new: jax.tree.map(lambda s, v: s.at[task].set(v), slots, new)
        return EWCState(put(state.anchors, params), put(state.fishers, fisher),
                        state.active.at[task].set(True))

    def draws(params, key, n):
        del key
        return stack(params, 1 if n else 0)

    return Method("ewc", init, begin_task, loss, end_task, draws)
