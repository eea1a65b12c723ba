"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal or rank-1 Fisher.

After task k the method stores the anchor θ*_k and a Fisher estimate at θ*_k from
per-example gradients of the finished task's loss (:mod:`vcl_jax.continual.fisher`).
Training on later tasks adds ``λ · Σ_k penalty_k(θ)`` with, for δ = θ − θ*_k,

* ``diag``:       ½ Σ_i F_k,ii δ_i²
* ``rank1``:      ½ c_k (μ_kᵀ δ)²,  c_k = E[(μ_kᵀg)²] / ‖μ_k‖⁴ (Frobenius-optimal scale)
* ``rank1_unit``: ½ (μ_kᵀ δ)²       (the plain c = 1 variant)

Each past task keeps its own anchor. The state has a fixed size (one slot per task of
the stream), so the train step traces once for the whole run. Built without a
``batch_loss`` the method is the penalty alone, to be :func:`~vcl_jax.continual.base.chain`-ed
after another method (e.g. generative distillation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vcl_jax.continual.base import BatchLoss, Method, keep_begin, point_draws
from vcl_jax.continual.fisher import ExampleLoss, fisher_stats

PyTree = Any
FISHERS = ("diag", "rank1", "rank1_unit")


class Rank1(NamedTuple):
    """Attributes: mu ``[n_tasks, ...params]`` mean gradients; scale ``[n_tasks]`` c_k."""

    mu: PyTree
    scale: jax.Array


class EWCState(NamedTuple):
    """Attributes: anchors ``[n_tasks, ...params]``; curvature (diag: F ``[n_tasks, ...]``;
    rank-1: :class:`Rank1`); active ``[n_tasks]`` bool."""

    anchors: PyTree
    curvature: PyTree
    active: jax.Array


def _per_task(tree: PyTree, n_tasks: int) -> jax.Array:
    """Σ over leaves of each task's slice: ``[n_tasks, ...] → [n_tasks]``."""
    return sum(jax.tree.leaves(jax.tree.map(lambda a: a.reshape(n_tasks, -1).sum(1), tree)))


def penalty(params: PyTree, state: EWCState) -> jax.Array:
    """Σ over the active past tasks of the task's quadratic penalty."""
    n_tasks = state.active.shape[0]
    delta = jax.tree.map(lambda p, a: p[None] - a, params, state.anchors)
    if isinstance(state.curvature, Rank1):
        proj = _per_task(jax.tree.map(jnp.multiply, state.curvature.mu, delta), n_tasks)
        per_task = 0.5 * state.curvature.scale * proj ** 2
    else:
        per_task = 0.5 * _per_task(jax.tree.map(lambda f, d: f * d * d, state.curvature, delta),
                                   n_tasks)
    return jnp.sum(jnp.where(state.active, per_task, 0.0))


@jax.jit
def _put(slots: PyTree, new: PyTree, task: int | jax.Array) -> PyTree:
    """``slots[task] = new`` leaf by leaf (slots have a leading task axis)."""
    return jax.tree.map(lambda s, v: s.at[task].set(v), slots, new)


def ewc(batch_loss: BatchLoss | None, example_loss: ExampleLoss, *, n_tasks: int, lam: float,
        fisher: str = "diag", chunk: int = 256,
        diag_fn: Callable[[PyTree, PyTree], PyTree] | None = None) -> Method:
    """Builds EWC.

    Args:
      batch_loss: ``(params, batch, key) -> scalar`` task loss; None for the penalty alone.
      example_loss: ``(params, example) -> scalar`` loss of one example (``data`` sliced
        on its first axis), whose per-example gradients give the Fisher.
      n_tasks: tasks in the stream (slots of the state).
      lam: λ, the penalty weight.
      fisher: ``diag``, ``rank1`` or ``rank1_unit``.
      chunk: examples per vmapped gradient call when computing the Fisher.
      diag_fn: optional ``(params, data) -> diag F``, a closed form of the diagonal Fisher
        for models that have one (e.g. :func:`vcl_jax.models.mlp.diag_fisher`), used
        instead of per-example gradients; ``fisher="diag"`` only.
    """
    if lam < 0:
        raise ValueError(f"EWC needs λ ≥ 0, got {lam}")
    if fisher not in FISHERS:
        raise ValueError(f"unknown Fisher {fisher!r}; accepted: {', '.join(FISHERS)}")
    rank1 = fisher != "diag"
    if diag_fn is not None and rank1:
        raise ValueError(f"diag_fn gives a diagonal Fisher; fisher={fisher!r} needs gradients")

    def init(params):
        # Separate buffers for anchors and curvature: a train step may donate both.
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros((n_tasks, *p.shape), p.dtype), params)
        curvature = Rank1(zeros(), jnp.zeros((n_tasks,), jnp.float32)) if rank1 else zeros()
        return params, EWCState(zeros(), curvature, jnp.zeros((n_tasks,), bool))

    def loss(params, state, batch, key):
        pen = penalty(params, state)
        if batch_loss is None:
            return lam * pen, {"penalty": pen}
        value = batch_loss(params, batch, key)
        return value + lam * pen, {"loss": value, "penalty": pen}

    def end_task(params, state, task, data=None):
        if data is None:
            raise ValueError("EWC's end_task needs the finished task's data for its Fisher")
        put = lambda slots, new: _put(slots, new, task)
        if diag_fn is not None:
            return EWCState(put(state.anchors, params), put(state.curvature, diag_fn(params, data)),
                            state.active.at[task].set(True))
        stats = fisher_stats(example_loss, params, data, chunk=chunk, rank1=rank1)
        if rank1:
            c = stats.rank1_scale(unit=fisher == "rank1_unit")
            curvature = Rank1(put(state.curvature.mu, stats.mean),
                              state.curvature.scale.at[task].set(c))
        else:
            curvature = put(state.curvature, stats.diag)
        return EWCState(put(state.anchors, params), curvature, state.active.at[task].set(True))

    return Method(f"ewc_{fisher}", init, keep_begin, loss, end_task, point_draws)
