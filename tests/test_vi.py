"""Mean-field VI: KL properties, reparameterised sampling statistics, masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.vi import mean_field as mf


def _tree(key):
    k1, k2 = jax.random.split(key)
    return {"a": jax.random.normal(k1, (3, 4)), "b": {"c": jax.random.normal(k2, (5,))}}


def test_kl_of_q_with_itself_is_zero():
    q = mf.MeanField(_tree(jax.random.key(0)), _tree(jax.random.key(1)))
    assert float(mf.kl(q, q)) == 0.0


def test_kl_of_a_close_pair_is_accurate_in_float32():
    # 10⁵ coordinates whose log-variances differ by 1e-3: the variance part of the KL is
    # ≈ ½·(1e-3)²/2 per coordinate, 0.025 in all, far below float32's ulp(1) per term
    n, d = 100_000, 1e-3
    q = mf.MeanField({"w": jnp.zeros(n)}, {"w": jnp.full((n,), -10.0 + d)})
    p = mf.MeanField({"w": jnp.zeros(n)}, {"w": jnp.full((n,), -10.0)})
    exact = 0.5 * n * (np.expm1(d) - d)
    np.testing.assert_allclose(float(mf.kl(q, p)), exact, rtol=1e-3)


def test_kl_is_positive_otherwise_and_matches_closed_form():
    q = mf.MeanField({"w": jnp.array([0.5])}, {"w": jnp.array([np.log(0.3)])})
    p = mf.MeanField({"w": jnp.array([-0.2])}, {"w": jnp.array([np.log(2.0)])})
    vq, vp, d = 0.3, 2.0, 0.7
    expected = 0.5 * (vq / vp + d**2 / vp - 1 + np.log(vp / vq))
    np.testing.assert_allclose(float(mf.kl(q, p)), expected, rtol=1e-5)
    for s in range(5):
        a = mf.MeanField(_tree(jax.random.key(s)), _tree(jax.random.key(s + 10)))
        b = mf.MeanField(_tree(jax.random.key(s + 20)), _tree(jax.random.key(s + 30)))
        assert float(mf.kl(a, b)) > 0


def test_mask_excludes_leaves_from_kl_and_noise():
    params = _tree(jax.random.key(0))
    q = mf.init_from_params(params, log_var=0.0)
    p = mf.prior(params, sigma=1.0)
    mask = {"a": True, "b": {"c": False}}
    only_a = mf.kl(mf.MeanField({"a": q.mean["a"]}, {"a": q.log_var["a"]}),
                   mf.MeanField({"a": p.mean["a"]}, {"a": p.log_var["a"]}))
    np.testing.assert_allclose(float(mf.kl(q, p, mask)), float(only_a), rtol=1e-6)
    w = mf.sample(jax.random.key(3), q, mask)
    np.testing.assert_array_equal(w["b"]["c"], params["b"]["c"])
    assert not np.allclose(w["a"], params["a"])
    assert mf.num_variational(q, mask) == 12


def test_reparameterised_samples_have_the_posterior_moments():
    mean = {"w": jnp.array([1.0, -2.0, 0.0]), "v": jnp.array([[3.0]])}
    log_var = {"w": jnp.log(jnp.array([0.25, 1.0, 4.0])), "v": jnp.log(jnp.array([[0.01]]))}
    q = mf.MeanField(mean, log_var)
    draws = jax.vmap(lambda k: mf.sample(k, q))(jax.random.split(jax.random.key(0), 20000))
    for name in ("w", "v"):
        m, v = np.asarray(mean[name]), np.exp(np.asarray(log_var[name]))
        se = np.sqrt(v / 20000)
        assert np.all(np.abs(draws[name].mean(0) - m) < 5 * se)
        np.testing.assert_allclose(draws[name].var(0), v, rtol=0.05)


def test_each_leaf_gets_its_own_key():
    q = mf.init_from_params({"a": jnp.zeros(1000), "b": jnp.zeros(1000)}, log_var=0.0)
    w = mf.sample(jax.random.key(0), q)
    assert abs(np.corrcoef(w["a"], w["b"])[0, 1]) < 0.1


def test_grouped_draw_is_the_per_leaf_draw_bit_for_bit():
    # leaves of many shapes (sizes sharing and not sharing a power-of-two class, a scalar)
    shapes = [(3, 3, 8, 16), (1152,), (7, 7, 4, 4), (16,), (5,), (), (2, 3), (33,), (16,)]
    params = {f"p{i}": jnp.zeros(s) for i, s in enumerate(shapes)}
    mask = {f"p{i}": i != 3 for i in range(len(shapes))}
    q = mf.init_from_params(params, log_var=0.0)
    key = jax.random.key(7)
    w = jax.jit(lambda k: mf.sample(k, q, mask))(key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    names = treedef.unflatten(range(len(leaves)))
    for name, i in names.items():
        expected = mf.standard_normal(keys[i], params[name].shape) if mask[name] else 0.0
        np.testing.assert_array_equal(w[name], expected)


@pytest.mark.parametrize("key", [jax.random.key(3), jax.random.PRNGKey(3)], ids=["typed", "raw"])
def test_standard_normal_is_standard_normal_and_a_prefix_of_longer_draws(key):
    z = np.asarray(jax.jit(lambda k: mf.standard_normal(k, (400, 500)))(key)).ravel()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n) and abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z ** 3)) < 5 * np.sqrt(15 / n)  # skewness 0, kurtosis 3
    assert abs(np.mean(z ** 4) - 3) < 5 * np.sqrt(96 / n)
    # the two words of one hash, and neighbours, are uncorrelated
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 / np.sqrt(n / 2)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / np.sqrt(n)
    # the normal CDF at a few points (Kolmogorov-Smirnov bound at 5e-3)
    from math import erf
    for t in (-2.0, -0.5, 0.0, 1.0, 2.5):
        assert abs(np.mean(z <= t) - 0.5 * (1 + erf(t / np.sqrt(2)))) < 5e-3
    short = mf.standard_normal(key, (1001,))
    np.testing.assert_array_equal(short, z[:1001])
    assert not np.array_equal(mf.standard_normal(jax.random.split(key)[0], (1001,)), short)
    # other dtypes fall back to jax.random.normal
    np.testing.assert_array_equal(mf.standard_normal(key, (7,), jnp.bfloat16),
                                  jax.random.normal(key, (7,), jnp.bfloat16))


def test_sample_many_is_stacked_draws_with_the_same_gradient():
    q = mf.MeanField({"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(5)},
                     {"w": jnp.full((3, 4), -1.0), "b": jnp.full((5,), -2.0)})
    mask = {"w": True, "b": False}
    keys = jax.random.split(jax.random.key(0), 6)
    stacked = jax.vmap(lambda k: mf.sample(k, q, mask))
    many = mf.sample_many(keys, q, mask)
    for name in ("w", "b"):
        np.testing.assert_array_equal(many[name], stacked(keys)[name])

    def loss(draw):
        return lambda q: jnp.sum(jnp.sin(draw(q)["w"]) ** 2) + jnp.sum(draw(q)["b"] ** 3)

    g_many = jax.grad(loss(lambda q: mf.sample_many(keys, q, mask)))(q)
    g_vmap = jax.grad(loss(lambda q: jax.vmap(lambda k: mf.sample(k, q, mask))(keys)))(q)
    for a, b in zip(jax.tree.leaves(g_many), jax.tree.leaves(g_vmap), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(g_many.log_var["b"]).sum()) == 0  # deterministic leaf


def test_sample_is_differentiable_wrt_posterior():
    q = mf.init_from_params({"w": jnp.ones(4)}, log_var=-2.0)
    g = jax.grad(lambda q: jnp.sum(mf.sample(jax.random.key(0), q)["w"] ** 2))(q)
    assert np.all(np.asarray(g.mean["w"]) != 0) and np.all(np.asarray(g.log_var["w"]) != 0)


@pytest.mark.parametrize("sigma", [1.0, 0.1])
def test_prior(sigma):
    p = mf.prior({"w": jnp.ones(3)}, sigma)
    np.testing.assert_allclose(np.exp(p.log_var["w"]), sigma**2, rtol=1e-6)
    assert float(jnp.abs(p.mean["w"]).sum()) == 0


def test_vcl_prior_zero_or_pretrained():
    from vcl_jax.continual import vcl

    params = {"w": jnp.array([0.5, -1.0])}
    loss = lambda p, batch, key: jnp.sum(p["w"] ** 2)
    q, state = vcl(loss, log_var_init=-4.0).init(params)
    np.testing.assert_allclose(state.prior.mean["w"], 0.0)
    assert float(mf.kl(q, state.prior)) > 0
    q, state = vcl(loss, log_var_init=-4.0, pretrained_prior=True).init(params)
    np.testing.assert_allclose(state.prior.mean["w"], params["w"])
    np.testing.assert_allclose(state.prior.log_var["w"], -4.0)
    assert abs(float(mf.kl(q, state.prior))) < 1e-6


def _regression_vcl(estimator, k, draws="vmap"):
    """VCL on a 1-parameter regression whose expected loss has a closed form."""
    from vcl_jax.continual import vcl

    def loss(p, batch, key):
        del key
        return jnp.mean((p["w"] * batch["x"] - batch["y"]) ** 2)

    return vcl(loss, n_samples=k, estimator=estimator, draws=draws)


@pytest.mark.parametrize("estimator", ["paper", "grouped"])
def test_vcl_estimators_are_unbiased(estimator):
    # E_{w~N(m, s²)} mean((w x − y)²) = mean((m x − y)²) + s² mean(x²)
    m, log_var = 0.7, np.log(0.3)
    x = jnp.linspace(-2.0, 3.0, 20)
    batch = {"x": x, "y": 1.5 * x + 0.2}
    method = _regression_vcl(estimator, 4)
    q = mf.MeanField({"w": jnp.array(m)}, {"w": jnp.array(log_var)})
    _, state = method.init({"w": jnp.array(0.0)})
    state = method.begin_task(q, state, 0, 20)[1]
    est = jax.vmap(lambda k: method.loss(q, state, batch, k)[1]["loss"])(
        jax.random.split(jax.random.key(0), 4000))
    exact = float(jnp.mean((m * x - batch["y"]) ** 2) + np.exp(log_var) * jnp.mean(x ** 2))
    stderr = float(jnp.std(est)) / np.sqrt(len(est))
    assert abs(float(jnp.mean(est)) - exact) < 4 * stderr


def test_grouped_estimator_gives_each_slice_its_own_draw():
    x = jnp.linspace(-2.0, 3.0, 8)
    batch = {"x": x, "y": 1.5 * x}
    q = mf.MeanField({"w": jnp.array(0.7)}, {"w": jnp.array(-1.0)})
    key = jax.random.key(5)
    grouped, paper = _regression_vcl("grouped", 4), _regression_vcl("paper", 4)
    _, state = grouped.init({"w": jnp.array(0.0)})
    # the k-th draw (the same keys as the paper estimator's) on the k-th slice of 2 examples
    ws = jax.vmap(lambda k: mf.sample(jax.random.split(k)[0], q)["w"])(jax.random.split(key, 4))
    per_slice = jnp.mean((ws[:, None] * x.reshape(4, 2) - batch["y"].reshape(4, 2)) ** 2, axis=1)
    got = grouped.loss(q, state, batch, key)[1]["loss"]
    np.testing.assert_allclose(got, jnp.mean(per_slice), rtol=1e-6)
    # the paper estimator uses every draw on the whole batch
    whole = jnp.mean((ws[:, None] * x[None] - batch["y"][None]) ** 2)
    np.testing.assert_allclose(paper.loss(q, state, batch, key)[1]["loss"], whole, rtol=1e-6)
    # one draw: the two estimators are the same computation
    one = [_regression_vcl(e, 1).loss(q, state, batch, key)[1]["loss"]
           for e in ("paper", "grouped")]
    np.testing.assert_allclose(one[0], one[1], rtol=0)
    with pytest.raises(ValueError, match="divisible"):
        _regression_vcl("grouped", 3).loss(q, state, batch, key)


@pytest.mark.parametrize("estimator", ["paper", "grouped"])
def test_both_draw_layouts_compute_the_estimate_and_vmap_traces_the_loss_once(estimator):
    from vcl_jax.continual import vcl

    x = jnp.linspace(-2.0, 3.0, 8)
    batch = {"x": x, "y": 1.5 * x}
    q = mf.MeanField({"w": jnp.array(0.7)}, {"w": jnp.array(-1.0)})
    key, k = jax.random.key(3), 4
    traces = []

    def loss(p, b, key):
        del key
        traces.append(1)  # one per trace: vmap traces the loss once, the loop K times
        return jnp.mean((p["w"] * b["x"] - b["y"]) ** 2)

    # An independent estimate: the documented draws (key split K ways, each split into a
    # weight key and a loss key; draw i = sample(weight key i)) put through jax.vmap here.
    pairs = jax.vmap(jax.random.split)(jax.random.split(key, k))

    def expected(q):
        ws = mf.sample_many(pairs[:, 0], q)
        b = batch if estimator == "paper" else jax.tree.map(
            lambda a: a.reshape(k, -1, *a.shape[1:]), batch)
        per = None if estimator == "paper" else 0
        return jnp.mean(jax.vmap(lambda w, bb: jnp.mean((w["w"] * bb["x"] - bb["y"]) ** 2),
                                 (0, per))(ws, b))

    want = jax.grad(expected)(q)
    for layout, n_traces in (("vmap", 1), ("loop", k)):
        traces.clear()
        method = vcl(loss, n_samples=k, estimator=estimator, draws=layout)
        _, state = method.init({"w": jnp.array(0.0)})
        state = method.begin_task(q, state, 0, 8)[1]
        state = state._replace(kl_weight=jnp.zeros(()))  # the likelihood part alone
        got = jax.grad(lambda q, m=method, s=state: m.loss(q, s, batch, key)[0])(q)
        assert len(traces) == n_traces, layout
        np.testing.assert_allclose(got.mean["w"], want.mean["w"], rtol=1e-5)
        np.testing.assert_allclose(got.log_var["w"], want.log_var["w"], rtol=1e-5)
    with pytest.raises(ValueError, match="draws layout"):
        _regression_vcl(estimator, 4, "scan")


def test_vcl_without_weight_noise_uses_the_means_and_keeps_the_kl():
    from vcl_jax.continual import vcl

    x = jnp.linspace(-2.0, 3.0, 8)
    batch = {"x": x, "y": 1.5 * x}
    loss = lambda p, b, key: jnp.mean((p["w"] * b["x"] - b["y"]) ** 2)
    method = vcl(loss, n_samples=4, weight_noise=False, log_var_init=-2.0)
    q, state = method.init({"w": jnp.array(0.7)})
    state = method.begin_task(q, state, 0, 8)[1]
    total, m = method.loss(q, state, batch, jax.random.key(0))
    np.testing.assert_allclose(m["loss"], loss(q.mean, batch, None), rtol=1e-6)
    assert float(m["kl"]) > 0 and float(total) > float(m["loss"])
    # the likelihood no longer depends on the log-variance: only the KL's gradient is left
    g = jax.grad(lambda q: method.loss(q, state, batch, jax.random.key(0))[0])(q)
    g_kl = jax.grad(lambda q: state.kl_weight * mf.kl(q, state.prior))(q)
    np.testing.assert_allclose(g.log_var["w"], g_kl.log_var["w"], rtol=1e-6)


def test_vcl_log_var_init_may_be_a_function_of_the_params():
    from vcl_jax.continual import vcl

    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    method = vcl(lambda p, b, k: 0.0, log_var_init=lambda p: jax.tree.map(
        lambda a: jnp.log(0.1 * jnp.abs(a)), p), pretrained_prior=True)
    q, state = method.init(params)
    np.testing.assert_allclose(q.log_var["w"], np.log([0.1, 0.2]), rtol=1e-6)
    np.testing.assert_allclose(state.prior.log_var["b"], np.log(0.05), rtol=1e-6)


def test_relative_log_var_follows_each_layers_weight_scale():
    params = {"wide": {"kernel": jnp.full((4, 4), 0.5), "bias": jnp.zeros(4)},
              "narrow": {"kernel": jnp.full((2, 2), -3.0), "bias": jnp.ones(2)},
              "null": jnp.array([2.0, -2.0])}
    lv = mf.relative_log_var(params, 0.1)
    np.testing.assert_allclose(lv["wide"]["kernel"], 2 * np.log(0.05), rtol=1e-6)
    np.testing.assert_allclose(lv["wide"]["bias"], 2 * np.log(0.05), rtol=1e-6)  # the kernel's
    np.testing.assert_allclose(lv["narrow"]["bias"], 2 * np.log(0.3), rtol=1e-6)
    np.testing.assert_allclose(lv["null"], 2 * np.log(0.2), rtol=1e-6)  # its own RMS
    with pytest.raises(ValueError, match="> 0"):
        mf.relative_log_var(params, 0.0)
