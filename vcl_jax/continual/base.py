"""The method interface every continual-learning method implements.

A method is a NamedTuple of pure functions over two pytrees: the *trainable*
variables (params for MLE; a mean-field posterior for VCL) and a *method
state* (what the method carries between tasks: a prior, Fisher anchors, a
teacher, ...). The trainer never looks inside either.

``loss`` receives a ``batch_loss(params, batch, key) -> scalar`` function, so
methods work for any model: the diffusion U-Net or the split-MNIST MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
BatchLoss = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class Method(NamedTuple):
    """A continual-learning method.

    Attributes:
      name: short name used in run directories and plots.
      init: ``params -> (trainable, state)`` before the first task.
      begin_task: ``(trainable, state, task, n_data) -> (trainable, state)``.
      loss: ``(trainable, state, batch, key) -> (loss, metrics)``.
      end_task: ``(trainable, state, task, data=None) -> state`` (consolidation; ``data``
        is the finished task's training data, for methods that need it, e.g. a Fisher).
      draws: ``(trainable, key, n) -> params stacked on a leading axis [n, ...]``
        for evaluation and sampling.
    """

    name: str
    init: Callable
    begin_task: Callable
    loss: Callable
    end_task: Callable
    draws: Callable


def stack(params: PyTree, n: int) -> PyTree:
    """``n`` copies of ``params`` on a new leading axis."""
    return jax.tree.map(lambda p: jax.numpy.broadcast_to(p, (n, *p.shape)), params)
