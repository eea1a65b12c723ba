"""Diagonal EWC: Fisher from per-example gradients, the penalty, and its effect."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.continual import diag_fisher, ewc, per_example_grads
from vcl_jax.continual.consolidation import penalty


def _problem():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    data = {"x": jax.random.normal(k1, (37, 3)), "y": jax.random.normal(k2, (37,))}
    params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.3)}

    def example_loss(p, ex):
        return 0.5 * (ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2

    def batch_loss(p, batch, key):
        del key
        return jnp.mean(jax.vmap(example_loss, (None, 0))(p, batch))

    return params, data, example_loss, batch_loss


def test_diag_fisher_is_the_mean_squared_per_example_gradient():
    params, data, example_loss, _ = _problem()
    grads = per_example_grads(example_loss, params, data, chunk=8)
    assert grads["w"].shape == (37, 3)
    residual = data["x"] @ params["w"] + params["b"] - data["y"]
    np.testing.assert_allclose(grads["w"], residual[:, None] * data["x"], rtol=1e-5)
    fisher = diag_fisher(example_loss, params, data, chunk=8)
    np.testing.assert_allclose(fisher["w"], jnp.mean(grads["w"] ** 2, 0), rtol=1e-5)
    np.testing.assert_allclose(fisher["b"], jnp.mean(grads["b"] ** 2), rtol=1e-5)


def test_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it():
    params, data, example_loss, batch_loss = _problem()
    method = ewc(batch_loss, example_loss, n_tasks=3, lam=10.0)
    p, state = method.init(params)
    assert float(penalty(p, state)) == 0.0  # no task finished yet
    state = method.end_task(p, state, 0, data)
    assert float(penalty(p, state)) == pytest.approx(0.0, abs=1e-12)
    fisher = diag_fisher(example_loss, params, data)
    moved = jax.tree.map(lambda a: a + 0.1, p)
    expected = 0.5 * (jnp.sum(fisher["w"]) + fisher["b"]) * 0.01
    np.testing.assert_allclose(penalty(moved, state), expected, rtol=1e-5)
    total, metrics = method.loss(moved, state, data, jax.random.PRNGKey(0))
    np.testing.assert_allclose(total, metrics["loss"] + 10.0 * metrics["penalty"], rtol=1e-6)


def test_each_past_task_keeps_its_own_anchor():
    params, data, example_loss, batch_loss = _problem()
    method = ewc(batch_loss, example_loss, n_tasks=2, lam=1.0)
    p, state = method.init(params)
    state = method.end_task(p, state, 0, data)
    other = jax.tree.map(lambda a: a - 1.0, p)
    state = method.end_task(other, state, 1, data)
    # Between the two anchors neither term vanishes.
    mid = jax.tree.map(lambda a, b: 0.5 * (a + b), p, other)
    assert float(penalty(mid, state)) > 0
    np.testing.assert_array_equal(np.asarray(state.active), [True, True])
    with pytest.raises(ValueError, match="needs the finished task's data"):
        method.end_task(p, state, 1)
