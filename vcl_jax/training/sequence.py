"""The task loop of a continual-learning run, written once for every experiment.

:func:`run_sequence` trains one method over a stream of tasks. It resumes after the last
task whose checkpoint exists; for each further task it prepares the task's data, begins the
task, trains it, ends it (the method's consolidation), optionally tunes a copy for
evaluation (the method's ``tune_data``: a coreset), evaluates, and checkpoints the training
state with the run's record. What differs between experiments — a task's data, how a task is
trained (:func:`epoch_trainer`: epochs of minibatches with the optimizer carried on, or the
experiment's own), what ``end_task`` is given, how a model is evaluated, how each task's keys
are derived — comes in as functions, and what differs
between methods (coresets, replay) is the method's; the loop has no experiment's branches.

The record it returns (and keeps in every checkpoint's metadata) is
``{"history": [metrics after each task], "seconds": {phase: total}, "task_seconds": {phase:
[per task]}}`` with the phases ``prepare``, ``train``, ``end``, ``tune`` and ``eval``; an
experiment may add phases of its own before the loop (e.g. ``pretrain``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax import distributed, rng, runlog
from vcl_jax.checkpoint import Checkpoints
from vcl_jax.continual.base import Method, TrainData
from vcl_jax.training.epoch import EpochRunner
from vcl_jax.training.state import TrainState, train_epochs

PHASES = ("prepare", "train", "end", "tune", "eval")


class TrainSchedule(NamedTuple):
    """How each task is trained: ``epochs`` at ``learning_rate``, linearly decayed to 0
    within the task when ``decay``."""

    epochs: int
    learning_rate: float
    decay: bool


def new_record(**phases: float) -> dict:
    """An empty record; ``phases`` are seconds spent before the loop (e.g. ``pretrain``)."""
    names = (*PHASES, *phases)
    return {"history": [], "seconds": {p: float(phases.get(p, 0.0)) for p in names},
            "task_seconds": {p: [] for p in PHASES}}


def train_seconds(record: dict) -> float:
    """Seconds of everything but evaluation (pre-training, data, training, consolidation,
    tuning)."""
    return sum(v for k, v in record["seconds"].items() if k != "eval")


def task_train_seconds(record: dict) -> list[float]:
    """Per task, the seconds of everything but its evaluation (the first task's include the
    compilations)."""
    per = [record["task_seconds"][p] for p in PHASES if p != "eval"]
    return [sum(v) for v in zip(*per, strict=True)]


# (state, task's data, key, task index, label) -> (state, metrics of each epoch); ``label``
# names the task in progress bars and errors (e.g. "vcl_coreset0 task 2/10")
TrainFn = Callable[[TrainState, TrainData, jax.Array, int, str],
                   tuple[TrainState, list[dict]]]


def epoch_trainer(runner: EpochRunner, schedule: TrainSchedule, *, where: str,
                  progress: bool = True) -> TrainFn:
    """The usual :data:`TrainFn`: ``schedule``'s epochs of ``runner`` over the task's data
    (its ``shared`` arrays in every batch), with the optimizer state carried on; a
    divergence is reported as ``"<where> <label>, epoch e/E: ..."``."""

    def train(state, data, key, task, label):
        del task
        return train_epochs(runner, state, data.data, key, epochs=schedule.epochs,
                            learning_rate=schedule.learning_rate, decay=schedule.decay,
                            desc=label, progress=progress, shared=data.shared,
                            where=f"{where} {label}")

    return train


def fold_keys(key: jax.Array) -> Callable[[int], tuple[jax.Array, jax.Array]]:
    """The default keys of task d: training ``fold_in(key, d)``, fine-tuning that key's
    ``tune`` stream (:func:`vcl_jax.rng.stream`)."""
    return lambda d: (jax.random.fold_in(key, d),
                      rng.stream(jax.random.fold_in(key, d), "tune"))


def run_sequence(
    method: Method,
    state: TrainState,
    n_tasks: int,
    *,
    prepare: Callable[[int, TrainState], TrainData],
    train: TrainFn,
    evaluate: Callable[[int, Any], tuple[dict, dict | None]],
    task_keys: Callable[[int], tuple[jax.Array, jax.Array]],
    name: str,
    ckpt: Checkpoints | None = None,
    out_dir: str | None = None,
    tune: TrainFn | None = None,
    keep_evaluated: bool = False,
    describe: Callable[[dict], str] = lambda m: "",
    record: dict | None = None,
    progress: bool = True,
) -> dict:
    """Trains ``method`` over tasks ``0..n_tasks-1`` from ``state``, resuming from ``ckpt``.

    Args:
      prepare: ``(task, state) -> TrainData``, the task's data (the state at its start, e.g.
        to generate a replay pool from), which a data-side method then rewrites
        (``Method.prepare``: a coreset withholds its examples).
      train: trains the task (:func:`epoch_trainer`, or the experiment's own).
      evaluate: ``(task, evaluated) -> (metrics, samples)``: the metrics recorded after the
        task, and arrays saved as ``samples_task<d>.npz`` in ``out_dir`` (or None).
        ``evaluated`` is the trained variables, or those of the tuned copy (a list of them,
        one per task, when the method's ``tune_data`` gives one data set per task).
      task_keys: ``task -> (training key, fine-tuning key)`` (:func:`fold_keys`).
      name: the run's name in progress bars and messages.
      ckpt: the run's checkpoints (None: none written, nothing resumed).
      out_dir: where samples are saved (required when ``evaluate`` returns any).
      tune: trains the copy that is fine-tuned on a method's ``tune_data`` (a coreset) and
        evaluated; the next task continues from the trained state. Required when the method
        has ``tune_data``.
      keep_evaluated: the checkpoint also holds the evaluated trainables as ``"eval"``
        beside the training state ``"train"`` (for re-scoring and diagnostics).
      describe: ``metrics -> str`` for the line printed after each task.
      record: the record to continue (e.g. with a pre-training's seconds); default empty.
        A checkpoint's record replaces it.

    Returns:
      The record (see the module doc).
    """
    if method.tune_data is not None and tune is None:
        raise ValueError(f"{name}: method {method.name} fine-tunes before evaluation "
                         f"(tune_data) but no tune was given")
    like = {"train": state, "eval": state.trainable} if keep_evaluated else {"train": state}
    record = record or new_record()
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(ckpt.latest_step(), like)
        state, start = restored["train"], ckpt.latest_step() + 1
        record = meta["record"]
    log = runlog.current()
    if log is not None and start:
        log.skip(start)

    for d in range(start, n_tasks):
        label = f"{name} task {d + 1}/{n_tasks}"
        k_train, k_tune = task_keys(d)
        clock = _Clock(record)
        task = prepare(d, state)
        if method.prepare is not None:
            mstate, task = method.prepare(state.trainable, state.method_state, d, task)
            state = state._replace(method_state=mstate)
        clock.lap("prepare", task)
        trainable, mstate = method.begin_task(state.trainable, state.method_state, d,
                                              task.n_data)
        state = state._replace(trainable=trainable, method_state=mstate)
        state, hist = train(state, task, k_train, d, label)
        clock.lap("train", state.trainable)
        state = state._replace(method_state=method.end_task(state.trainable, state.method_state,
                                                            d, task.end))
        clock.lap("end", state.method_state)
        core = method.tune_data(state.method_state, d) if method.tune_data else None
        label = f"{name} task {d + 1}, coreset fine-tuning"
        if core is None:
            evaluated = state.trainable
        elif isinstance(core, list):  # one copy per task, each tuned on its own data
            evaluated = [_tuned(method, state, tune, c, d, jax.random.fold_in(k_tune, i),
                                f"{label} ({i + 1}/{len(core)})") for i, c in enumerate(core)]
        else:
            evaluated = _tuned(method, state, tune, core, d, k_tune, label)
        clock.lap("tune", evaluated)
        metrics, samples = evaluate(d, evaluated)
        clock.lap("eval")
        if samples is not None and distributed.is_primary():
            os.makedirs(out_dir, exist_ok=True)
            np.savez_compressed(os.path.join(out_dir, f"samples_task{d}.npz"), **samples)
        metrics["train_final"] = hist[-1]
        record["history"].append(metrics)
        if ckpt is not None:
            saved = {"train": state, "eval": evaluated} if keep_evaluated else {"train": state}
            ckpt.save(d, saved, {"task": d, "record": record})
        if progress:
            print(f"[{name}] task {d + 1}: {describe(metrics)}loss {hist[-1]['loss']:.4f}",
                  flush=True)
        if log is not None:
            log.task(name, d + 1, n_tasks, metrics,
                     {p: record["task_seconds"][p][-1] for p in PHASES})
    if ckpt is not None:
        ckpt.close()
    return record


def _tuned(method: Method, state: TrainState, tune: TrainFn, data: Any, task: int,
           key: jax.Array, label: str) -> Any:
    """The trainables of a copy of ``state`` tuned on ``data`` as one more pass of task
    ``task`` (``begin_task`` with the data's size, then ``tune``)."""
    n = int(jax.tree.leaves(data)[0].shape[0])
    trainable, mstate = method.begin_task(state.trainable, state.method_state, task, n)
    tuned = jax.tree.map(jnp.copy, TrainState(trainable, state.opt_state, mstate))
    tuned, _ = tune(tuned, TrainData(data, n), key, task, label)
    return tuned.trainable


class _Clock:
    """Adds the seconds of each phase of one task to a record (after the phase's arrays are
    ready, so asynchronous dispatch does not move time into the next phase)."""

    def __init__(self, record: dict):
        self.record, self.t = record, time.perf_counter()

    def lap(self, phase: str, ready: Any = None) -> None:
        if ready is not None:
            jax.block_until_ready(ready)
        now = time.perf_counter()
        self.record["seconds"][phase] += now - self.t
        self.record["task_seconds"][phase].append(now - self.t)
        self.t = now
