"""The plain MLE trainings of the VCL-diffusion experiment outside its task loop: VCL's
pre-training on the first task (its first prior's means), and the joint-training reference
(one model trained on every task's data at once)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from vcl_jax.continual import mle
from vcl_jax.eval.classifier import EvalClassifier
from vcl_jax.protocols.vcl_diffusion_setup import (
    Setup,
    evaluate,
    open_checkpoints,
    run_keys,
    score,
    task_data,
)
from vcl_jax.training.sequence import new_record
from vcl_jax.training.state import TrainState, adam, data_sharding, make_train_step, train_epochs


def train_mle(setup: Setup, params: dict, data: dict, key: jax.Array, epochs: int, desc: str,
              where: str, progress: bool) -> tuple[TrainState, list[dict]]:
    """``epochs`` epochs of MLE on ``data`` from ``params`` (Adam at the config's learning
    rate); returns the trained state and the per-epoch metrics."""
    cfg = setup.cfg
    method = mle(setup.batch_loss)
    opt = adam(cfg.optim.learning_rate)
    state = TrainState.create(method, opt, params)
    runner = setup.runner(make_train_step(method, opt, data_sharding()), "mle")
    return train_epochs(runner, state, data, key, epochs=epochs,
                        learning_rate=cfg.optim.learning_rate, decay=cfg.optim.lr_decay,
                        desc=desc, progress=progress, where=where)


def pretrain_mle(setup: Setup, params: dict, x: np.ndarray, key: jax.Array, *,
                 progress: bool, name: str = "vcl") -> dict:
    """MLE on the first task's data; the result becomes VCL's first prior means (``name``:
    the sub-run's, in progress bars and the run's log)."""
    state, _ = train_mle(setup, params, task_data([x], [0]), key,
                         setup.cfg.vcl.vcl_pretrain_epochs, f"{name} MLE pre-training",
                         f"vcl_diffusion {name}, MLE pre-training on task 1", progress)
    return state.trainable


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
        record = ckpt.restore_meta(ckpt.latest_step())["record"]
        ckpt.close()
        return record
    keys = run_keys(cfg)
    params = setup.init_params(keys.init)
    method = setup.method("joint", params)  # MLE: what the evaluation samples from
    t0 = time.perf_counter()
    state, hist = train_mle(setup, params, task_data(tasks, list(range(n))),
                            keys.train, cfg.optim.epochs, f"joint, {n} tasks at once",
                            f"vcl_diffusion joint, {n} tasks at once", progress)
    jax.block_until_ready(state.trainable)
    t1 = time.perf_counter()
    _, images, labels = evaluate(setup, method, state.trainable, n - 1, keys.eval, classifier)
    history = []
    for d in range(n):
        sel = np.isin(labels, cfg.data.classes[:d + 1])
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
