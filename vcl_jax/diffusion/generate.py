"""Class-conditional generation with one or many weight draws."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.diffusion.samplers import ddim_sample, ddpm_sample
from vcl_jax.diffusion.schedule import Schedule

PyTree = Any
SAMPLERS = ("ddpm", "ddim")


@functools.lru_cache(maxsize=16)
def fresh_draws(sample: Callable, n: int) -> Callable:
    """``generate``'s ``redraw`` for a method's ``draws(trainable, key, n)``: n weight sets
    from the trainables (a posterior) under a key. Cached, so one method's evaluations reuse
    one compiled sampler."""

    def redraw(source, key):
        return sample(source, key, n)

    return redraw


@functools.lru_cache(maxsize=16)
def _sampler(model, sampler: str, shape: tuple, guidance: float, ddim_steps: int, eta: float,
             clip: tuple | None, average: bool, redraw: Callable | None):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")

    def run(draws, j, sched, key, task):
        def params_at(t):
            if redraw is None:  # draw j's params, or every draw stacked when averaging
                return draws if average else jax.tree.map(lambda a: a[j], draws)
            # fresh weight sets at every step (t: the step's time fraction, the same for the
            # whole batch, so the conditional and unconditional halves share them)
            source, weights_key = draws
            step = jnp.round(t[0] * sched.T).astype(jnp.int32)
            return redraw(source, jax.random.fold_in(weights_key, step))

        def eps_fn(x, t, d, keep):
            one = lambda p: model.apply({"params": p}, x, t, d, keep)
            params = params_at(t)
            # lax.map, not vmap: a vmapped kernel becomes a grouped conv, very slow on CPU.
            return jnp.mean(jax.lax.map(one, params), 0) if average else one(params)

        if sampler == "ddpm":
            return ddpm_sample(eps_fn, sched, key, task, shape, guidance=guidance)
        return ddim_sample(eps_fn, sched, key, task, shape, steps=ddim_steps, eta=eta,
                           guidance=guidance, clip=clip)

    return jax.jit(run)


def call_batches(n: int, max_batch: int | None = None) -> list[int]:
    """The batch of each sampler call that ``generate`` makes for ``n`` images of one weight
    set: full calls of ``max_batch`` images (None: no limit), then the rest. No padding: a
    sampler compiles in ~2 s (once per machine with the persistent cache), while padding to
    powers of two had cost 22-30% of the `cpu` preset's sampling time."""
    full, rest = divmod(n, max_batch) if max_batch else (0, n)
    return [max_batch] * full + ([rest] if rest else [])


def generate(model, draws: PyTree, sched: Schedule, key: jax.Array, tasks: np.ndarray,
             shape: tuple[int, int, int], *, sampler: str = "ddpm", guidance: float = 2.0,
             ddim_steps: int = 50, eta: float = 0.0,
             clip: tuple[float, float] | None = None, average: bool = False,
             redraw: Callable | None = None, max_batch: int | None = None) -> np.ndarray:
    """Samples ``tasks [N]`` (one image each), spread round-robin over the weight draws,
    or, with ``average``, each with the noise prediction averaged over all draws at every
    step (costs M network calls per step). With ``redraw`` the M draws are fresh at every
    step, as the VCL-diffusion authors' sampler draws them; without, the same M serve every
    step.

    Args:
      model: the U-Net module.
      draws: params stacked ``[M, ...]`` (M = 1 for a point estimate); with ``redraw``,
        ``(source, key)``: the trainables to draw from and the key of the weight draws
        (step t's: ``redraw(source, fold_in(key, t))``).
      sched: noise schedule.
      key: PRNG key; draw m uses ``fold_in(key, m)``.
      tasks: ``[N]`` task index of each sample.
      shape: ``(H, W, C)``.
      clip: DDIM only: clip the predicted x_0 to this range at every step.
      average: average ε over the draws instead of spreading the samples over them.
      redraw: ``(source, key) -> params stacked [M, ...]`` (:func:`fresh_draws`); needs
        ``average``.
      max_batch: at most this many images per sampler call (None: all of a draw's at once).
        On a CPU a batch whose activations stay in the caches samples faster per image than
        one of hundreds (1.8× at 128 against 512 images on the project's 2-core machine;
        BENCHMARKS.md). The images of the first call, and every image when all fit in one
        call, get the noise they get without the limit (a draw's noise is prefix-consistent:
        ``threefry_partitionable``); a later call c draws its own from ``fold_in(draw key, c)``.

    Returns:
      ``[N, H, W, C]`` samples in model space, in the order of ``tasks``.
    """
    if clip is not None and sampler != "ddim":
        raise ValueError("clip applies to the DDIM sampler only")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be ≥ 1 or None, got {max_batch}")
    if redraw is not None and not average:
        raise ValueError("redraw draws weights to average ε over: it needs average=True")
    run = _sampler(model, sampler, tuple(shape), float(guidance), int(ddim_steps), float(eta),
                   None if clip is None else tuple(map(float, clip)), bool(average), redraw)
    m = 1 if redraw is not None else jax.tree.leaves(draws)[0].shape[0]
    tasks = np.asarray(tasks, np.int32)
    out = np.zeros((len(tasks), *shape), np.float32)
    groups = 1 if average else m
    for j in range(groups):
        sel = np.arange(j, len(tasks), groups)
        key_j = jax.random.fold_in(key, j)
        start = 0
        for c, size in enumerate(call_batches(sel.size, max_batch)):
            part = sel[start:start + size]
            x = run(draws, j, sched, jax.random.fold_in(key_j, c) if c else key_j,
                    jnp.asarray(tasks[part]))
            out[part] = np.asarray(x)
            start += size
    return out
