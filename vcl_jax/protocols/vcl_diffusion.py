"""VCL for diffusion models (PAPERS.md §1): MLE vs VCL, with and without coresets.

``run(cfg, run_dir)`` trains every (method, coreset size) of the config on the
task stream, evaluates after every task, checkpoints after every task, resumes
from the last finished task, and writes the comparison (metrics, plots, grids,
summary) to ``run_dir``. What a run builds from its config (model, losses,
methods, evaluation) is in :mod:`vcl_jax.protocols.vcl_diffusion_setup`; the MLE
trainings outside the task loop (VCL's pre-training, the joint reference) in
:mod:`vcl_jax.protocols.vcl_diffusion_mle`.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from vcl_jax import distributed, rng, runlog
from vcl_jax.configs.vcl_diffusion import VCLDiffusionConfig, parse_method
from vcl_jax.continual import TrainData
from vcl_jax.data import complement, identity
from vcl_jax.eval.classifier import EvalClassifier
from vcl_jax.protocols import experiment
from vcl_jax.protocols import vcl_diffusion_mle as mle_runs
from vcl_jax.protocols.vcl_diffusion_setup import (
    Setup,
    build,
    evaluate,
    load_tasks,
    open_checkpoints,
    run_keys,
    task_data,
)
from vcl_jax.training.sequence import (
    TrainSchedule,
    epoch_trainer,
    fold_keys,
    new_record,
    run_sequence,
)
from vcl_jax.training.state import TrainState, data_sharding, make_train_step


def run_name(method: str, coreset: int) -> str:
    return "joint" if method == "joint" else f"{method}_coreset{coreset}"


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
    keys = run_keys(cfg)
    params = setup.init_params(keys.init)
    method = setup.method(method_name, params, coreset_size)
    opt = setup.optimizer(method)
    state = TrainState.create(method, opt, params)
    step = make_train_step(method, opt, data_sharding())
    runner = setup.runner(step, method_name)
    name = run_name(method_name, coreset_size)
    ckpt = open_checkpoints(os.path.join(out_dir, "checkpoints"), cfg, method_name, coreset_size,
                            data_id)
    record = new_record()
    variational = parse_method(method_name).variational
    if ckpt.latest_step() is None and variational and cfg.vcl.vcl_pretrain_epochs:
        t0 = time.perf_counter()
        # the first task without its coreset (the one the coreset member withholds)
        x0 = tasks[0][complement(setup.coreset_of(0, tasks[0], coreset_size), len(tasks[0]))]
        pretrained = mle_runs.pretrain_mle(setup, params, x0,
                                           rng.stream(keys.train, "pretrain"),
                                           progress=progress, name=name)
        # Kept for diagnostics (`vcl_diagnostics.swap_effect`): the first prior's means.
        pre = open_checkpoints(os.path.join(out_dir, "pretrained"), cfg, method_name,
                               coreset_size, data_id)
        pre.save(0, pretrained, {"what": "MLE pre-training: VCL's first prior means"})
        pre.close()
        state = TrainState.create(method, opt, pretrained)
        record = new_record(pretrain=time.perf_counter() - t0)

    def prepare(d, state):
        """Task d's images (a coreset member then withholds its own and adds earlier ones)
        and the examples of an EWC member's Fisher."""
        del state
        fisher = setup.fisher_data(method_name, tasks[d], d,
                                   rng.stream(keys.train, "fisher", d))
        return TrainData(task_data([tasks[d]], [d]), len(tasks[d]), end=fisher)

    def evaluate_task(d, trainable):
        metrics, images, labels = evaluate(setup, method, trainable, d,
                                           jax.random.fold_in(keys.eval, d), classifier)
        return metrics, {"images": images, "labels": labels}

    trainer = functools.partial(epoch_trainer, runner, where="vcl_diffusion", progress=progress)
    rate = setup.learning_rate(method)
    return run_sequence(
        method, state, len(tasks), prepare=prepare, evaluate=evaluate_task,
        train=trainer(TrainSchedule(cfg.optim.epochs, rate, cfg.optim.lr_decay)),
        tune=trainer(TrainSchedule(cfg.coreset.coreset_epochs, rate, cfg.optim.lr_decay)),
        task_keys=fold_keys(keys.train), ckpt=ckpt, out_dir=out_dir, keep_evaluated=True,
        name=name, record=record, progress=progress,
        describe=lambda m: f"avg uncertainty {m['avg_uncertainty']:.4f} nats, ")


def sub_runs(cfg: VCLDiffusionConfig) -> list[tuple[str, int]]:
    """(method, coreset size) of every sub-run; the joint reference runs once, without a
    coreset."""
    out = [(name, size) for size in cfg.coreset_sizes for name in cfg.methods if name != "joint"]
    return out + ([("joint", 0)] if "joint" in cfg.methods else [])


def check_run_dir(run_dir: str, cfg: VCLDiffusionConfig, data_id: dict | None = None) -> None:
    """Refuses a run directory whose sub-runs' checkpoints were written with settings (or
    data) that matter to them; each sub-run is keyed on its own sections
    (:func:`~vcl_jax.protocols.vcl_diffusion_setup.sub_run_identity`)."""
    experiment.check_checkpoints(run_dir, {
        run_name(name, size): functools.partial(open_checkpoints, cfg=cfg, method=name,
                                                coreset_size=size, data=data_id)
        for name, size in sub_runs(cfg)})


def run(cfg: VCLDiffusionConfig, run_dir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) the whole experiment and writes its outputs to ``run_dir``."""
    from vcl_jax.protocols import vcl_diffusion_report as report

    setup = build(cfg)
    tasks = load_tasks(cfg)
    data = cfg.data.record([len(x) for x in tasks], tasks)
    data_id = identity(data)  # what the checkpoints are keyed on besides the config
    check_run_dir(run_dir, cfg, data_id)
    with experiment.locked(run_dir, cfg):
        # the other processes load the classifier process 0 trained and cached
        classifier = distributed.primary_first(lambda: cfg.data.classifier(
            cfg.eval.classifier_epochs, progress=progress and distributed.is_primary()),
            "classifier")
        results = {}
        kw = dict(progress=progress, data_id=data_id)
        units = sum(len(tasks) for name, _ in sub_runs(cfg) if name != "joint")
        with runlog.open_log(run_dir, units, progress=progress):
            for name, size in sub_runs(cfg):
                rn = run_name(name, size)
                out_dir = os.path.join(run_dir, rn)
                if name == "joint":
                    results[rn] = mle_runs.run_joint(setup, tasks, classifier, out_dir, **kw)
                else:
                    results[rn] = run_one(setup, name, size, tasks, classifier, out_dir, **kw)
        scores = {rn: report.continual_scores(rec["history"], cfg.data.classes)
                  for rn, rec in results.items() if rn != "joint"}
        return experiment.finish(
            run_dir, cfg, data, results, lambda m: report.write(run_dir, cfg, m),
            classifier=classifier.info, continual=scores, over_mle=report.ratios(results),
            log="log.jsonl")
