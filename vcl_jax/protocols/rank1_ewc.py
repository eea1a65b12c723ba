"""Rank-1 Fisher EWC, diagonal EWC and generative distillation (PAPERS.md §2).

Class-incremental generation: tasks are consecutive class pairs, images are padded to
``image_size`` and scaled to [−1, 1], and one class-conditional U-Net (one embedding per
class) learns them in order. Every method is a composition of the library's methods:

* ``mle``: sequential fine-tuning (:func:`~vcl_jax.continual.mle`);
* ``replay``: each batch adds ``replay_batch`` images of old classes, drawn from a pool
  the model at the end of the previous task generated with DDIM (η = 0);
* ``distill``: replay plus ``distill_weight`` · MSE between the student's and the frozen
  teacher's ε-predictions on the noised replay images (:func:`~vcl_jax.continual.distillation`);
* ``ewc_diag`` / ``ewc_rank1`` / ``ewc_rank1_unit``: an EWC penalty
  (:func:`~vcl_jax.continual.ewc` without a batch loss) added to any of the above, e.g.
  ``ewc_rank1+distill`` (names: :mod:`vcl_jax.continual.methods`).

After every task the run samples every seen task's classes and records each task's
FD-classifier (Fréchet distance in the evaluation classifier's features) against that
task's test (or validation) images, and the classifier's accuracy on the samples;
forgetting is computed at the end. One Orbax checkpoint per finished task; re-running
resumes.

What a run builds from its config is in :mod:`vcl_jax.protocols.rank1_ewc_setup`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax import checkpoint, distributed, runlog
from vcl_jax.configs.rank1_ewc import Rank1EWCConfig, parse_method
from vcl_jax.continual import TrainData
from vcl_jax.data import identity
from vcl_jax.eval.classifier import EvalClassifier
from vcl_jax.eval.metrics import gaussian_stats
from vcl_jax.protocols import experiment
from vcl_jax.protocols.rank1_ewc_setup import (
    Setup,
    TaskData,
    build,
    evaluate,
    fisher_data,
    load_tasks,
    run_keys,
)
from vcl_jax.training.epoch import EpochRunner
from vcl_jax.training.sequence import TrainSchedule, epoch_trainer, fold_keys, run_sequence
from vcl_jax.training.state import TrainState, adam, data_sharding, make_train_step


def forgetting(history: list[dict]) -> list[float]:
    """Per task k: its FD after the last task minus its FD right after task k."""
    last = history[-1]["fd"]
    return [last[k] - history[k]["fd"][k] for k in range(len(last))]


def joint_task(tasks: list[TaskData]) -> TaskData:
    """Every task's training images as one task (the ``joint`` reference's)."""
    return TaskData(tuple(c for t in tasks for c in t.classes),
                    np.concatenate([t.x for t in tasks]), np.concatenate([t.c for t in tasks]),
                    np.concatenate([t.reference for t in tasks]),
                    np.concatenate([t.reference_labels for t in tasks]))


def restrict(metrics: dict, upto: int) -> dict:
    """An evaluation of every task, restricted to tasks ``0..upto``."""
    fd, acc = metrics["fd"][: upto + 1], metrics["accuracy"][: upto + 1]
    return dict(metrics, task=upto, fd=fd, avg_fd=float(np.mean(fd)), accuracy=acc,
                avg_accuracy=float(np.mean(acc)))


def run_one(setup: Setup, name: str, tasks: list[TaskData], classifier: EvalClassifier,
            ref_stats: list, out_dir: str, *, progress: bool = True,
            data_id: dict | None = None) -> dict:
    """Trains one method over the whole stream, resuming from its last checkpoint.

    ``joint`` trains one model on the union of the tasks (``epochs`` epochs over it: as many
    steps as a sequential method over the whole stream) and evaluates it once on every
    class; its entry "after task d" is that evaluation restricted to tasks 0..d, what a
    model of this size and budget reaches without continual learning."""
    cfg = setup.cfg
    joint = name == "joint"
    stream = [joint_task(tasks)] if joint else tasks
    keys = run_keys(cfg)
    params = setup.init_params(keys.init)
    method = setup.method(name)
    spec = parse_method(name)
    opt = adam(cfg.optim.learning_rate)
    state = TrainState.create(method, opt, params)
    runner = EpochRunner(make_train_step(method, opt, data_sharding()), cfg.optim.batch_size,
                         cfg.optim.unroll)
    ckpt = method_checkpoints(os.path.join(out_dir, "checkpoints"), cfg, name, data=data_id)

    def prepare(d, state):
        """The task's images and the Fisher's examples (a replay member then adds the pool
        the model at the task's start generates)."""
        del state
        task = stream[d]
        fisher = (fisher_data(setup, task, jax.random.fold_in(keys.fisher, d))
                  if spec.penalty else None)
        data = {"x": jnp.asarray(task.x), "c": jnp.asarray(task.c)}
        return TrainData(data, len(task.x), end=fisher)

    def evaluate_task(d, params):
        upto = len(tasks) - 1 if joint else d
        metrics, images, labels = evaluate(setup, params, tasks, upto,
                                           jax.random.fold_in(keys.eval, d), classifier, ref_stats)
        return metrics, {"images": images, "labels": labels}

    record = run_sequence(
        method, state, len(stream), prepare=prepare, evaluate=evaluate_task,
        train=epoch_trainer(runner, TrainSchedule(cfg.optim.epochs, cfg.optim.learning_rate,
                                                  cfg.optim.lr_decay),
                            where="rank1_ewc", progress=progress),
        task_keys=fold_keys(keys.train), ckpt=ckpt, out_dir=out_dir, name=name, progress=progress,
        describe=lambda m: (f"avg FD-classifier {m['avg_fd']:.3f}, sample accuracy "
                            f"{m['avg_accuracy']:.3f}, "))
    if joint:
        record["history"] = [restrict(record["history"][0], d) for d in range(len(tasks))]
    record["forgetting"] = forgetting(record["history"])
    record["avg_forgetting"] = float(np.mean(record["forgetting"][:-1])) if len(tasks) > 1 else 0.0
    return record


def method_checkpoints(folder: str, cfg: Rank1EWCConfig, name: str,
                       data: dict | None = None) -> checkpoint.Checkpoints:
    """Method ``name``'s checkpoints, keyed on the config sections it uses
    (:func:`~vcl_jax.protocols.experiment.identity`) and, when given, on what the data is
    (``data``, see :class:`~vcl_jax.checkpoint.Checkpoints`)."""
    return checkpoint.Checkpoints(folder, experiment.identity(cfg, name, parse_method(name)),
                                  data=data)


def reference_accuracy(classifier: EvalClassifier, task: TaskData) -> float:
    """The evaluation classifier's accuracy on a task's reference (test or validation) images."""
    pred = classifier.log_probs(task.reference).argmax(-1)
    return float(np.mean(pred == task.reference_labels))


def check_run_dir(run_dir: str, cfg: Rank1EWCConfig, data_id: dict | None = None) -> None:
    """Refuses, before anything is written, checkpoints from another config or data."""
    experiment.check_checkpoints(run_dir, {
        parse_method(name).dir: functools.partial(method_checkpoints, cfg=cfg, name=name,
                                                  data=data_id)
        for name in cfg.methods})


def run(cfg: Rank1EWCConfig, run_dir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) every method of the config and writes the comparison."""
    from vcl_jax.protocols import rank1_ewc_report as report

    cfg.validate()
    tasks, data_shape = load_tasks(cfg)
    data = cfg.data.record([len(t.x) for t in tasks], [a for t in tasks for a in (t.x, t.c)])
    data_id = identity(data)  # what the checkpoints are keyed on besides the config
    check_run_dir(run_dir, cfg, data_id)
    setup = build(cfg, data_shape)
    with experiment.locked(run_dir, cfg):
        classifier = distributed.primary_first(lambda: cfg.data.classifier(
            cfg.eval.classifier_epochs, progress=progress), "classifier")
        ref_stats = [gaussian_stats(classifier.features(t.reference)) for t in tasks]
        with runlog.open_log(run_dir, len(cfg.methods) * len(tasks), progress=progress):
            results = {name: run_one(setup, name, tasks, classifier, ref_stats,
                                     os.path.join(run_dir, parse_method(name).dir),
                                     progress=progress, data_id=data_id)
                       for name in cfg.methods}
        return experiment.finish(
            run_dir, cfg, data, results, lambda m: report.write(run_dir, cfg, m),
            classifier=classifier.info,
            reference_images_per_task=[len(t.reference) for t in tasks],
            # the classifier's accuracy on each task's real reference images: the ceiling of
            # its sample accuracy
            reference_accuracy=[reference_accuracy(classifier, t) for t in tasks])
