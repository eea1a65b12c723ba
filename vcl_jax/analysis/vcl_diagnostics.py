"""Diagnostics of a VCL-diffusion run: where a task moves the weights, and what
weight noise does to the samples.

* :func:`drift` — per parameter group, how far the means moved during task ``d``
  (checkpoint ``d`` against ``d − 1``), relative to their size; random (in the KL)
  and deterministic leaves reported apart.
* :func:`spread` — per parameter group of a VCL posterior, its log-variances (mean and
  range) and its σ relative to the RMS of its means: how much weight noise the model
  trains and samples under, and whether a task moved the variances at all.
* :func:`noise_effect` — classifier uncertainty of one digit's samples at the
  checkpoint's point estimate (MLE params or VCL posterior mean), at draws of
  ``N(mean, exp(log_var))`` (one draw per image, or ε averaged over the draws),
  for chosen log-variances and, for a VCL checkpoint, at draws of its own posterior.
* :func:`swap_effect` — which parameters carry a change: one digit scored at the
  checkpoint's point estimate with chosen parameter groups (null context, norms,
  per-task conditioning, the KL-held weights) put back to their values at an earlier
  point (an earlier checkpoint, or the first prior's means: the MLE pre-training).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vcl_jax.analysis.sampling import load_checkpoint
from vcl_jax.config import ConfigError
from vcl_jax.data import to_unit
from vcl_jax.diffusion.generate import generate
from vcl_jax.eval.metrics import classifier_uncertainty
from vcl_jax.models.unet import EMBEDDING_PARAMS
from vcl_jax.protocols.experiment import restore_task
from vcl_jax.protocols.vcl_diffusion_setup import open_checkpoints
from vcl_jax.vi import mean_field as mf

PER_TASK = tuple(p for p in EMBEDDING_PARAMS if p != "null_embedding")


def _point(loaded):
    ev = loaded.restored["eval"]
    return ev.mean if isinstance(ev, mf.MeanField) else ev


def _group(path: tuple[str, ...]) -> str:
    return path[0] if len(path) > 1 else "/".join(path)


def drift(run_dir: str, task: int, method: str | None = None) -> list[dict]:
    """Relative RMS change of the means during ``task`` (≥ 1), per top-level module.

    Returns:
      Rows ``{"group", "random", "size", "change", "relative"}``: ``size`` is the RMS of
      the values before the task, ``change`` the RMS of the change.
    """
    if task < 1:
        raise ConfigError("drift needs task ≥ 1 (it compares with the checkpoint before)")
    after = load_checkpoint(run_dir, task=task, method=method)
    before = load_checkpoint(run_dir, task=task - 1, method=method)
    mask = traverse_util.flatten_dict(after.setup.mask(_point(after)))
    a, b = (traverse_util.flatten_dict(_point(x)) for x in (after, before))
    sums: dict[tuple[str, bool], list[float]] = {}
    for k in a:
        if k[0] in PER_TASK:  # tables with a row per task: not shared parameters
            continue
        s = sums.setdefault((_group(k), bool(mask[k])), [0.0, 0.0, 0])
        s[0] += float(jnp.sum(jnp.square(b[k])))
        s[1] += float(jnp.sum(jnp.square(a[k] - b[k])))
        s[2] += a[k].size
    rows = []
    for (g, rnd), (sq, dsq, n) in sorted(sums.items()):
        size, change = np.sqrt(sq / n), np.sqrt(dsq / n)
        rows.append({"group": g, "random": rnd, "size": float(size), "change": float(change),
                     "relative": float(change / max(size, 1e-12))})
    return rows


def spread(run_dir: str, task: int, method: str | None = None) -> list[dict]:
    """The posterior's log-variances after ``task``, per top-level module (random leaves).

    Returns:
      Rows ``{"group", "size", "log_var_mean", "log_var_min", "log_var_max",
      "sigma_over_rms"}``: ``size`` is the RMS of the means, ``sigma_over_rms`` the RMS of
      σ = exp(log_var / 2) over it.
    """
    loaded = load_checkpoint(run_dir, task=task, method=method)
    q = loaded.restored["eval"]
    if not isinstance(q, mf.MeanField):
        raise ConfigError(f"{loaded.run} has no posterior (spread is for VCL runs): choose one "
                          f"with --method, e.g. vcl_coreset0")
    mask = traverse_util.flatten_dict(loaded.setup.mask(q.mean))
    mean, log_var = (traverse_util.flatten_dict(t) for t in (q.mean, q.log_var))
    groups: dict[str, list] = {}
    for k, m in mean.items():
        if not mask[k] or k[0] in PER_TASK:
            continue
        g = groups.setdefault(_group(k), [[], []])
        g[0].append(np.ravel(np.asarray(m)))
        g[1].append(np.ravel(np.asarray(log_var[k])))
    rows = []
    for name, (ms, lvs) in sorted(groups.items()):
        m, lv = np.concatenate(ms), np.concatenate(lvs)
        size = float(np.sqrt(np.mean(m ** 2)))
        rows.append({"group": name, "size": size, "log_var_mean": float(lv.mean()),
                     "log_var_min": float(lv.min()), "log_var_max": float(lv.max()),
                     "sigma_over_rms": float(np.sqrt(np.mean(np.exp(lv))) / max(size, 1e-12))})
    return rows


def _digit_scorer(loaded, digit: int, seed: int):
    """``score(name, stack, n, average=False)``: a row of the classifier uncertainty (± its
    standard error) and accuracy of ``n`` samples of ``digit`` from the weight stack
    ``stack`` (ε averaged over it with ``average``) by the run's sampler, from ``seed``; a
    clear error for a digit the checkpoint has not learned."""
    cfg, setup = loaded.cfg, loaded.setup
    seen = list(cfg.data.classes[: loaded.task + 1])
    if digit not in seen:
        raise ConfigError(f"digit {digit} not learned by task {loaded.task}; seen: {seen}")
    clf, ev = cfg.data.classifier(cfg.eval.classifier_epochs), cfg.eval
    key = jax.random.key(seed)

    def score(name: str, stack, n: int, average: bool = False) -> dict:
        x = generate(setup.model, stack, setup.sched, key, np.full(n, seen.index(digit)),
                     setup.shape, sampler=ev.sampler, guidance=ev.guidance,
                     ddim_steps=ev.ddim_steps, eta=ev.eval_eta, average=average,
                     max_batch=ev.eval_batch)
        lp = clf.log_probs(to_unit(x, cfg.data.pixel_range))
        u = classifier_uncertainty(lp, np.full(n, digit))
        return {"weights": name, "uncertainty": float(u.mean()),
                "stderr": float(u.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                "accuracy": float(np.mean(lp.argmax(-1) == digit)), "n": n}

    return score


def noise_effect(run_dir: str, task: int, digit: int, log_vars: list[float], *, n: int = 60,
                 draws: int = 10, average: bool = False, method: str | None = None,
                 seed: int = 1) -> list[dict]:
    """Uncertainty of ``n`` samples of ``digit`` at the point estimate and under weight noise.

    Returns:
      Rows ``{"weights", "uncertainty", "stderr", "accuracy", "n"}``, all sampled from
      ``seed``; ``average`` rows have ``n // 2`` images (each costs M network calls per
      step). Rows differ in their starting noise too (one key per draw group), so
      compare them through their standard errors.
    """
    loaded = load_checkpoint(run_dir, task=task, method=method)
    score, key = _digit_scorer(loaded, digit, seed), jax.random.key(seed)
    point = _point(loaded)
    mask = loaded.setup.mask(point)
    rows = [score("point estimate", jax.tree.map(lambda a: a[None], point), n)]
    posterior = loaded.restored["eval"]
    named = [(f"log-var {lv:g}", mf.init_from_params(point, lv)) for lv in log_vars]
    if isinstance(posterior, mf.MeanField):  # the checkpoint's own (learnt) variances
        named.append(("the posterior", posterior))
    for name, q in named:
        stack = jax.vmap(lambda k, q=q: mf.sample(k, q, mask))(
            jax.random.split(jax.random.fold_in(key, 7), draws))
        rows.append(score(f"{draws} draws, {name}, one per image", stack, n))
        if average:
            rows.append(score(f"{draws} draws, {name}, ε averaged", stack,
                              max(n // 2, 1), average=True))
    return rows


# Parameter groups of the U-Net that `swap_effect` can put back.
GROUPS = ("null", "norms", "tasks", "random", "deterministic")


def _group_of(path: tuple[str, ...], random: bool) -> set[str]:
    """The `GROUPS` a parameter belongs to."""
    out = {"random" if random else "deterministic"}
    if path[0] in ("null_embedding", "null_film1", "null_film2"):
        out.add("null")
    elif path[0] in PER_TASK:
        out.add("tasks")
    elif any(p.startswith("GroupNorm") or p == "out_norm" for p in path):
        out.add("norms")
    return out


def pretrained_params(run_dir: str, loaded) -> dict:
    """The weights a VCL sub-run's MLE pre-training ended with (``<run>/pretrained``)."""
    cfg = loaded.cfg
    folder = os.path.join(run_dir, loaded.run, "pretrained")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist: {loaded.run} has no saved MLE "
                                f"pre-training (runs before it was kept, or no pre-training); "
                                f"give an earlier checkpoint as the source instead")
    like = jax.eval_shape(loaded.setup.init_params, jax.random.key(0))
    _, params = restore_task(folder, lambda f: open_checkpoints(f, cfg, loaded.base,
                                                                 loaded.coreset_size), 0, like)
    return params


def swap_effect(run_dir: str, task: int, digit: int, swaps: list[tuple[str, ...]], *,
                source: int | None = None, n: int = 60, method: str | None = None,
                seed: int = 1) -> list[dict]:
    """Uncertainty of ``digit`` at the point estimate after ``task`` with parameter groups
    put back to their values at ``source``.

    Args:
      swaps: each a tuple of `GROUPS` to put back together; ``()`` scores the checkpoint
        as it is and ``("all",)`` scores the source alone.
      source: a 0-based earlier checkpoint (its point estimate), or None for the weights of
        VCL's MLE pre-training (its first prior's means).

    Returns:
      Rows ``{"weights", "uncertainty", "stderr", "accuracy", "n"}``.
    """
    loaded = load_checkpoint(run_dir, task=task, method=method)
    score = _digit_scorer(loaded, digit, seed)
    bad = [g for sw in swaps for g in sw if g not in (*GROUPS, "all")]
    if bad:
        raise ConfigError(f"unknown parameter group(s) {bad}; accepted: {', '.join(GROUPS)}, all")
    if source is None:
        ref, ref_name = pretrained_params(run_dir, loaded), "the MLE pre-training"
    else:
        ref, ref_name = _point(load_checkpoint(run_dir, task=source, method=loaded.run)), \
            f"task {source + 1}'s values"
    point = _point(loaded)
    flat_p, flat_r = traverse_util.flatten_dict(point), traverse_util.flatten_dict(ref)
    mask = traverse_util.flatten_dict(loaded.setup.mask(point))
    rows = []
    for sw in swaps:
        mixed = {k: flat_r[k] if "all" in sw or _group_of(k, bool(mask[k])) & set(sw) else v
                 for k, v in flat_p.items()}
        params = traverse_util.unflatten_dict(mixed)
        name = ("checkpoint as it is" if not sw else
                f"{ref_name} alone" if "all" in sw else f"{' + '.join(sw)} from {ref_name}")
        rows.append(score(name, jax.tree.map(lambda a: a[None], params), n))
    return rows
