"""The noise schedule as data."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Schedule(NamedTuple):
    """Per-timestep constants, index ``t − 1`` for t = 1..T.

    Attributes:
      beta: ``[T]`` noise variances β_t.
      alpha_bar: ``[T]`` ᾱ_t = Π_{s≤t} (1 − β_s).
    """

    beta: jax.Array
    alpha_bar: jax.Array

    @property
    def T(self) -> int:  # noqa: N802 — the paper's name
        return self.beta.shape[0]


def linear_schedule(T: int = 400, beta_1: float = 1e-4, beta_T: float = 0.02) -> Schedule:  # noqa: N803
    """Linear β from ``beta_1`` to ``beta_T`` over T steps (the paper: 400, 1e-4, 0.02)."""
    if T < 1 or not 0 < beta_1 <= beta_T < 1:
        raise ValueError(f"need T ≥ 1 and 0 < beta_1 ≤ beta_T < 1, got T={T}, "
                         f"beta_1={beta_1}, beta_T={beta_T}")
    beta = jnp.linspace(beta_1, beta_T, T, dtype=jnp.float32)
    return Schedule(beta, jnp.cumprod(1.0 - beta))
