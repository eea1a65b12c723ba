"""Forward noising and the ε-prediction loss, written for one example."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.diffusion.schedule import Schedule

# eps_fn(x [B,H,W,C], t [B] in (0,1], task [B] int, keep [B] bool) -> [B,H,W,C]
EpsFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε for one example (t an int in 1..T)."""
    ab = sched.alpha_bar[t - 1]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def draw_noise(key: jax.Array, x0: jax.Array, T: int, p_uncond: float):  # noqa: N803
    """Per-example randomness: timestep t ~ U{1..T}, noise ε, and the guidance drop."""
    kt, kn, kd = jax.random.split(key, 3)
    t = jax.random.randint(kt, (), 1, T + 1)
    noise = jax.random.normal(kn, x0.shape, x0.dtype)
    keep = jax.random.uniform(kd) >= p_uncond
    return t, noise, keep


def example_loss(
    eps_fn: EpsFn,
    sched: Schedule,
    key: jax.Array,
    x0: jax.Array,
    task: jax.Array,
    *,
    p_uncond: float = 0.1,
) -> jax.Array:
    """Per-pixel mean ‖ε − ε̂(x_t, t, d)‖² for one example ``x0: [H, W, C]``.

    The task embedding is replaced by the null embedding with probability
    ``p_uncond`` (classifier-free guidance training). ``vmap`` it over a batch.
    """
    t, noise, keep = draw_noise(key, x0, sched.T, p_uncond)
    xt = q_sample(sched, x0, t, noise)
    pred = eps_fn(xt[None], (t / sched.T)[None], task[None], keep[None])[0]
    return jnp.mean((pred - noise) ** 2)


def noised_batch(sched: Schedule, key: jax.Array, x0: jax.Array, p_uncond: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(x_t, t, ε, keep)`` of a batch ``x0: [B, H, W, C]``: each example's randomness
    (:func:`draw_noise`) from its own key of ``key``'s split, and its noised image."""
    keys = jax.random.split(key, x0.shape[0])
    t, noise, keep = jax.vmap(lambda k, x: draw_noise(k, x, sched.T, p_uncond))(keys, x0)
    xt = jax.vmap(lambda x, t, n: q_sample(sched, x, t, n))(x0, t, noise)
    return xt, t, noise, keep


def batch_loss(eps_fn: EpsFn, sched: Schedule, key: jax.Array, x0: jax.Array, task: jax.Array,
               *, p_uncond: float = 0.1) -> jax.Array:
    """Mean of :func:`example_loss` over ``x0: [B, H, W, C]``, keys split per example.

    The same numbers as ``vmap`` of :func:`example_loss` (the per-example randomness is
    drawn the same way), with the network called once on the whole batch rather than
    ``vmap``-ped over batches of one: a kernel without a batching rule of its own (our CPU
    convolutions) then sees the batch (tested in ``tests/test_diffusion.py``).
    """
    xt, t, noise, keep = noised_batch(sched, key, x0, p_uncond)
    pred = eps_fn(xt, t / sched.T, task, keep)
    return jnp.mean(jnp.mean((pred - noise) ** 2, axis=tuple(range(1, x0.ndim))))


def example_loss_at(eps_fn: EpsFn, sched: Schedule, example: dict) -> jax.Array:
    """Per-pixel mean ‖ε − ε̂(x_t, t, d)‖² of one example at a *given* timestep and noise,
    conditional (no guidance drop): ``example = {"x": [H,W,C], "task": int, "t": int in
    1..T, "noise": [H,W,C]}``. Deterministic, so its per-example gradients can be taken
    twice (the rank-1 Fisher's two passes) and give the same vectors."""
    xt = q_sample(sched, example["x"], example["t"], example["noise"])
    pred = eps_fn(xt[None], (example["t"] / sched.T)[None], example["task"][None],
                  jnp.ones((1,), bool))[0]
    return jnp.mean((pred - example["noise"]) ** 2)


def timestep_examples(key: jax.Array, x0: jax.Array, task: jax.Array, *, T: int,  # noqa: N803
                      t_min: int = 1, t_max: int | None = None) -> dict:
    """Fixes the randomness of :func:`example_loss_at` for a set of examples: one timestep
    per example, uniform in ``t_min..t_max`` (1..T: all timesteps, as the rank-1 paper's
    code; ``t_min = t_max``: one fixed timestep; a high range: the low-SNR regime), and
    one noise draw per example."""
    t_max = T if t_max is None else t_max
    if not 1 <= t_min <= t_max <= T:
        raise ValueError(f"need 1 ≤ t_min ≤ t_max ≤ T={T}, got t_min={t_min}, t_max={t_max}")
    kt, kn = jax.random.split(key)
    n = x0.shape[0]
    return {"x": x0, "task": jnp.asarray(task, jnp.int32),
            "t": jax.random.randint(kt, (n,), t_min, t_max + 1),
            "noise": jax.random.normal(kn, x0.shape, x0.dtype)}


def fisher_examples(key: jax.Array, x, labels, n: int, *, T: int, t_min: int = 1,  # noqa: N803
                    t_max: int | None = None) -> dict:
    """The examples an EWC Fisher is estimated on: ``n`` of the images ``x`` (at most all,
    picked without replacement) with their ``labels``, each with its own timestep and noise
    (:func:`timestep_examples`)."""
    k_pick, k_t = jax.random.split(key)
    pick = np.asarray(jax.random.choice(k_pick, len(x), (min(n, len(x)),), replace=False))
    return timestep_examples(k_t, jnp.asarray(x[pick]), jnp.asarray(labels[pick]), T=T,
                             t_min=t_min, t_max=t_max)
