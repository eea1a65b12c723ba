"""VCL for diffusion models (PAPERS.md §1): MLE vs VCL, with and without coresets.

``run(cfg, run_dir)`` trains every (method, coreset size) of the config on the
task stream, evaluates after every task, checkpoints after every task, resumes
from the last finished task, and writes the comparison (metrics, plots, grids,
summary) to ``run_dir``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vcl_jax import checkpoint
from vcl_jax.config import ConfigError, to_dict
from vcl_jax.continual import chain, ewc, mle, vcl
from vcl_jax.data import TaskStream, complement, identity, load, record, select, to_float, to_unit
from vcl_jax.diffusion.generate import generate
from vcl_jax.diffusion.loss import batch_loss, example_loss_at, fisher_examples
from vcl_jax.diffusion.schedule import linear_schedule
from vcl_jax.eval.classifier import EvalClassifier, get_classifier
from vcl_jax.eval.metrics import (
    classifier_uncertainty,
    mean_stderr,
    per_class_mean,
    per_class_stderr,
)
from vcl_jax.models.layers import resolve_impl
from vcl_jax.models.unet import ContextUNet, init_unet, variational_mask
from vcl_jax.protocols.vcl_diffusion_config import (
    ADDED_FIELDS,
    SPEED_ONLY,
    VCLDiffusionConfig,
    check_method,
    has_ewc,
    has_vcl,
    members,
    sub_run_config,
)
from vcl_jax.run_lock import RunLock
from vcl_jax.training.epoch import EpochRunner
from vcl_jax.training.sequence import Schedule, Task, new_record, run_sequence, upgrade_record
from vcl_jax.training.state import TrainState, adam, data_sharding, make_train_step, train_epochs
from vcl_jax.vi import mean_field as mf

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run builds from its config: model, schedule, loss and methods."""

    cfg: VCLDiffusionConfig
    model: ContextUNet  # for one set of weights: MLE, pre-training, sampling
    sched: Any
    shape: tuple[int, int, int]
    draws_model: ContextUNet  # the same network for VCL's vmapped weight draws in training
    draws_layout: str  # ``weight_draws`` resolved for this backend: "vmap" or "loop"

    def init_params(self, key: jax.Array) -> dict:
        return init_unet(self.model, key, self.shape)

    def eps_fn(self, params, model: ContextUNet | None = None):
        """The noise prediction ``(x, t, task, keep) -> ε̂`` of ``params``."""
        model = model or self.model
        return lambda x, t, d, keep: model.apply({"params": params}, x, t, d, keep)

    def batch_loss(self, params, batch, key, *, model: ContextUNet | None = None):
        return batch_loss(self.eps_fn(params, model), self.sched, key, batch["x"],
                          batch["task"], p_uncond=self.cfg.p_uncond)

    def example_loss(self, params, example):
        """ε-MSE of one example at its own fixed timestep and noise (an EWC Fisher's)."""
        return example_loss_at(self.eps_fn(params), self.sched, example)

    def method(self, name: str, params: dict):
        """The method of a config name: "joint" or "mle" is MLE, "vcl" VCL, and each
        ``ewc_*`` member an EWC penalty chained after the one that trains the model."""
        cfg = self.cfg
        check_method(name)
        if has_vcl(name):
            draws_loss = functools.partial(self.batch_loss, model=self.draws_model)
            log_var = cfg.log_var_init if cfg.prior_rel_std is None else functools.partial(
                mf.relative_log_var, fraction=cfg.prior_rel_std)
            base = vcl(draws_loss, mask=self.mask(params), n_samples=cfg.train_samples,
                       estimator=cfg.estimator, draws=self.draws_layout,
                       kl_scale=cfg.kl_scale, prior_sigma=cfg.prior_sigma,
                       log_var_init=log_var, weight_noise=cfg.weight_noise,
                       pretrained_prior=cfg.vcl_pretrain_epochs > 0)
        else:
            base = mle(self.batch_loss)
        penalties = [ewc(None, self.example_loss, n_tasks=len(cfg.classes), lam=cfg.ewc_lambda,
                         fisher=m.removeprefix("ewc_"), chunk=cfg.fisher_chunk)
                     for m in members(name) if m.startswith("ewc_")]
        return chain(base, *penalties) if penalties else base

    def fisher_data(self, name: str, x: np.ndarray, task: int, key: jax.Array) -> dict | None:
        """What method ``name``'s ``end_task`` is given after ``task``: the examples of
        its EWC Fisher (``fisher_samples`` of the task's training images ``x``), or None."""
        if not has_ewc(name):
            return None
        cfg = self.cfg
        return fisher_examples(key, x, np.full(len(x), task, np.int32), cfg.fisher_samples,
                               T=cfg.T, t_min=cfg.fisher_t_min, t_max=cfg.fisher_t_max)

    def optimizer(self, name: str, params: dict) -> optax.GradientTransformation:
        """Adam for method ``name`` (the same for every method; its rate is set per epoch)."""
        del name, params
        return adam(self.cfg.learning_rate)

    def mask(self, params: dict) -> dict:
        """Which leaves VCL treats as random (in the posterior and the KL)."""
        return variational_mask(params, norms=self.cfg.variational_norms)

    def eval_draws(self, name: str) -> int:
        return self.cfg.eval_samples if has_vcl(name) else 1

    def steps_per_call(self, name: str) -> int:
        """Train steps per jitted call of method ``name`` (``EpochRunner``'s ``unroll``).

        ``cfg.unroll`` counts U-Net copies in one compiled call: VCL with looped weight
        draws has K copies per step, so it runs the largest divisor of ``unroll`` that is
        ≤ ``unroll // K`` steps per call, at least 1 (the compile's memory grows with the
        copies; BENCHMARKS.md has the figures). Epochs keep ``unroll``'s step
        count (``EpochRunner(multiple=unroll)``), so they are those of ``vmap``-ed draws.
        """
        u, k = self.cfg.unroll, self.cfg.train_samples
        if not has_vcl(name) or k == 1 or not u or self.draws_layout != "loop":
            return u
        return max(d for d in range(1, max(u // k, 1) + 1) if u % d == 0)

    def average_draws(self, name: str, override: bool | None = None) -> bool:
        """Whether sampling averages ε over the weight draws (``override``: None keeps
        the config's ``eval_average_draws``); only meaningful with several draws."""
        wanted = self.cfg.eval_average_draws if override is None else override
        return wanted and self.eval_draws(name) > 1


def build(cfg: VCLDiffusionConfig, shape: tuple[int, int, int] = (28, 28, 1)) -> Setup:
    cfg.validate()
    model = ContextUNet(n_feat=cfg.n_feat, n_tasks=len(cfg.classes), channels=shape[-1],
                        embed_dim=cfg.embed_dim, impl=resolve_impl(cfg.conv_impl, False),
                        context=cfg.context, weight_init=cfg.weight_init)
    layout = draws_layout(cfg.weight_draws, cfg.train_samples)
    vmapped = cfg.train_samples > 1 and layout == "vmap"
    draws_model = model.clone(impl=resolve_impl(cfg.conv_impl, vmapped))
    return Setup(cfg, model, linear_schedule(cfg.T, cfg.beta_1, cfg.beta_T), shape, draws_model,
                 layout)


def draws_layout(weight_draws: str, k: int) -> str:
    """``weight_draws`` with ``auto`` resolved for the backend the run is built on: the
    loop of K plain U-Nets on a CPU when K > 1 (XLA:CPU runs batched-kernel convolutions
    slowly), else one vmapped computation."""
    if weight_draws != "auto":
        return weight_draws
    return "loop" if k > 1 and jax.default_backend() == "cpu" else "vmap"


def load_tasks(cfg: VCLDiffusionConfig) -> list[np.ndarray]:
    """Training images of each task, float ``[N_d, H, W, C]`` in [0, 1]."""
    train = load(cfg.dataset, "train", data_dir=cfg.data_dir, variant=cfg.data_variant)
    stream = TaskStream.one_class_per_task(cfg.classes)
    out = []
    for task in stream.split(train):
        x = to_float(task.images, cfg.pixel_range)
        out.append(x[: cfg.max_per_task] if cfg.max_per_task else x)
    for size in cfg.coreset_sizes:
        for d, x in enumerate(out):
            if size > len(x):
                raise ConfigError(f"coreset size {size} is larger than task {d} "
                                  f"(class {cfg.classes[d]}: {len(x)} training images)")
    return out


def run_name(method: str, coreset: int) -> str:
    return "joint" if method == "joint" else f"{method}_coreset{coreset}"


def open_checkpoints(folder: str, cfg: VCLDiffusionConfig, method: str,
                     coreset_size: int, data: dict | None = None) -> checkpoint.Checkpoints:
    """The checkpoints of one sub-run, refusing a folder written with another config or
    (``data``, see :class:`~vcl_jax.checkpoint.Checkpoints`) other data."""
    return checkpoint.Checkpoints(folder, sub_run_config(cfg, method, coreset_size),
                                  ignore=SPEED_ONLY, added=ADDED_FIELDS, data=data)


def _task_data(xs: list[np.ndarray], task_ids: list[int]) -> dict:
    x = np.concatenate(xs)
    t = np.concatenate([np.full(len(a), d, np.int32) for a, d in zip(xs, task_ids, strict=True)])
    return {"x": jnp.asarray(x), "task": jnp.asarray(t)}


def coreset_indices(cfg: VCLDiffusionConfig, key: jax.Array, task: int, x: np.ndarray,
                    size: int) -> np.ndarray:
    """Task ``task``'s coreset (deterministic given the key): withheld from its training data."""
    if not size:
        return np.zeros((0,), np.int32)
    return select(cfg.coreset_method, jax.random.fold_in(key, task), x, size)


def pretrain_mle(setup: Setup, params: dict, x: np.ndarray, key: jax.Array, *,
                 progress: bool) -> dict:
    """MLE on the first task's data; the result becomes VCL's first prior means."""
    cfg = setup.cfg
    method = mle(setup.batch_loss)
    opt = adam(cfg.learning_rate)
    trainable, mstate = method.init(params)
    state = TrainState(trainable, opt.init(trainable), mstate)
    runner = EpochRunner(make_train_step(method, opt, data_sharding()), cfg.batch_size, cfg.unroll)
    state, _ = train_epochs(runner, state, _task_data([x], [0]), key,
                            epochs=cfg.vcl_pretrain_epochs, learning_rate=cfg.learning_rate,
                            decay=cfg.lr_decay, desc="vcl MLE pre-training", progress=progress,
                            where="vcl_diffusion vcl, MLE pre-training on task 1")
    return state.trainable


def evaluate(setup: Setup, method, trainable, task: int, key: jax.Array,
             classifier: EvalClassifier) -> tuple[dict, np.ndarray, np.ndarray]:
    """Samples every class seen so far and scores them by classifier uncertainty.

    Returns:
      (metrics, images ``[N, H, W]`` in [0, 1], class labels ``[N]``).
    """
    cfg = setup.cfg
    seen = np.repeat(np.arange(task + 1), cfg.eval_per_class)
    k_draw, k_sample = jax.random.split(key)
    draws = method.draws(trainable, k_draw, setup.eval_draws(method.name))
    x = generate(setup.model, draws, setup.sched, k_sample, seen, setup.shape,
                 sampler=cfg.sampler, guidance=cfg.guidance, ddim_steps=cfg.ddim_steps,
                 eta=cfg.eval_eta, average=setup.average_draws(method.name))
    images = to_unit(x, cfg.pixel_range)
    labels = np.asarray(cfg.classes)[seen]
    return score(images, labels, task, classifier), _squeeze(images), labels


def _squeeze(images: np.ndarray) -> np.ndarray:
    return images[..., 0] if images.shape[-1] == 1 else images


def score(images: np.ndarray, labels: np.ndarray, task: int,
          classifier: EvalClassifier) -> dict:
    """Classifier uncertainty of samples ``images`` of classes ``labels`` (after ``task``)."""
    log_probs = classifier.log_probs(images if images.ndim == 4 else images[..., None])
    u = classifier_uncertainty(log_probs, labels)
    per_class, se = per_class_mean(u, labels), per_class_stderr(u, labels)
    return {"task": task, "avg_uncertainty": float(np.mean(list(per_class.values()))),
            "avg_stderr": mean_stderr(list(se.values())),
            "per_class": {str(k): v for k, v in per_class.items()},
            "per_class_stderr": {str(k): v for k, v in se.items()},
            "samples_per_class": int(len(labels) // max(len(per_class), 1)),
            "sample_accuracy": float(np.mean(log_probs.argmax(-1) == labels))}


def run_one(setup: Setup, method_name: str, coreset_size: int, tasks: list[np.ndarray],
            classifier: EvalClassifier, out_dir: str, *, progress: bool = True,
            data_id: dict | None = None) -> dict:
    """Trains one method with one coreset size over the whole stream (resuming if possible).

    Returns:
      The record of :func:`~vcl_jax.training.sequence.run_sequence` (per-task metrics and
      seconds per phase; VCL's MLE pre-training as ``pretrain``).
    """
    cfg = setup.cfg
    os.makedirs(out_dir, exist_ok=True)
    k_init, k_core, k_train, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)
    params = setup.init_params(k_init)
    method = setup.method(method_name, params)
    opt = setup.optimizer(method_name, params)
    trainable, mstate = method.init(params)
    state = TrainState(trainable, opt.init(trainable), mstate)
    step = make_train_step(method, opt, data_sharding())
    runner = EpochRunner(step, cfg.batch_size, setup.steps_per_call(method_name),
                         multiple=max(cfg.unroll, 1))
    name = run_name(method_name, coreset_size)
    # Each task's coreset, withheld from its training data (deterministic given the key).
    cores = [coreset_indices(cfg, k_core, d, x, coreset_size) for d, x in enumerate(tasks)]
    ckpt = open_checkpoints(os.path.join(out_dir, "checkpoints"), cfg, method_name, coreset_size,
                            data_id)
    record = new_record()
    if ckpt.latest_step() is None and has_vcl(method_name) and cfg.vcl_pretrain_epochs:
        t0 = time.perf_counter()
        x0 = tasks[0][complement(cores[0], len(tasks[0]))]
        pretrained = pretrain_mle(setup, params, x0, jax.random.fold_in(k_train, 100_000),
                                  progress=progress)
        # Kept for diagnostics (`vcl_diagnostics.swap_effect`): the first prior's means.
        pre = open_checkpoints(os.path.join(out_dir, "pretrained"), cfg, method_name,
                               coreset_size, data_id)
        pre.save(0, pretrained, {"what": "MLE pre-training: VCL's first prior means"})
        pre.close()
        trainable, mstate = method.init(pretrained)
        state = TrainState(trainable, opt.init(trainable), mstate)
        record = new_record(pretrain=time.perf_counter() - t0)

    def prepare(d, state):
        train_x = tasks[d][complement(cores[d], len(tasks[d]))]
        xs, ids = [train_x], [d]
        if cfg.coreset_mode == "replay":  # earlier coresets join this task's data
            xs += [tasks[j][cores[j]] for j in range(d) if len(cores[j])]
            ids += [j for j in range(d) if len(cores[j])]
        data = _task_data(xs, ids)
        fisher = setup.fisher_data(method_name, train_x, d,
                                   jax.random.fold_in(k_train, 200_000 + d))
        return Task(data, int(data["x"].shape[0]), end=fisher)

    def tune(d, state):
        """The evaluated posterior or params: tuned on the coresets of tasks 0..d from a copy
        (``coreset_mode=finetune``), else the trained ones."""
        if not coreset_size or cfg.coreset_mode != "finetune":
            return state.trainable
        core_data = _task_data([tasks[j][cores[j]] for j in range(d + 1)], list(range(d + 1)))
        tr, ms = method.begin_task(state.trainable, state.method_state, d,
                                   int(core_data["x"].shape[0]))
        tuned = jax.tree.map(jnp.copy, TrainState(tr, state.opt_state, ms))
        tuned, _ = train_epochs(runner, tuned, core_data,
                                jax.random.fold_in(jax.random.fold_in(k_train, d), 10_000),
                                epochs=cfg.coreset_epochs, learning_rate=cfg.learning_rate,
                                decay=cfg.lr_decay, desc=f"{name} task {d + 1} coreset",
                                progress=progress,
                                where=f"vcl_diffusion {name} task {d + 1}, coreset fine-tuning")
        return tuned.trainable

    def evaluate_task(d, trainable):
        metrics, images, labels = evaluate(setup, method, trainable, d,
                                           jax.random.fold_in(k_eval, d), classifier)
        return metrics, {"images": images, "labels": labels}

    return run_sequence(
        method, state, runner, ckpt, len(tasks), prepare=prepare, evaluate=evaluate_task,
        tune=tune, schedule=Schedule(cfg.epochs, cfg.learning_rate, cfg.lr_decay), key=k_train,
        name=name, where="vcl_diffusion", out_dir=out_dir, record=record, progress=progress,
        describe=lambda m: f"avg uncertainty {m['avg_uncertainty']:.4f} nats, ")


def run_joint(setup: Setup, tasks: list[np.ndarray], classifier: EvalClassifier,
              out_dir: str, *, progress: bool = True, data_id: dict | None = None) -> dict:
    """The paper's Figure 7 reference: one MLE model trained on every task's data at once
    (``epochs`` epochs over the union: as many steps as MLE takes over the whole stream),
    evaluated once on every class. Its entry "after task d" is that evaluation restricted to
    the classes of tasks 0..d: what a model of this size and budget reaches without any
    continual learning. Returns the record of :func:`run_one`; resumes from its checkpoint.
    """
    cfg, n = setup.cfg, len(tasks)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = open_checkpoints(os.path.join(out_dir, "checkpoints"), cfg, "joint", 0, data_id)
    if ckpt.latest_step() is not None:
        record = upgrade_record(ckpt.restore_meta(ckpt.latest_step())["record"])
        ckpt.close()
        return record
    k_init, _, k_train, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)
    params = setup.init_params(k_init)
    method, opt = setup.method("joint", params), setup.optimizer("joint", params)
    trainable, mstate = method.init(params)
    state = TrainState(trainable, opt.init(trainable), mstate)
    runner = EpochRunner(make_train_step(method, opt, data_sharding()), cfg.batch_size,
                         setup.steps_per_call("joint"), multiple=max(cfg.unroll, 1))
    t0 = time.perf_counter()
    state, hist = train_epochs(runner, state, _task_data(tasks, list(range(n))), k_train,
                               epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                               decay=cfg.lr_decay, desc=f"joint, {n} tasks at once",
                               progress=progress, where=f"vcl_diffusion joint, {n} tasks at once")
    jax.block_until_ready(state.trainable)
    t1 = time.perf_counter()
    _, images, labels = evaluate(setup, method, state.trainable, n - 1, k_eval, classifier)
    history = []
    for d in range(n):
        sel = np.isin(labels, cfg.classes[:d + 1])
        np.savez_compressed(os.path.join(out_dir, f"samples_task{d}.npz"), images=images[sel],
                            labels=labels[sel])
        history.append(dict(score(images[sel], labels[sel], d, classifier),
                            train_final=hist[-1]))
    record = new_record()
    record.update(history=history)
    record["seconds"].update(train=t1 - t0, eval=time.perf_counter() - t1)
    ckpt.save(n - 1, {"train": state, "eval": state.trainable},
              {"task": n - 1, "record": record})
    ckpt.close()
    if progress:
        print(f"[joint] all {n} tasks: avg uncertainty {history[-1]['avg_uncertainty']:.4f} "
              f"nats, loss {hist[-1]['loss']:.4f}", flush=True)
    return record


def sub_runs(cfg: VCLDiffusionConfig) -> list[tuple[str, int]]:
    """(method, coreset size) of every sub-run; the joint reference runs once, without a
    coreset."""
    out = [(name, size) for size in cfg.coreset_sizes for name in cfg.methods if name != "joint"]
    return out + ([("joint", 0)] if "joint" in cfg.methods else [])


def check_run_dir(run_dir: str, cfg: VCLDiffusionConfig, data_id: dict | None = None) -> None:
    """Refuses, before anything is written, a run directory whose checkpoints were
    written with settings (or data) that matter to them. Sub-runs are keyed on their own
    fields (:func:`sub_run_config`), so adding coreset sizes or changing a VCL-only setting
    reuses the finished MLE runs."""
    for name, size in sub_runs(cfg):
        folder = os.path.join(run_dir, run_name(name, size), "checkpoints")
        if os.path.isdir(folder):
            open_checkpoints(folder, cfg, name, size, data_id).close()


def run(cfg: VCLDiffusionConfig, run_dir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) the whole experiment and writes its outputs to ``run_dir``."""
    from vcl_jax.protocols import vcl_diffusion_report as report

    setup = build(cfg)
    tasks = load_tasks(cfg)
    data = record(cfg.dataset, cfg.data_dir, cfg.data_variant, [len(x) for x in tasks], tasks)
    check_run_dir(run_dir, cfg, identity(data))
    with RunLock(run_dir):
        classifier = get_classifier(cfg.dataset, data_dir=cfg.data_dir,
                                    variant=cfg.data_variant, epochs=cfg.classifier_epochs,
                                    progress=progress)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        results = {}
        kw = dict(progress=progress, data_id=identity(data))
        for name, size in sub_runs(cfg):
            rn = run_name(name, size)
            out_dir = os.path.join(run_dir, rn)
            if name == "joint":
                results[rn] = run_joint(setup, tasks, classifier, out_dir, **kw)
            else:
                results[rn] = run_one(setup, name, size, tasks, classifier, out_dir, **kw)
        scores = {rn: report.continual_scores(rec["history"], cfg.classes)
                  for rn, rec in results.items() if rn != "joint"}
        over_mle = report.ratios(results)
        metrics = {"config": to_dict(cfg), "data": data, "classifier": classifier.info,
                   "runs": results, "continual": scores, "over_mle": over_mle}
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        report.write(run_dir, cfg, results, data, classifier.info, scores, over_mle)
    return metrics
