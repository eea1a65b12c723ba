"""The task loop of a continual-learning run, written once for every experiment.

:func:`run_sequence` trains one method over a stream of tasks. It resumes after the last
task whose checkpoint exists; for each further task it prepares the task's data, begins the
task, trains its epochs, ends it (the method's consolidation), optionally tunes a copy for
evaluation (the method's ``tune_data``: a coreset), evaluates, and checkpoints the training
state with the run's record. What differs between experiments — a task's data, what
``end_task`` is given, how a model is evaluated — comes in as functions, and what differs
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

from vcl_jax.checkpoint import Checkpoints
from vcl_jax.continual.base import Method, TrainData
from vcl_jax.training.epoch import EpochRunner
from vcl_jax.training.state import TrainState, train_epochs

PHASES = ("prepare", "train", "end", "tune", "eval")


class Schedule(NamedTuple):
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


# The per-run totals of records written before this loop existed (vcl_diffusion's) and the
# phase each now counts under.
_LEGACY_SECONDS = {"train_seconds": "train", "eval_seconds": "eval",
                   "pretrain_seconds": "pretrain"}


def upgrade_record(record: dict) -> dict:
    """A record read from a checkpoint, with every phase present: an earlier record's
    totals carried over (an older vcl_diffusion ``train_seconds`` included its pre-training,
    kept here as ``pretrain``), missing phases 0, and no per-task figures before it."""
    seconds = record.setdefault("seconds", {})
    if "train_seconds" in record:
        old = {phase: record.pop(key, 0.0) for key, phase in _LEGACY_SECONDS.items()}
        old["train"] -= old["pretrain"]
        record.pop("task_train_seconds", None)
        seconds.update(old)
    for p in PHASES:
        seconds.setdefault(p, 0.0)
    tasks = record.setdefault("task_seconds", {})
    for p in PHASES:
        tasks.setdefault(p, [])
    return record


def train_seconds(record: dict) -> float:
    """Seconds of everything but evaluation (pre-training, data, training, consolidation,
    tuning)."""
    return sum(v for k, v in record["seconds"].items() if k != "eval")


def task_train_seconds(record: dict) -> list[float]:
    """Per task, the seconds of everything but its evaluation (the first task's include the
    compilations)."""
    per = [record["task_seconds"][p] for p in PHASES if p != "eval"]
    return [sum(v) for v in zip(*per, strict=True)]


def run_sequence(
    method: Method,
    state: TrainState,
    runner: EpochRunner,
    ckpt: Checkpoints,
    n_tasks: int,
    *,
    prepare: Callable[[int, TrainState], TrainData],
    evaluate: Callable[[int, Any], tuple[dict, dict | None]],
    schedule: Schedule,
    key: jax.Array,
    name: str,
    where: str,
    out_dir: str,
    tune_schedule: Schedule | None = None,
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
      evaluate: ``(task, trainable) -> (metrics, samples)``: the metrics recorded after the
        task, and arrays saved as ``samples_task<d>.npz`` in ``out_dir`` (or None).
      schedule: the epochs and learning rate of each task.
      key: task d trains with ``fold_in(key, d)``.
      name: the run's name in progress bars and messages; ``where`` prefixes divergence
        errors (e.g. the experiment's name).
      tune_schedule: the epochs and learning rate of the fine-tuning on a method's
        ``tune_data`` (a copy is tuned and evaluated; the next task continues from the
        trained state). Required when the method has ``tune_data``.
      keep_evaluated: the checkpoint also holds the evaluated trainables as ``"eval"``
        beside the training state ``"train"`` (for re-scoring and diagnostics).
      describe: ``metrics -> str`` for the line printed after each task.
      record: the record to continue (e.g. with a pre-training's seconds); default empty.
        A checkpoint's record replaces it.

    Returns:
      The record (see the module doc).
    """
    if method.tune_data is not None and tune_schedule is None:
        raise ValueError(f"{name}: method {method.name} fine-tunes before evaluation "
                         f"(tune_data) but no tune_schedule was given")
    os.makedirs(out_dir, exist_ok=True)
    like = {"train": state, "eval": state.trainable} if keep_evaluated else {"train": state}
    record = record or new_record()
    start = 0
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(ckpt.latest_step(), like)
        state, start = restored["train"], ckpt.latest_step() + 1
        record = upgrade_record(meta["record"])

    for d in range(start, n_tasks):
        desc = f"{name} task {d + 1}/{n_tasks}"
        clock = _Clock(record)
        task = prepare(d, state)
        if method.prepare is not None:
            mstate, task = method.prepare(state.trainable, state.method_state, d, task)
            state = state._replace(method_state=mstate)
        clock.lap("prepare", task)
        trainable, mstate = method.begin_task(state.trainable, state.method_state, d,
                                              task.n_data)
        state = state._replace(trainable=trainable, method_state=mstate)
        state, hist = train_epochs(runner, state, task.data, jax.random.fold_in(key, d),
                                   epochs=schedule.epochs, learning_rate=schedule.learning_rate,
                                   decay=schedule.decay, desc=desc, progress=progress,
                                   shared=task.shared, where=f"{where} {desc}")
        clock.lap("train", state.trainable)
        state = state._replace(method_state=method.end_task(state.trainable, state.method_state,
                                                            d, task.end))
        clock.lap("end", state.method_state)
        core = method.tune_data(state.method_state, d) if method.tune_data else None
        evaluated = state.trainable if core is None else _tuned(
            method, state, runner, core, d, jax.random.fold_in(jax.random.fold_in(key, d), 10_000),
            tune_schedule, desc=f"{name} task {d + 1} coreset", progress=progress,
            where=f"{where} {name} task {d + 1}, coreset fine-tuning")
        clock.lap("tune", evaluated)
        metrics, samples = evaluate(d, evaluated)
        clock.lap("eval")
        if samples is not None:
            np.savez_compressed(os.path.join(out_dir, f"samples_task{d}.npz"), **samples)
        metrics["train_final"] = hist[-1]
        record["history"].append(metrics)
        saved = {"train": state, "eval": evaluated} if keep_evaluated else {"train": state}
        ckpt.save(d, saved, {"task": d, "record": record})
        if progress:
            print(f"[{name}] task {d + 1}: {describe(metrics)}loss {hist[-1]['loss']:.4f}",
                  flush=True)
    ckpt.close()
    return record


def _tuned(method: Method, state: TrainState, runner: EpochRunner, data: Any, task: int,
           key: jax.Array, schedule: Schedule, **kw) -> Any:
    """The trainables of a copy of ``state`` tuned on ``data`` as one more pass of task
    ``task`` (``begin_task`` with the data's size, then ``schedule``'s epochs)."""
    n = int(jax.tree.leaves(data)[0].shape[0])
    trainable, mstate = method.begin_task(state.trainable, state.method_state, task, n)
    tuned = jax.tree.map(jnp.copy, TrainState(trainable, state.opt_state, mstate))
    tuned, _ = train_epochs(runner, tuned, data, key, epochs=schedule.epochs,
                            learning_rate=schedule.learning_rate, decay=schedule.decay, **kw)
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
