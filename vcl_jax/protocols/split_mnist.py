"""Discriminative split-MNIST VCL (Nguyen et al. 2018; the seed paper's Appendix A).

Five tasks (0/1, 2/3, 4/5, 6/7, 8/9), a multi-head MLP, and the runs of
``cfg.runs``: sequential MLE, VCL, and VCL with a random or k-center coreset.
After each task every seen task's test accuracy is recorded (the accuracy
matrix of the seed paper's Figure 3).

Coresets follow the original code: the coreset is removed from the task's
training data; the propagated posterior never sees it; to predict task i a copy
of the current posterior is trained on task i's coreset (prior: the current
posterior) and then discarded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vcl_jax.checkpoint import config_diff
from vcl_jax.config import ConfigError, to_dict
from vcl_jax.continual import Method, VCLState, ewc, mle, vcl
from vcl_jax.data import TaskStream, complement, load, record, select, to_float
from vcl_jax.models import bayes_mlp, mlp
from vcl_jax.protocols.split_mnist_config import SplitMNISTConfig
from vcl_jax.run_lock import RunLock
from vcl_jax.training.epoch import epoch_indices, scan_steps
from vcl_jax.training.guard import check_finite, first_bad_epoch
from vcl_jax.training.state import TrainState, make_train_step
from vcl_jax.vi import mean_field as mf

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task, flattened: ``x: [N, 784]`` float32 in [0, 1], ``y: [N]`` labels within the task."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _flat(images: np.ndarray) -> np.ndarray:
    return to_float(images).reshape(len(images), -1)


def load_tasks(cfg: SplitMNISTConfig) -> list[TaskData]:
    """The task stream's train/test subsets, capped as the config says."""
    train = load(cfg.dataset, "train", data_dir=cfg.data_dir, variant=cfg.data_variant)
    test = load(cfg.dataset, "test", data_dir=cfg.data_dir, variant=cfg.data_variant)
    stream = TaskStream.from_groups(cfg.groups)
    rng = np.random.default_rng(cfg.seed)  # caps take a random subset (mnist-5k is sorted)
    tasks = []
    for tr, te in zip(stream.split(train), stream.split(test), strict=True):
        keep = np.sort(rng.permutation(len(tr))[:cfg.max_per_task])
        x, y = _flat(tr.images[keep]), tr.local_labels[keep]
        keep = np.sort(rng.permutation(len(te))[:cfg.max_test_per_task])
        xt, yt = _flat(te.images[keep]), te.local_labels[keep]
        if cfg.validation_fraction:  # evaluate on held-out training images, never the test split
            perm = rng.permutation(len(y))
            n_val = max(1, int(round(cfg.validation_fraction * len(y))))
            val, fit = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            x, y, xt, yt = x[fit], y[fit], x[val], y[val]
        tasks.append(TaskData(x, y, xt, yt))
    return tasks


def task_batch(x: np.ndarray, y: np.ndarray, head: int, size: int | None = None) -> dict:
    """One task's examples as a batch; ``size`` pads it to that many with weight-0 rows.

    Every loss is a ``w``-weighted mean, so a padded batch trains exactly on its real
    examples, and the tasks (whose sizes differ) share one compiled full-batch trainer.
    """
    n = len(y)
    pad = 0 if size is None else size - n
    if pad < 0:
        raise ValueError(f"cannot pad {n} examples to {size}")
    return {"x": jnp.asarray(np.pad(x, ((0, pad), (0, 0)))),
            "y": jnp.asarray(np.pad(y, (0, pad)), jnp.int32),
            "head": jnp.full((n + pad,), head, jnp.int32),
            "w": jnp.asarray(np.pad(np.ones(n, np.float32), (0, pad)))}


class Trainer:
    """All epochs of a task in one jitted call, with a fresh Adam per call (the original code).

    One ``lax.scan`` over epochs; an epoch is one full-batch step, or a scan over
    shuffled minibatches when ``batch_size`` is smaller than the data.
    """

    def __init__(self, method: Method, *, learning_rate: float, epochs: int,
                 batch_size: int | None):
        self.opt = optax.adam(learning_rate)
        step = make_train_step(method, self.opt)

        def train(state, data, key):
            n = data["y"].shape[0]

            def epoch(state, e):
                k = jax.random.fold_in(key, e)
                if batch_size is None or batch_size >= n:
                    return step(state, data, k)
                kp, ks = jax.random.split(k)
                state, m = scan_steps(step, state, data, epoch_indices(kp, n, batch_size), ks)
                return state, jax.tree.map(jnp.mean, m)

            return jax.lax.scan(epoch, state, jnp.arange(epochs))

        self._train = jax.jit(train)

    def __call__(self, trainable: PyTree, method_state: PyTree, data: dict,
                 key: jax.Array) -> tuple[PyTree, dict]:
        """Returns the trained variables and per-epoch metrics ``{name: [epochs]}``."""
        state = TrainState(trainable, self.opt.init(trainable), method_state)
        state, metrics = self._train(state, data, key)
        return state.trainable, metrics


def _accuracy(probs: jax.Array, y: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(probs, -1) == jnp.asarray(y)))


class Runner:
    """The methods of one config, built once so their jitted steps are reused."""

    def __init__(self, cfg: SplitMNISTConfig):
        self.cfg = cfg

        def mle_loss(params, batch, key):
            del key
            nll = mlp.nll(mlp.apply(params, batch["x"], batch["head"]), batch["y"])
            return jnp.sum(nll * batch["w"]) / jnp.sum(batch["w"])

        def expected_loss(estimator):
            return lambda q, batch, key: bayes_mlp.expected_nll(
                q, batch["x"], batch["y"], batch["head"], key, estimator=estimator,
                n_samples=cfg.train_samples, weight=batch["w"])

        def example_loss(params, ex):
            return mlp.nll(mlp.apply(params, ex["x"][None], ex["head"][None]), ex["y"][None])[0]

        self.mle = mle(mle_loss)
        # The MLP's diagonal Fisher in closed form: the per-example gradients' squares
        # summed by matmuls (the same numbers as vmapped per-example gradients, without
        # materialising one gradient per example).
        fisher = jax.jit(lambda p, d: mlp.diag_fisher(p, d["x"], d["y"], d["head"]))
        self.ewc = ewc(mle_loss, example_loss, n_tasks=len(cfg.groups), lam=cfg.ewc_lambda,
                       diag_fn=fisher)
        vcl_kw = dict(n_samples=cfg.train_samples, kl_scale=cfg.kl_scale,
                      prior_sigma=cfg.prior_sigma, log_var_init=cfg.log_var_init)
        self.vcl = vcl(None, **vcl_kw, expected_loss=expected_loss(cfg.estimator))
        kw = dict(learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size)
        self.fit_mle = Trainer(self.mle, **kw)
        self.fit_vcl = Trainer(self.vcl, **kw)
        self.fit_tune = self.fit_vcl if cfg.tune_estimator == cfg.estimator else Trainer(
            vcl(None, **vcl_kw, expected_loss=expected_loss(cfg.tune_estimator)), **kw)
        self.fit_ewc = Trainer(self.ewc, **kw)
        self.predict = jax.jit(bayes_mlp.predict_proba, static_argnames=("n_samples",))
        self.predict_mle = jax.jit(lambda p, x, head: jax.nn.softmax(mlp.apply(p, x, head)))

    def new_head(self, key: jax.Array, q: mf.MeanField, head: int) -> mf.MeanField:
        cfg = self.cfg
        kw, kb = jax.random.split(key)
        d, o = q.mean["heads"]["w"].shape[1:]
        mean = {"w": mlp.truncated_normal(kw, (d, o), cfg.head_init_std),
                "b": mlp.truncated_normal(kb, (o,), cfg.head_init_std)}
        return bayes_mlp.reset_head(q, head, mean, cfg.log_var_init)

    def unseen_heads_at_prior(self, q: mf.MeanField) -> mf.MeanField:
        """Heads of later tasks equal their prior N(0, σ₀²), so they add nothing to the KL."""
        d, o = q.mean["heads"]["w"].shape[1:]
        zero = {"w": jnp.zeros((d, o)), "b": jnp.zeros((o,))}
        for h in range(1, q.mean["heads"]["w"].shape[0]):
            q = bayes_mlp.reset_head(q, h, zero, 2.0 * float(np.log(self.cfg.prior_sigma)))
        return q

    def coreset_tuned(self, q: mf.MeanField, coreset: dict, key: jax.Array) -> mf.MeanField:
        """A copy of ``q`` trained on one task's coreset with ``q`` as the prior."""
        n = int(coreset["y"].shape[0])
        if n == 0:
            return q
        state = VCLState(q, jnp.asarray(self.cfg.kl_scale / n, jnp.float32))
        tuned, _ = self.fit_tune(jax.tree.map(jnp.copy, q), state, coreset, key)
        return tuned


def run_one(runner: Runner, name: str, tasks: list[TaskData], *,
            progress: bool = True) -> dict:
    """One run (``mle``, ``vcl``, ``vcl_random``, ``vcl_kcenter``, ``ewc``) over all tasks.

    Returns:
      ``accuracy``: row t = test accuracy of tasks 0..t after task t; ``average``
      per row; per-task final losses; wall times (s) of training, coreset tuning
      and evaluation.
    """
    from tqdm import tqdm

    cfg = runner.cfg
    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_tasks = jax.random.split(key)
    d, n_out = tasks[0].x.shape[1], len(cfg.groups[0])
    params = mlp.init_mlp(k_init, d, cfg.hidden, len(tasks), n_out, cfg.head_init_std)
    is_vcl = name.startswith("vcl")
    core = cfg.coreset_method(name)
    q = state = None
    if name == "ewc":
        params, ewc_state = runner.ewc.init(params)
    # Full-batch training pads every task to the largest one (weight-0 rows), and every
    # task's test images are padded to one size: each trainer and the predictive compile
    # once for the whole comparison, not once per task shape. (Minibatches are drawn from
    # real examples only, so minibatch training keeps the task's own size.)
    n_train = max(len(task.y) for task in tasks)
    size = n_train if cfg.batch_size is None or cfg.batch_size >= n_train else None
    n_test = max(len(task.x_test) for task in tasks)
    test_x = [jnp.asarray(np.pad(task.x_test, ((0, n_test - len(task.x_test)), (0, 0))))
              for task in tasks]
    coresets, rows, losses = [], [], []
    times = {"train_s": 0.0, "coreset_s": 0.0, "eval_s": 0.0}
    bar = tqdm(list(enumerate(tasks)), desc=name, disable=not progress, leave=False)
    for t, task in bar:
        k_core, k_pre, k_train, k_head, k_tune, k_eval = jax.random.split(
            jax.random.fold_in(k_tasks, t), 6)
        x, y = task.x, task.y
        if core:
            idx = select(core, k_core, x, cfg.coreset_size)
            coresets.append(task_batch(x[idx], y[idx], t))
            keep = complement(idx, len(x))
            x, y = x[keep], y[keep]
        data = task_batch(x, y, t, size)
        t0 = time.perf_counter()
        if name == "mle":
            params, metrics = runner.fit_mle(params, (), data, k_train)
        elif name == "ewc":
            params, metrics = runner.fit_ewc(params, ewc_state, data, k_train)
            ewc_state = runner.ewc.end_task(params, ewc_state, t, task_batch(x, y, t))
        else:
            if t == 0:  # the first posterior's means come from an MLE fit of task 0
                params, _ = runner.fit_mle(params, (), data, k_pre)
                q, state = runner.vcl.init(params)
                q = runner.unseen_heads_at_prior(q)
            else:
                q = runner.new_head(k_head, q, t)
            q, state = runner.vcl.begin_task(q, state, t, len(y))
            q, metrics = runner.fit_vcl(q, state, data, k_train)
            state = runner.vcl.end_task(q, state, t)
        jax.block_until_ready(metrics)
        times["train_s"] += time.perf_counter() - t0
        bad = first_bad_epoch(metrics)
        check_finite(metrics, params if q is None else q,
                     f"split_mnist {name} task {t + 1}/{len(tasks)}"
                     + ("" if bad is None else f", epoch {bad + 1}/{cfg.epochs}"))
        losses.append({k: float(v[-1]) for k, v in metrics.items()})

        row = []
        for i in range(t + 1):
            t0 = time.perf_counter()
            q_i = runner.coreset_tuned(q, coresets[i], jax.random.fold_in(k_tune, i)) \
                if core else q
            jax.block_until_ready(q_i)
            times["coreset_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if is_vcl:
                probs = runner.predict(q_i, test_x[i], i, jax.random.fold_in(k_eval, i),
                                       n_samples=cfg.test_samples)
            else:
                probs = runner.predict_mle(params, test_x[i], i)
            row.append(_accuracy(probs[:len(tasks[i].y_test)], tasks[i].y_test))
            times["eval_s"] += time.perf_counter() - t0
        rows.append(row)
        bar.set_postfix(avg=f"{np.mean(row):.4f}")
    return {"accuracy": rows, "average": [float(np.mean(r)) for r in rows],
            "final_losses": losses, **times, "total_s": sum(times.values())}


def check_run_dir(run_dir: str, cfg: SplitMNISTConfig) -> None:
    """Refuses, before anything is written, a run directory holding another config's results."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); choose another --run-dir") from e
    diff = config_diff(saved, to_dict(cfg), ignore=("data_dir",))  # a folder, not the data
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
    for i, task in enumerate(tasks):
        if any(cfg.coreset_method(r) for r in cfg.runs) and cfg.coreset_size > len(task.y):
            raise ConfigError(f"coreset_size {cfg.coreset_size} is larger than task {i} "
                              f"({len(task.y)} training images); use ≤ {len(task.y)}")
    with RunLock(run_dir):
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        runner = Runner(cfg)
        results = {name: run_one(runner, name, tasks, progress=progress) for name in cfg.runs}
        metrics = {"config": to_dict(cfg), "devices": [str(d) for d in jax.devices()],
                   "data": record(cfg.dataset, cfg.data_dir, cfg.data_variant,
                                  [len(t.y) for t in tasks], [t.x for t in tasks]),
                   "train_sizes": [len(t.y) for t in tasks],
                   "test_sizes": [len(t.y_test) for t in tasks],
                   "runs": results}
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        report.write(run_dir, cfg, metrics)
    return metrics
