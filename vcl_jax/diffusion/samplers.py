"""Guided samplers as ``lax.scan``: ancestral DDPM and DDIM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.diffusion.loss import EpsFn
from vcl_jax.diffusion.schedule import Schedule


def guided_eps(eps_fn: EpsFn, x: jax.Array, t: jax.Array, task: jax.Array,
               guidance: float) -> jax.Array:
    """Classifier-free guidance ε̂ = (1+α)·g(x,t,d) − α·g(x,t,∅), both in one batched call.

    Args:
      eps_fn: the noise predictor.
      x: ``[N, H, W, C]``.
      t: ``[N]`` time fraction t/T.
      task: ``[N]`` task index.
      guidance: α (0 = conditional only: the unconditional half is then not computed).
    """
    n = x.shape[0]
    if isinstance(guidance, (int, float)) and guidance == 0:
        return eps_fn(x, t, task, jnp.ones((n,), bool))
    keep = jnp.concatenate([jnp.ones((n,), bool), jnp.zeros((n,), bool)])
    both = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([task, task]), keep)
    cond, uncond = both[:n], both[n:]
    return (1.0 + guidance) * cond - guidance * uncond


def ddpm_sample(eps_fn: EpsFn, sched: Schedule, key: jax.Array, task: jax.Array,
                shape: tuple[int, int, int], *, guidance: float = 2.0,
                x_init: jax.Array | None = None) -> jax.Array:
    """Ancestral sampling, t = T..1, with σ_t² = β_t (no noise at the last step).

    Args:
      eps_fn: the noise predictor.
      sched: the schedule the model was trained with.
      key: PRNG key.
      task: ``[N]`` which task (digit) each sample belongs to.
      shape: ``(H, W, C)``.
      guidance: α.
      x_init: optional ``[N, H, W, C]`` starting noise x_T (default: drawn from ``key``).

    Returns:
      ``[N, H, W, C]`` samples in model space.
    """
    n = task.shape[0]
    k0, kloop = jax.random.split(key)
    x = jax.random.normal(k0, (n, *shape)) if x_init is None else x_init

    def step(x, t):
        i = t - 1
        eps = guided_eps(eps_fn, x, jnp.full((n,), t / sched.T), task, guidance)
        beta, ab = sched.beta[i], sched.alpha_bar[i]
        mean = (x - beta / jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(1.0 - beta)
        z = jax.random.normal(jax.random.fold_in(kloop, t), x.shape)
        return mean + jnp.where(t > 1, jnp.sqrt(beta), 0.0) * z, None

    x, _ = jax.lax.scan(step, x, jnp.arange(sched.T, 0, -1))
    return x


def ddim_timesteps(T: int, steps: int) -> jax.Array:  # noqa: N803
    """``steps`` evenly spaced timesteps from T down to ≥ 1."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in 1..T={T}, got {steps}")
    return jnp.asarray(np.unique(np.round(np.linspace(1, T, steps)).astype(np.int32))[::-1])


def ddim_sample(eps_fn: EpsFn, sched: Schedule, key: jax.Array, task: jax.Array,
                shape: tuple[int, int, int], *, steps: int = 50, eta: float = 0.0,
                guidance: float = 2.0, x_init: jax.Array | None = None,
                clip: tuple[float, float] | None = None) -> jax.Array:
    """DDIM sampling over a subsequence of timesteps; with η = 0 the result depends on
    the starting noise x_T only (``x_init``, or drawn from ``key``).

    ``clip = (lo, hi)`` clips each step's predicted x_0 to the data range (``clip_sample``
    in common DDIM implementations); without it an imperfect model's few-step
    trajectories can leave the data range far behind.

    Returns:
      ``[N, H, W, C]`` samples in model space.
    """
    n = task.shape[0]
    ts = ddim_timesteps(sched.T, steps)
    prev = jnp.concatenate([ts[1:], jnp.zeros((1,), ts.dtype)])
    k0, kloop = jax.random.split(key)
    x = jax.random.normal(k0, (n, *shape)) if x_init is None else x_init

    def step(x, tt):
        t, tp = tt
        eps = guided_eps(eps_fn, x, jnp.full((n,), t / sched.T), task, guidance)
        ab = sched.alpha_bar[t - 1]
        ab_prev = jnp.where(tp > 0, sched.alpha_bar[jnp.maximum(tp - 1, 0)], 1.0)
        x0 = (x - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
        if clip is not None:
            x0 = jnp.clip(x0, *clip)
        sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        z = jax.random.normal(jax.random.fold_in(kloop, t), x.shape)
        x = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev - sigma**2) * eps + sigma * z
        return x, None

    x, _ = jax.lax.scan(step, x, (ts, prev))
    return x
