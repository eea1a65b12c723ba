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
import optax

PyTree = Any
BatchLoss = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class View(NamedTuple):
    """How a method's trainable variables hold a model's params, for methods that train
    something other than the params themselves (VCL: a mean-field posterior).

    Attributes:
      get: ``trainable -> params``, the point the params-level methods act on (VCL: the
        posterior means), differentiable, so their losses train it.
      put: ``(trainable, params) -> trainable`` with those params in place.
    """

    get: Callable
    put: Callable


class TrainData(NamedTuple):
    """What one task trains on.

    Attributes:
      data: arrays with a leading example axis, cut into the epochs' batches.
      n_data: the task's number of training examples (``begin_task``'s N, e.g. VCL's KL/N).
      shared: arrays every batch sees whole (e.g. a replay pool), or None.
      end: what the method's ``end_task`` is given (e.g. an EWC Fisher's examples), or None.
    """

    data: Any
    n_data: int
    shared: Any = None
    end: Any = None


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
      view: None when the trainable variables are the params (MLE, EWC, distillation);
        otherwise the :class:`View` of the params inside them (VCL).
      prepare: None, or for methods that act on the data rather than the loss (coresets,
        replay) ``(trainable, state, task, TrainData) -> (state, TrainData)``, run on the host
        before ``begin_task``: e.g. a coreset withholds its examples from the task and
        replays earlier tasks' coresets with it.
      tune_data: None, or ``(state, task) -> data | list of data | None``: examples (a
        dict like ``TrainData.data``) to fine-tune a copy of the trainables on before each
        evaluation (a coreset's ``finetune`` mode), or one such dict per task, each tuning a
        copy of its own (``finetune_each``); the next task continues from the untuned ones.
      optimizer: None (the experiment's optimizer trains the trainables: Adam), or for a
        method that owns its update rule ``learning_rate -> transformation``: an optax
        transformation whose ``update(grads, opt_state, trainable, *, method_state)`` also
        receives the method's state (natural-gradient VCL reads its prior's size from it).
    """

    name: str
    init: Callable
    begin_task: Callable
    loss: Callable
    end_task: Callable
    draws: Callable
    view: View | None = None
    prepare: Callable | None = None
    tune_data: Callable | None = None
    optimizer: Callable | None = None


def stack(params: PyTree, n: int) -> PyTree:
    """``n`` copies of ``params`` on a new leading axis."""
    return jax.tree.map(lambda p: jax.numpy.broadcast_to(p, (n, *p.shape)), params)


def keep_begin(params, state, task, n_data):
    """A ``begin_task`` that changes nothing."""
    del task, n_data
    return params, state


def keep_end(params, state, task, data=None):
    """An ``end_task`` that keeps the state."""
    del params, task, data
    return state


def point_draws(params, key, n):
    """The ``draws`` of a point estimate: the params themselves (one copy; none for n = 0)."""
    del key
    return stack(params, 1 if n else 0)


def data_method(name: str, init: Callable, prepare: Callable,
                tune_data: Callable | None = None) -> Method:
    """A method that acts on the data alone (:attr:`Method.prepare`, optionally
    :attr:`Method.tune_data`): it adds nothing to the loss, does nothing at a task's
    boundaries and draws the params; chained, it changes what the other members see."""

    def no_loss(params, state, batch, key):
        del params, state, batch, key
        return jax.numpy.zeros(()), {}

    return Method(name, init, keep_begin, no_loss, keep_end, point_draws,
                  prepare=prepare, tune_data=tune_data)


def chain(first: Method, *rest: Method) -> Method:
    """Composes methods into one whose trainables and state are the union of theirs.

    At most one member may own trainables other than the params (a :attr:`Method.view`,
    e.g. VCL's posterior); the chain trains that member's variables, and every other member
    acts on the params inside them (``view.get``: for VCL the posterior means, so EWC
    anchors and penalises the means and distillation's teacher is the previous means).
    Without such a member all of them share the params.

    The loss is the sum of the members' losses; each member keeps its own state (the
    chained state is a tuple, in order); ``begin_task`` and ``end_task`` run in order;
    draws and the update rule (:attr:`Method.optimizer`) come from the owning member (else
    ``first``), the update given that member's state. Data-side members' ``prepare`` run
    in order, each on the task as the previous one left it; ``tune_data`` is the first
    member's that gives any. Metric names of later members that
    clash are prefixed with their name.

    Raises:
      ValueError: two members own trainables (e.g. two VCL methods).
    """
    methods = (first, *rest)
    owners = [m for m in methods if m.view is not None]
    if len(owners) > 1:
        raise ValueError("chain: at most one method may own trainables other than the params; "
                         f"got {', '.join(m.name for m in owners)}")
    owner = owners[0] if owners else first
    view = owner.view or View(lambda t: t, lambda t, p: p)

    def of(m, trainable):  # what member m trains: the chain's variables or the params in them
        return trainable if m is owner else view.get(trainable)

    def back(m, trainable, mine):  # the chain's variables after member m returned ``mine``
        return mine if m is owner else view.put(trainable, mine)

    def init_fn(params):
        inits = [m.init(params) for m in methods]
        trainable = next(t for m, (t, _) in zip(methods, inits, strict=True) if m is owner)
        return trainable, tuple(s for _, s in inits)

    def begin_task_fn(trainable, states, task, n_data):
        out = []
        for m, s in zip(methods, states, strict=True):
            mine, s = m.begin_task(of(m, trainable), s, task, n_data)
            trainable = back(m, trainable, mine)
            out.append(s)
        return trainable, tuple(out)

    def loss_fn(trainable, states, batch, key):
        total, metrics = first.loss(of(first, trainable), states[0], batch, key)
        for i, (m, s) in enumerate(zip(rest, states[1:], strict=True), start=1):
            value, more = m.loss(of(m, trainable), s, batch, jax.random.fold_in(key, i))
            total = total + value
            metrics = dict(metrics, **{(f"{m.name}_{k}" if k in metrics else k): v
                                       for k, v in more.items()})
        return total, metrics

    def end_task_fn(trainable, states, task, data=None):
        return tuple(m.end_task(of(m, trainable), s, task, data)
                     for m, s in zip(methods, states, strict=True))

    def prepare_fn(trainable, states, task, data):
        out = list(states)
        for i, m in enumerate(methods):
            if m.prepare is not None:
                out[i], data = m.prepare(of(m, trainable), states[i], task, data)
        return tuple(out), data

    def tune_data_fn(states, task):
        for m, s in zip(methods, states, strict=True):
            found = m.tune_data(s, task) if m.tune_data is not None else None
            if found is not None:
                return found
        return None

    def optimizer_fn(learning_rate):  # the owner's update rule, given the owner's state
        tx = owner.optimizer(learning_rate)
        mine = methods.index(owner)

        def update_fn(grads, opt_state, trainable=None, *, method_state, **extra):
            return tx.update(grads, opt_state, trainable, method_state=method_state[mine],
                             **extra)

        return optax.GradientTransformationExtraArgs(tx.init, update_fn)

    data_side = any(m.prepare is not None for m in methods)
    tuning = any(m.tune_data is not None for m in methods)
    return Method("+".join(m.name for m in methods), init_fn, begin_task_fn, loss_fn,
                  end_task_fn, owner.draws, owner.view,
                  prepare_fn if data_side else None, tune_data_fn if tuning else None,
                  optimizer_fn if owner.optimizer is not None else None)
