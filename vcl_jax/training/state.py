"""The train state, optimizer and jitted train step shared by the continual protocols."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vcl_jax import runlog
from vcl_jax.continual.base import Method
from vcl_jax.interrupt import stop_if_requested
from vcl_jax.training.epoch import EpochRunner, epoch_steps, pad_rows, row_bucket
from vcl_jax.training.guard import check_finite

PyTree = Any


class TrainState(NamedTuple):
    """Everything that changes during training: trainable variables, optimizer, method state."""

    trainable: PyTree
    opt_state: PyTree
    method_state: PyTree

    @classmethod
    def create(cls, method: Method, opt: optax.GradientTransformation,
               params: PyTree) -> TrainState:
        """The state at the start of a method's first task: its trainable variables and
        method state from ``params``, and a fresh optimizer state for those variables."""
        trainable, method_state = method.init(params)
        return cls(trainable, opt.init(trainable), method_state)


def adam(learning_rate: float) -> optax.GradientTransformation:
    """Adam whose learning rate lives in the optimizer state (set per epoch, no retrace)."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def optimizer_for(method: Method, learning_rate: float) -> optax.GradientTransformation:
    """The update rule that trains ``method``: its own (:attr:`Method.optimizer`, e.g.
    natural-gradient VCL's), else :func:`adam`; the learning rate is set per epoch either way."""
    if method.optimizer is not None:
        return method.optimizer(learning_rate)
    return adam(learning_rate)


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
    hp = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return state._replace(opt_state=state.opt_state._replace(hyperparams=hp))


def data_sharding() -> NamedSharding | None:
    """Batch sharding over every device of every process (None on one device): in a
    multi-process run (:mod:`vcl_jax.distributed`) the gradients are reduced across
    processes, not only across a process's own devices."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    return NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))


def make_train_step(method: Method, opt: optax.GradientTransformation,
                    sharding: NamedSharding | None = None):
    """The pure train step ``(state, batch, key) -> (state, metrics)``.

    With ``sharding`` the batch is split over devices along its first axis and
    the params stay replicated; XLA inserts the gradient all-reduce (data parallel).
    """

    def step(state: TrainState, batch: PyTree, key: jax.Array):
        if sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, sharding)
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.trainable, state.method_state, batch, key)
        # a method that owns its update rule is given its state (its prior, its data size)
        extra = {} if method.optimizer is None else {"method_state": state.method_state}
        updates, opt_state = opt.update(grads, state.opt_state, state.trainable, **extra)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(trainable, opt_state, state.method_state), metrics

    return step


def train_epochs(runner: EpochRunner, state: TrainState, data: PyTree, key: jax.Array, *,
                 epochs: int, learning_rate: float, decay: bool, desc: str = "",
                 progress: bool = True, shared: dict | None = None, where: str = ""
                 ) -> tuple[TrainState, list[dict]]:
    """Runs ``epochs`` epochs; lr decays linearly to 0 over them when ``decay``.
    ``shared``: arrays every step receives whole (:func:`~vcl_jax.training.epoch.scan_steps`).
    After every epoch the loss terms and the trainable variables are checked for
    non-finite values (:func:`~vcl_jax.training.guard.check_finite`; ``where`` names the
    run in the error, default ``desc``).

    Returns:
      The new state and one metrics dict (floats) per epoch.
    """
    from tqdm import tqdm

    n = jax.tree.leaves(data)[0].shape[0]
    data = pad_rows(data, row_bucket(n))  # one compiled epoch for tasks/coresets of many sizes
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    log = runlog.current()
    for e in bar:
        stop_if_requested()
        lr = learning_rate * (1.0 - e / epochs) if decay else learning_rate
        state = set_learning_rate(state, lr)
        t0 = time.perf_counter()
        state, metrics = runner(state, data, jax.random.fold_in(key, e), shared, n=n)
        metrics = {k: float(v) for k, v in metrics.items()}
        check_finite(metrics, state.trainable, f"{where or desc}, epoch {e + 1}/{epochs}")
        history.append(metrics)
        if log is not None:
            steps = epoch_steps(n, runner.batch_size, runner.multiple)
            log.epoch(desc, e + 1, epochs, steps, steps * runner.batch_size,
                      time.perf_counter() - t0, lr, metrics)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
    return state, history
