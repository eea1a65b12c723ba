"""The natural-gradient mean-field update (vcl_jax.vi.natural_gradient) against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vcl_jax.vi import mean_field as mf
from vcl_jax.vi.natural_gradient import curvature, natural_mean_field, with_curvature


def _fit(loss, q, prior, ess, *, steps, key, tx, record_from):
    """``steps`` natural-gradient steps on ``loss(q, key)``; the means and precisions
    averaged over the steps from ``record_from`` (the iterates fluctuate around the fixed
    point with the one-step curvature noise), and the curvature h after every step."""
    state = tx.init(q)

    @jax.jit
    def step(q, state, k):
        g = jax.grad(loss)(q, k)
        updates, state = tx.update(g, state, q, ess=jnp.float32(ess))
        q = optax.apply_updates(q, updates)
        return q, state, curvature(q, prior, ess)

    means, precs, hs = [], [], []
    for i in range(steps):
        q, state, h = step(q, state, jax.random.fold_in(key, i))
        hs.append(h)
        if i >= record_from:
            means.append(q.mean)
            precs.append(jnp.exp(-q.log_var))
    return np.mean(means, 0), np.mean(precs, 0), np.asarray(hs)


def test_linear_gaussian_regression_reaches_the_exact_posterior():
    # y = Xw + N(0, s²), prior N(0, 1/P0): the exact posterior has precision
    # A = XᵀX/s² + P0·I and mean A⁻¹Xᵀy/s²; the best mean-field Gaussian has the same mean
    # and precision diag(A). Correlated features make diag(A) differ from any per-weight
    # squared-gradient statistic.
    rng = np.random.default_rng(0)
    n, s, p0 = 200, 0.5, 1.0
    x = rng.normal(size=(n, 3)) * np.array([1.0, 0.3, 2.0])
    x[:, 1] += 0.5 * x[:, 0]
    y = x @ np.array([1.0, -2.0, 0.5]) + s * rng.normal(size=n)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    a = x.T @ x / s**2 + p0 * jnp.eye(3)
    exact_mean = np.asarray(jnp.linalg.solve(a, x.T @ y / s**2))
    exact_prec = np.asarray(jnp.diag(a))

    prior = mf.MeanField(jnp.zeros(3), jnp.full(3, -np.log(p0), jnp.float32))

    def loss(q, key):  # the VCL objective per datum: E_q[mean NLL] + KL/N (4 draws)
        ws = mf.sample_many(jax.random.split(key, 4), q)
        nll = jax.vmap(lambda w: jnp.mean(0.5 * (y - x @ w) ** 2) / s**2)(ws)
        return jnp.mean(nll) + mf.kl(q, prior) / n

    q0 = with_curvature(mf.MeanField(jnp.zeros(3), jnp.zeros(3)), prior, n, 5.0)
    mean, prec, _ = _fit(loss, q0, prior, n, steps=4000, key=jax.random.key(1),
                         tx=natural_mean_field(0.1, b1=0.9, b2=0.99), record_from=1000)
    np.testing.assert_allclose(mean, exact_mean, atol=0.02)
    np.testing.assert_allclose(prec, exact_prec, rtol=0.04)


def test_curvature_tracks_the_diagonal_hessian_of_a_quadratic():
    # ℓ(w) = ½ Σ a_i (w_i − c_i)²: the Hessian is diag(a); it changes halfway, and h follows
    n = 1000
    c = jnp.array([0.5, -1.0, 2.0, 0.0])
    prior = mf.MeanField(jnp.zeros(4), jnp.full(4, np.log(1e3), jnp.float32))  # P = 1e-3
    first, second = jnp.array([1.0, 4.0, 0.25, 10.0]), jnp.array([3.0, 0.5, 0.25, 30.0])
    tx = natural_mean_field(0.2, b1=0.9, b2=0.99)
    q = with_curvature(mf.MeanField(jnp.zeros(4), jnp.zeros(4)), prior, n, 1.0)
    for hess, seed in ((first, 0), (second, 1)):
        def loss(q, key, hess=hess):  # 8 draws: IVON's h is biased up by ½(1−β₂)·Var(ĥ)/h
            ws = mf.sample_many(jax.random.split(key, 8), q)
            return 0.5 * jnp.mean(jnp.sum(hess * (ws - c) ** 2, -1)) + mf.kl(q, prior) / n

        mean, _, hs = _fit(loss, q, prior, n, steps=2000, key=jax.random.key(seed), tx=tx,
                           record_from=1000)
        np.testing.assert_allclose(hs[1000:].mean(0), hess, rtol=0.05)
        np.testing.assert_allclose(mean, c, atol=0.02)
        # the next phase starts from where this one ended
        q = mf.MeanField(jnp.asarray(mean), -jnp.log(n * hs[-1] + 1e-3))


def test_deterministic_leaves_take_adam_steps_and_keep_their_log_variance():
    params = mf.MeanField({"a": jnp.ones(3), "b": jnp.ones(2)},
                          {"a": jnp.full(3, -4.0), "b": jnp.full(2, -4.0)})
    grads = mf.MeanField({"a": jnp.full(3, 0.5), "b": jnp.array([2.0, -3.0])},
                         {"a": jnp.zeros(3), "b": jnp.zeros(2)})
    tx = natural_mean_field(0.1, mask={"a": True, "b": False}, deterministic_scale=0.5)
    updates, state = tx.update(grads, tx.init(params), params, ess=jnp.float32(10.0))
    # Adam's first step is lr·sign(g)
    np.testing.assert_allclose(updates.mean["b"], [-0.05, 0.05], rtol=1e-4)
    np.testing.assert_array_equal(updates.log_var["b"], 0.0)
    assert state.nu["a"].shape == () and state.nu["b"].shape == (2,)
    # the random leaf: no curvature signal (zero log-variance gradient) keeps s; the step is
    # lr · g / s with s = e^{4}/10
    np.testing.assert_allclose(updates.mean["a"], -0.1 * 0.5 / (np.exp(4.0) / 10.0), rtol=1e-4)
    np.testing.assert_allclose(updates.log_var["a"], 0.0, atol=1e-5)


def test_clip_bounds_the_step_and_bad_settings_are_errors():
    q = mf.MeanField(jnp.zeros(2), jnp.zeros(2))
    g = mf.MeanField(jnp.array([100.0, -100.0]), jnp.zeros(2))
    tx = natural_mean_field(1.0, clip=1e-3)
    updates, _ = tx.update(g, tx.init(q), q, ess=jnp.float32(1.0))
    np.testing.assert_allclose(updates.mean, [-1e-3, 1e-3])
    with pytest.raises(ValueError, match="b1 and b2"):
        natural_mean_field(0.1, b2=1.0)
    with pytest.raises(ValueError, match="clip"):
        natural_mean_field(0.1, clip=0.0)


def _linear_task(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -1.0, 0.5]) + 0.1 * rng.normal(size=n)).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _sq_loss(params, batch, key):
    del key
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def test_vcl_ng_owns_its_update_and_learns_its_variances_in_a_chain():
    from vcl_jax.continual import chain, coreset, vcl, vcl_ng
    from vcl_jax.training.state import TrainState, make_train_step, optimizer_for

    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    m = vcl_ng(_sq_loss, n_samples=16, log_var_init=-4.0, prior_sigma=1.0, hess_init=0.5,
               b2=0.98)
    assert vcl(_sq_loss).optimizer is None  # plain VCL keeps the experiment's Adam
    example = {"x": jax.ShapeDtypeStruct((3,), jnp.float32),
               "y": jax.ShapeDtypeStruct((), jnp.float32)}
    core = coreset(lambda d, ex: np.arange(4), 4, 1, example, mode="finetune")
    for method in (m, chain(m, core)):
        assert method.optimizer is not None
        opt = optimizer_for(method, 0.1)
        state = TrainState.create(method, opt, params)
        q, ms = method.begin_task(state.trainable, state.method_state, 0, 64)
        # the precision at a task's start: the prior's (1/σ₀² = 1) plus λ·h₀ = 64·0.5
        np.testing.assert_allclose(q.log_var["w"], -np.log(1.0 + 64 * 0.5), rtol=1e-6)
        state = state._replace(trainable=q, method_state=ms)
        step = jax.jit(make_train_step(method, opt))
        data = _linear_task()
        for i in range(300):
            state, metrics = step(state, data, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))
        np.testing.assert_allclose(state.trainable.mean["w"], [1.0, -1.0, 0.5], atol=0.1)
        # the precisions left their start: the loss's curvature (2·E[x²] ≈ 2 per datum)
        # dominates the prior's, so λ(h + δ) ≈ 64·2 + 1
        prec = np.exp(-np.asarray(state.trainable.log_var["w"]))
        np.testing.assert_allclose(prec, 64 * 2 * np.mean(np.square(data["x"]), 0) + 1,
                                   rtol=0.3)


def test_vcl_ng_settings_are_checked():
    from vcl_jax.continual import vcl_ng

    with pytest.raises(ValueError, match="kl_scale > 0"):
        vcl_ng(_sq_loss, kl_scale=0.0)
    with pytest.raises(ValueError, match="hess_init > 0"):
        vcl_ng(_sq_loss, hess_init=0.0)
    with pytest.raises(ValueError, match="prior_decay"):
        vcl_ng(_sq_loss, prior_decay=1.5)


@pytest.mark.parametrize("decay", [1.0, 0.25])
def test_prior_decay_scales_the_next_priors_precision(decay):
    from vcl_jax.continual import vcl_ng

    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    m = vcl_ng(_sq_loss, n_samples=1, prior_sigma=1.0, hess_init=0.5, prior_decay=decay)
    q, ms = m.init(params)
    q = q._replace(mean={"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.ones(())},
                   log_var={"w": jnp.array([-2.0, -3.0, -4.0]), "b": jnp.zeros(())})
    ms = m.end_task(q, ms, 0)
    # the means are kept; the precisions e^{-log σ²} are multiplied by γ
    np.testing.assert_array_equal(ms.prior.mean["w"], q.mean["w"])
    np.testing.assert_allclose(np.exp(-ms.prior.log_var["w"]),
                               decay * np.exp(-np.asarray(q.log_var["w"])), rtol=1e-6)
    # the next task starts from that prior's precision plus λ·h₀
    q2, _ = m.begin_task(q, ms, 1, 64)
    np.testing.assert_allclose(np.exp(-q2.log_var["w"]),
                               decay * np.exp(-np.asarray(q.log_var["w"])) + 64 * 0.5,
                               rtol=1e-5)
