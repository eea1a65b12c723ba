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


def chain(first: Method, *rest: Method) -> Method:
    """Composes methods that share ``first``'s trainable variables (e.g. generative
    distillation followed by an EWC penalty built without a batch loss).

    The loss is the sum of the methods' losses; each method keeps its own state (the
    chained state is a tuple); ``begin_task`` and ``end_task`` run in order; draws come from
    ``first``. Metric names of later methods that clash are prefixed with their name.
    """
    methods = (first, *rest)

    def init(params):
        trainable, s0 = first.init(params)
        return trainable, (s0, *(m.init(params)[1] for m in rest))

    def begin_task(trainable, states, task, n_data):
        out = []
        for m, s in zip(methods, states, strict=True):
            trainable, s = m.begin_task(trainable, s, task, n_data)
            out.append(s)
        return trainable, tuple(out)

    def loss(trainable, states, batch, key):
        total, metrics = first.loss(trainable, states[0], batch, key)
        for i, (m, s) in enumerate(zip(rest, states[1:], strict=True), start=1):
            value, more = m.loss(trainable, s, batch, jax.random.fold_in(key, i))
            total = total + value
            metrics = dict(metrics, **{(f"{m.name}_{k}" if k in metrics else k): v
                                       for k, v in more.items()})
        return total, metrics

    def end_task(trainable, states, task, data=None):
        return tuple(m.end_task(trainable, s, task, data)
                     for m, s in zip(methods, states, strict=True))

    return Method("+".join(m.name for m in methods), init, begin_task, loss, end_task,
                  first.draws)
