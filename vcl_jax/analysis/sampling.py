"""Sampling from a finished task's checkpoint of a VCL-diffusion run."""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import numpy as np

from vcl_jax.config import ConfigError
from vcl_jax.configs.vcl_diffusion import VCLDiffusionConfig
from vcl_jax.continual.base import Method
from vcl_jax.data import to_unit
from vcl_jax.eval import plots
from vcl_jax.protocols import experiment, vcl_diffusion, vcl_diffusion_setup
from vcl_jax.protocols.vcl_diffusion_setup import WEIGHTS, open_checkpoints
from vcl_jax.training.state import TrainState


def load_config(run_dir: str) -> VCLDiffusionConfig:
    return experiment.read_config(run_dir, VCLDiffusionConfig, "VCL-diffusion")


class Loaded(NamedTuple):
    """One sub-run's checkpoint: ``restored["eval"]`` holds the params (MLE) or the
    posterior (VCL) used for sampling, ``restored["train"]`` the training state."""

    cfg: VCLDiffusionConfig
    setup: vcl_diffusion_setup.Setup
    method: Method
    run: str  # sub-run name, e.g. "vcl_coreset0"
    base: str  # its method, e.g. "vcl"
    coreset_size: int
    task: int
    restored: dict


def load_checkpoint(run_dir: str, *, task: int | None = None,
                    method: str | None = None) -> Loaded:
    """The checkpoint of sub-run ``method`` (default: the first) after ``task`` (default:
    the last finished one)."""
    cfg = load_config(run_dir)
    setup = vcl_diffusion_setup.build(cfg)
    runs = {vcl_diffusion.run_name(m, s): (m, s) for m, s in vcl_diffusion.sub_runs(cfg)}
    method = method or next(iter(runs))
    if method not in runs:
        raise ConfigError(f"unknown run {method!r} in {run_dir}; accepted: {', '.join(runs)}")
    base, size = runs[method]
    params = jax.eval_shape(setup.init_params, jax.random.key(0))  # shapes: a template only
    m = setup.method(base, params, size)
    opt = setup.optimizer(m)

    def template(params):
        state = TrainState.create(m, opt, params)
        return {"train": state, "eval": state.trainable}

    task, restored = experiment.restore_task(
        os.path.join(run_dir, method, "checkpoints"),
        lambda folder: open_checkpoints(folder, cfg, base, size), task,
        jax.eval_shape(template, params))
    return Loaded(cfg, setup, m, method, base, size, task, restored)


def samples(loaded: Loaded, task_ids: np.ndarray, key: jax.Array, **kw) -> np.ndarray:
    """Images ``[N, H, W, C]`` in [0, 1] of tasks ``task_ids`` from a loaded checkpoint (its
    weight draws from ``fold_in(key, 0)``, the sampler's noise from ``fold_in(key, 1)``);
    ``kw``: :meth:`~vcl_jax.protocols.vcl_diffusion_setup.Setup.sample`'s options."""
    x = loaded.setup.sample(loaded.method, loaded.restored["eval"], jax.random.fold_in(key, 0),
                            jax.random.fold_in(key, 1), task_ids, **kw)
    return to_unit(x, loaded.cfg.data.pixel_range)


def sample_from_run(run_dir: str, *, task: int | None = None, digits: list[int] | None = None,
                    n: int = 16, method: str | None = None, out: str | None = None,
                    seed: int = 0, average_draws: bool | None = None) -> str:
    """Samples ``n`` images of each digit from the checkpoint after ``task``.

    ``average_draws`` (None: the run's ``eval_average_draws``) averages a VCL
    posterior's noise prediction over its ``eval_samples`` draws for every image.

    Returns:
      The path written (``.png`` grid: one row per digit, or ``.npz`` with
      ``images [N, H, W]`` in [0, 1] and ``labels [N]``).
    """
    loaded = load_checkpoint(run_dir, task=task, method=method)
    cfg, method, task = loaded.cfg, loaded.run, loaded.task
    seen = list(cfg.data.classes[: task + 1])
    digits = seen if digits is None else digits
    unseen = [d for d in digits if d not in seen]
    if unseen:
        raise ValueError(f"digit(s) {unseen} not learned by task {task}; seen: {seen}")
    task_ids = np.repeat([seen.index(d) for d in digits], n)
    weights = None if average_draws is None else ("average" if average_draws else "draws")
    images = samples(loaded, task_ids, jax.random.key(seed), weights=weights)[..., 0]
    labels = np.asarray(cfg.data.classes)[task_ids]
    out = out or os.path.join(run_dir, f"sample_{method}_task{task}.png")
    if out.endswith(".npz"):
        np.savez_compressed(out, images=images, labels=labels)
    else:
        rows = [{j: images[i * n + j] for j in range(n)} for i in range(len(digits))]
        plots.sample_grid(out, rows, list(range(n)), f"{method} after task {task}: digits "
                          f"{digits} (one row each)",
                          row_labels=[f"digit {d}" for d in digits])
    return out


def rescore(run_dir: str, *, method: str | None = None, n: int = 50, seed: int = 1,
            tasks: list[int] | None = None, weights: str = "draws", sampler: str | None = None,
            ddim_steps: int | None = None, eta: float | None = None,
            guidance: float | None = None, classifier=None) -> dict:
    """Re-samples and re-scores the checkpoints of one sub-run (nothing is overwritten).

    Args:
      run_dir: a VCL-diffusion run directory.
      method: the sub-run (default: the first).
      n: samples per seen digit.
      seed: sampling seed.
      tasks: 0-based checkpoints to score (default: every one).
      weights: ``draws`` (the run's evaluation: one posterior draw per image), ``mean``
        (the posterior mean; for MLE the params either way) or ``average`` (ε averaged
        over ``eval_samples`` draws fresh at every step, the authors' sampler).
      sampler, ddim_steps, eta, guidance: default: the run's (``eta`` is DDIM's η,
        ``guidance`` the classifier-free guidance weight α).
      classifier: the evaluation classifier (default: the run's dataset and variant).

    Returns:
      ``{"args": …, "history": [score per task, as in metrics.json]}``.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; accepted: {', '.join(WEIGHTS)}")
    first = load_checkpoint(run_dir, method=method)
    cfg = first.cfg
    classifier = classifier or cfg.data.classifier(cfg.eval.classifier_epochs)
    sampler = sampler or cfg.eval.sampler
    ddim_steps = ddim_steps or cfg.eval.ddim_steps
    eta = cfg.eval.eval_eta if eta is None else eta
    guidance = cfg.eval.guidance if guidance is None else guidance
    tasks = list(range(first.task + 1)) if tasks is None else tasks
    history = []
    for d in tasks:
        loaded = first if d == first.task else load_checkpoint(run_dir, task=d,
                                                                method=first.run)
        seen = np.repeat(np.arange(d + 1), n)
        images = samples(loaded, seen, jax.random.fold_in(jax.random.key(seed), d),
                         weights=weights, sampler=sampler, ddim_steps=ddim_steps, eta=eta,
                         guidance=guidance)
        history.append(vcl_diffusion_setup.score(images, np.asarray(cfg.data.classes)[seen], d,
                                           classifier))
    args = {"method": first.run, "n": n, "seed": seed, "weights": weights, "sampler": sampler,
            "ddim_steps": ddim_steps, "eta": eta, "guidance": guidance}
    return {"args": args, "history": history}
