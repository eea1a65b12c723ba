"""Discriminative split-MNIST VCL (Nguyen et al. 2018; the seed paper's Appendix A).

Five tasks (0/1, 2/3, 4/5, 6/7, 8/9), a multi-head MLP, and the runs of
``cfg.methods``: sequential MLE, VCL, and VCL with a random or k-center coreset.
After each task every seen task's test accuracy is recorded (the accuracy
matrix of the seed paper's Figure 3).

Coresets follow the original code: the coreset is removed from the task's
training data; the propagated posterior never sees it; to predict task i a copy
of the current posterior is trained on task i's coreset (prior: the current
posterior) and then discarded.
"""

from __future__ import annotations

import functools
import operator
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax import runlog
from vcl_jax.checkpoint import config_diff, read_run_config
from vcl_jax.config import ConfigError, flat_dict, flatten
from vcl_jax.configs.split_mnist import SplitMNISTConfig, parse_method
from vcl_jax.continual import TrainData
from vcl_jax.data import complement
from vcl_jax.models import mlp
from vcl_jax.protocols import experiment
from vcl_jax.protocols.split_mnist_setup import (
    Setup,
    TaskData,
    TaskRunner,
    load_tasks,
    pad_batch,
    task_batch,
)
from vcl_jax.training.guard import check_finite, first_bad_epoch
from vcl_jax.training.sequence import new_record, run_sequence
from vcl_jax.training.state import TrainState


def _accuracy(probs: jax.Array, y: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(probs, -1) == jnp.asarray(y)))


def posterior_spread(q, seen: int) -> dict:
    """Percentiles (5th, 50th, 95th) of a mean-field MLP's posterior standard deviations per
    layer: each hidden layer (weights and biases), and the heads of the ``seen`` tasks."""
    def pct(leaves):
        std = np.exp(0.5 * np.concatenate([np.ravel(np.asarray(a)) for a in leaves]))
        return [float(v) for v in np.percentile(std, [5, 50, 95])]

    lv = q.log_var
    out = {f"hidden{i}": pct([layer["w"], layer["b"]]) for i, layer in enumerate(lv["hidden"])}
    out["heads"] = pct([lv["heads"]["w"][:seen], lv["heads"]["b"][:seen]])
    return out


def task_trainer(fit: TaskRunner, where: str):
    """The :data:`~vcl_jax.training.sequence.TrainFn` of ``fit``, as
    :func:`~vcl_jax.training.sequence.epoch_trainer` is of an epoch runner (a fresh Adam per
    task, the original code's), full-batch tasks padded to ``size`` rows; ``before`` changes
    the trainables first (VCL: a new head)."""

    def train(state, task_data, key, task, label, *, size=None, before=None):
        del task
        data = task_data.data if size is None else pad_batch(task_data.data, size)
        trainable = state.trainable if before is None else before(state.trainable)
        trainable, metrics = fit(trainable, state.method_state, data, key)
        jax.block_until_ready(metrics)
        bad = first_bad_epoch(metrics)
        check_finite(metrics, trainable, f"{where} {label}"
                     + ("" if bad is None else f", epoch {bad + 1}/{len(metrics['loss'])}"))
        hist = [{k: float(v[e]) for k, v in metrics.items()} for e in range(len(metrics["loss"]))]
        return state._replace(trainable=trainable), hist

    return train


def run_one(setup: Setup, name: str, tasks: list[TaskData], *,
            progress: bool = True) -> dict:
    """One method (``mle``, ``vcl``, ``vcl+coreset_random``, ``ewc_diag``, ...) over all tasks,
    by the task loop of :func:`~vcl_jax.training.sequence.run_sequence` (no checkpoints:
    a whole comparison takes about a minute).

    Returns:
      ``accuracy``: row t = test accuracy of tasks 0..t after task t; ``average``
      per row; per-task final losses; wall times (s) of training, coreset tuning
      and evaluation.
    """
    cfg = setup.cfg
    dim, n_out = tasks[0].x.shape[1], len(cfg.data.groups[0])
    params = mlp.init_mlp(setup.k_init, dim, cfg.model.hidden, len(tasks), n_out,
                          cfg.model.head_init_std)
    method, fit, tune = setup.run(name, dim)
    spec = parse_method(name)
    is_vcl, kind = spec.variational, spec.coreset_kind
    # Full-batch training pads every task to the largest one (weight-0 rows), and every
    # task's test images are padded to one size: each trainer and the predictive compile
    # once for the whole comparison, not once per task shape. (Minibatches are drawn from
    # real examples only, so minibatch training keeps the task's own size.)
    n_train = max(len(task.y) for task in tasks)
    size = n_train if cfg.optim.batch_size is None or cfg.optim.batch_size >= n_train else None
    n_test = max(len(task.x_test) for task in tasks)
    test_x = [jnp.asarray(np.pad(task.x_test, ((0, n_test - len(task.x_test)), (0, 0))))
              for task in tasks]

    t0 = time.perf_counter()
    if is_vcl:  # the first posterior's means come from an MLE fit of task 0 (its coreset out)
        x, y = tasks[0].x, tasks[0].y
        if kind:
            keep = complement(setup.pick(kind, 0, x), len(x))
            x, y = x[keep], y[keep]
        params, _ = setup.fit_mle(params, (), task_batch(x, y, 0, size), setup.task_keys(0).mle_fit)
    trainable, mstate = method.init(params)
    if is_vcl:
        trainable = setup.unseen_heads_at_prior(trainable)
    jax.block_until_ready(trainable)
    rec = new_record(pretrain=time.perf_counter() - t0)

    def prepare(t, state):
        del state
        batch = task_batch(tasks[t].x, tasks[t].y, t)
        return TrainData(batch, len(tasks[t].y), end=batch)

    train, train_tune = task_trainer(fit, "split_mnist"), tune and task_trainer(tune, "split_mnist")

    trained = {}  # the latest trained state (its posterior is reported, not a tuned copy)

    def train_task(state, data, key, t, label):
        new_head = None
        if is_vcl and t > 0:  # a fresh head for the new task
            log_var = setup.ng_head_log_var(data.n_data) if method.optimizer else None
            new_head = functools.partial(setup.new_head, setup.task_keys(t).head, head=t,
                                         log_var=log_var)
        trained["state"], hist = train(state, data, key, t, label, size=size, before=new_head)
        return trained["state"], hist

    def evaluate(t, evaluated):
        k_eval, row = setup.task_keys(t).eval, []
        for i in range(t + 1):
            q_i = evaluated[i] if isinstance(evaluated, list) else evaluated
            if is_vcl:
                probs = setup.predict(q_i, test_x[i], i, jax.random.fold_in(k_eval, i),
                                       n_samples=cfg.vcl.test_samples)
            else:
                probs = setup.predict_mle(q_i, test_x[i], i)
            row.append(_accuracy(probs[:len(tasks[i].y_test)], tasks[i].y_test))
        metrics = {"accuracy": row, "average": float(np.mean(row))}
        if is_vcl:  # the posterior that goes on to the next task (not a tuned copy)
            metrics["posterior_std"] = posterior_spread(trained["state"].trainable, t + 1)
        return metrics, None

    rec = run_sequence(
        method, TrainState(trainable, (), mstate), len(tasks), prepare=prepare,
        train=train_task, tune=train_tune, evaluate=evaluate, name=name,
        task_keys=lambda t: operator.attrgetter("train", "tune")(setup.task_keys(t)),
        record=rec,
        progress=progress, describe=lambda m: f"average accuracy {m['average']:.4f}, ")
    sec = rec["seconds"]
    times = {"train_s": sec["pretrain"] + sec["prepare"] + sec["train"] + sec["end"],
             "coreset_s": sec["tune"], "eval_s": sec["eval"]}
    history = rec["history"]
    return {"accuracy": [h["accuracy"] for h in history],
            "average": [h["average"] for h in history],
            "final_losses": [h["train_final"] for h in history], **times,
            **({"posterior_std": [h["posterior_std"] for h in history]} if is_vcl else {}),
            "total_s": sum(times.values())}


def check_run_dir(run_dir: str, cfg: SplitMNISTConfig) -> None:
    """Refuses, before anything is written, a run directory holding another config's results."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return
    saved = read_run_config(run_dir)
    # a folder is not the data
    diff = config_diff(flatten(saved), flat_dict(cfg), ignore=("data.data_dir",))
    if diff:
        raise ConfigError(f"{run_dir} holds the results of a different config; nothing was "
                          f"overwritten. Differences:\n  " + "\n  ".join(diff) +
                          "\nUse another --run-dir, or delete that folder to start over.")


def run(cfg: SplitMNISTConfig, run_dir: str, *, progress: bool = True) -> dict:
    """Runs every run of the config and writes the comparison to ``run_dir``."""
    from vcl_jax.protocols import split_mnist_report as report

    cfg.validate()
    check_run_dir(run_dir, cfg)
    tasks = load_tasks(cfg)
    size = cfg.coreset.coreset_size
    for i, task in enumerate(tasks):
        if any(parse_method(m).coreset for m in cfg.methods) and size > len(task.y):
            raise ConfigError(f"coreset_size {size} is larger than task {i} "
                              f"({len(task.y)} training images); use ≤ {len(task.y)}")
    with experiment.locked(run_dir, cfg):
        setup = Setup(cfg)
        with runlog.open_log(run_dir, len(cfg.methods) * len(tasks), progress=progress):
            results = {name: run_one(setup, name, tasks, progress=progress)
                       for name in cfg.methods}
        data = cfg.data.record([len(t.y) for t in tasks], [t.x for t in tasks])
        return experiment.finish(run_dir, cfg, data, results,
                                 lambda m: report.write(run_dir, cfg, m),
                                 train_sizes=[len(t.y) for t in tasks],
                                 test_sizes=[len(t.y_test) for t in tasks])
