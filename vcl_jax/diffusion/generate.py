"""Class-conditional generation with one or many weight draws."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.diffusion.samplers import ddim_sample, ddpm_sample
from vcl_jax.diffusion.schedule import Schedule

PyTree = Any
SAMPLERS = ("ddpm", "ddim")


@functools.lru_cache(maxsize=16)
def _sampler(model, sampler: str, shape: tuple, guidance: float, ddim_steps: int, eta: float,
             clip: tuple | None, average: bool):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")

    def run(draws, j, sched, key, task):
        # draw j's params (every draw, stacked, when averaging)
        params = draws if average else jax.tree.map(lambda a: a[j], draws)

        def eps_fn(x, t, d, keep):
            one = lambda p: model.apply({"params": p}, x, t, d, keep)
            # lax.map, not vmap: a vmapped kernel becomes a grouped conv, very slow on CPU.
            return jnp.mean(jax.lax.map(one, params), 0) if average else one(params)

        if sampler == "ddpm":
            return ddpm_sample(eps_fn, sched, key, task, shape, guidance=guidance)
        return ddim_sample(eps_fn, sched, key, task, shape, steps=ddim_steps, eta=eta,
                           guidance=guidance, clip=clip)

    return jax.jit(run)


def generate(model, draws: PyTree, sched: Schedule, key: jax.Array, tasks: np.ndarray,
             shape: tuple[int, int, int], *, sampler: str = "ddpm", guidance: float = 2.0,
             ddim_steps: int = 50, eta: float = 0.0,
             clip: tuple[float, float] | None = None, average: bool = False) -> np.ndarray:
    """Samples ``tasks [N]`` (one image each), spread round-robin over the weight draws,
    or, with ``average``, each with the noise prediction averaged over all draws at every
    step (the VCL-diffusion authors' code; costs M network calls per step).

    Args:
      model: the U-Net module.
      draws: params stacked ``[M, ...]`` (M = 1 for a point estimate).
      sched: noise schedule.
      key: PRNG key; draw m uses ``fold_in(key, m)``.
      tasks: ``[N]`` task index of each sample.
      shape: ``(H, W, C)``.
      clip: DDIM only: clip the predicted x_0 to this range at every step.
      average: average ε over the draws instead of spreading the samples over them.

    Returns:
      ``[N, H, W, C]`` samples in model space, in the order of ``tasks``.
    """
    if clip is not None and sampler != "ddim":
        raise ValueError("clip applies to the DDIM sampler only")
    run = _sampler(model, sampler, tuple(shape), float(guidance), int(ddim_steps), float(eta),
                   None if clip is None else tuple(map(float, clip)), bool(average))
    m = jax.tree.leaves(draws)[0].shape[0]
    tasks = np.asarray(tasks, np.int32)
    out = np.zeros((len(tasks), *shape), np.float32)
    groups = 1 if average else m
    for j in range(groups):
        sel = np.arange(j, len(tasks), groups)
        if sel.size == 0:
            continue
        # Pad to a power of two so that growing evaluations reuse a few compiled shapes.
        padded = np.zeros(1 << int(np.ceil(np.log2(sel.size))), np.int32)
        padded[: sel.size] = tasks[sel]
        x = run(draws, j, sched, jax.random.fold_in(key, j), jnp.asarray(padded))
        out[sel] = np.asarray(x)[: sel.size]
    return out
