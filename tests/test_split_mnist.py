"""Split-MNIST VCL: the multi-head MLP, the three ELBO estimators, and the experiment end to end.

(The hand-checkable k-center case is ``test_data.test_kcenter_picks_far_apart_points``.)
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_DATA, require_data

from vcl_jax.config import ConfigError, override
from vcl_jax.configs.split_mnist import PRESETS
from vcl_jax.continual import vcl
from vcl_jax.data import DataError
from vcl_jax.models import bayes_mlp, mlp
from vcl_jax.protocols import split_mnist, split_mnist_setup
from vcl_jax.vi import mean_field as mf


def _params(key=0, d=12, hidden=(8, 6), heads=3, out=2):
    return mlp.init_mlp(jax.random.PRNGKey(key), d, hidden, heads, out)


def test_multi_head_output_shapes_and_head_selection():
    p = _params()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 12))
    assert mlp.apply(p, x, 0).shape == (5, 2)
    heads = jnp.array([0, 1, 2, 1, 0])
    mixed = mlp.apply(p, x, heads)
    for i, h in enumerate(heads.tolist()):
        one = dict(p, heads={"w": p["heads"]["w"][h:h + 1], "b": p["heads"]["b"][h:h + 1]})
        np.testing.assert_allclose(mixed[i], mlp.apply(one, x[i:i + 1], 0)[0], rtol=1e-5,
                                   atol=1e-6)
    assert [w["w"].shape for w in p["hidden"]] == [(12, 8), (8, 6)]
    assert p["heads"]["w"].shape == (3, 6, 2)


def test_local_reparameterisation_has_the_exact_pre_activation_moments():
    k = jax.random.PRNGKey(0)
    layer = mf.MeanField({"w": jax.random.normal(k, (4, 3)), "b": jnp.arange(3.0)},
                         {"w": jnp.full((4, 3), -1.0), "b": jnp.full((3,), -2.0)})
    x = jnp.array([[1.0, -2.0, 0.5, 0.0]])
    z = bayes_mlp.dense_local(layer, x, jax.random.PRNGKey(1), n_samples=20_000)  # [K, 1, 3]
    mean = x @ layer.mean["w"] + layer.mean["b"]
    var = (x ** 2) @ jnp.exp(layer.log_var["w"]) + jnp.exp(layer.log_var["b"])
    np.testing.assert_allclose(z.mean(0), mean, atol=4 * jnp.sqrt(var.max() / 20_000))
    np.testing.assert_allclose(z.var(0), var, rtol=0.05)


@pytest.mark.parametrize("estimator", ["paper", "local", "grouped"])
def test_estimators_are_unbiased_for_the_same_objective(estimator):
    p = _params(d=6, hidden=(5,), heads=2)
    q = mf.init_from_params(p, -1.0)  # large variances: the estimators differ a lot per draw
    x = jax.random.normal(jax.random.PRNGKey(2), (12, 6))
    y = jnp.arange(12) % 2
    head = jnp.arange(12) % 2
    est = jax.jit(jax.vmap(lambda k: bayes_mlp.expected_nll(q, x, y, head, k,
                                                            estimator=estimator, n_samples=4)))
    reference = jax.jit(jax.vmap(lambda k: bayes_mlp.expected_nll(
        q, x, y, head, k, estimator="paper", n_samples=50)))
    values = est(jax.random.split(jax.random.PRNGKey(3), 4000))
    ref = reference(jax.random.split(jax.random.PRNGKey(4), 400))
    se = jnp.sqrt(values.var() / values.size + ref.var() / ref.size)
    assert abs(values.mean() - ref.mean()) < 4 * se


def test_grouped_estimator_pads_a_batch_that_does_not_divide():
    p = _params(d=6, hidden=(5,), heads=1)
    q = mf.init_from_params(p, -30.0)  # ~deterministic: every estimator equals the plain NLL
    x = jax.random.normal(jax.random.PRNGKey(2), (7, 6))
    y = jnp.arange(7) % 2
    exact = jnp.mean(mlp.nll(mlp.apply(p, x, 0), y))
    for est in ("paper", "local", "grouped"):
        nll = jax.jit(functools.partial(bayes_mlp.expected_nll, estimator=est, n_samples=3))
        np.testing.assert_allclose(nll(q, x, y, 0, jax.random.PRNGKey(0)), exact, rtol=1e-4)


def test_weight_zero_rows_do_not_change_any_estimate():
    p = _params(d=6, hidden=(5,), heads=2)
    q = mf.init_from_params(p, -30.0)  # ~deterministic: every estimator equals the plain NLL
    x = jax.random.normal(jax.random.PRNGKey(2), (9, 6))
    y = jnp.arange(9) % 2
    batch = split_mnist_setup.task_batch(np.asarray(x), np.asarray(y), 1, size=16)
    assert batch["x"].shape == (16, 6) and float(batch["w"].sum()) == 9
    exact = jnp.mean(mlp.nll(mlp.apply(p, x, 1), y))
    for est in ("paper", "local", "grouped"):
        nll = jax.jit(functools.partial(bayes_mlp.expected_nll, estimator=est, n_samples=3))
        got = nll(q, batch["x"], batch["y"], batch["head"], jax.random.PRNGKey(0),
                  weight=batch["w"])
        np.testing.assert_allclose(got, exact, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot pad 9 examples to 4"):
        split_mnist_setup.task_batch(np.asarray(x), np.asarray(y), 1, size=4)


def test_closed_form_mlp_fisher_is_the_per_example_gradient_fisher():
    from vcl_jax.continual.fisher import fisher_stats

    p = _params(d=6, hidden=(5, 4), heads=3)
    x = jax.random.normal(jax.random.PRNGKey(2), (23, 6))
    y = jnp.arange(23) % 2
    head = jnp.arange(23) % 2  # heads 0 and 1 used, head 2 not: its Fisher is 0
    data = {"x": x, "y": y, "head": head}
    example = lambda q, e: mlp.nll(mlp.apply(q, e["x"][None], e["head"][None]), e["y"][None])[0]
    want = fisher_stats(example, p, data, chunk=5, rank1=False).diag
    got = mlp.diag_fisher(p, x, y, head)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, want)
    assert float(jnp.abs(got["heads"]["w"][2]).max()) == 0.0
    assert float(jnp.abs(got["heads"]["w"][1]).max()) > 0.0


def test_tasks_of_different_sizes_share_one_compiled_trainer():
    cfg = override(PRESETS["smoke"], ["hidden=8", "epochs=3"])
    setup = split_mnist_setup.Setup(cfg)
    rng = np.random.default_rng(0)
    tasks = [split_mnist_setup.TaskData(rng.random((n, 12), np.float32), rng.integers(0, 2, n),
                                  rng.random((5, 12), np.float32), rng.integers(0, 2, 5))
             for n in (20, 17)]
    split_mnist.run_one(setup, "mle", tasks, progress=False)
    assert setup.fit_mle._train._cache_size() == 1
    # Padding trains on the real examples only: the padded fit is the unpadded one.
    params = mlp.init_mlp(jax.random.PRNGKey(1), 12, cfg.model.hidden, 2, 2)
    task = tasks[1]
    key = jax.random.PRNGKey(2)
    plain, _ = setup.fit_mle(params, (), split_mnist_setup.task_batch(task.x, task.y, 0), key)
    padded, _ = setup.fit_mle(params, (), split_mnist_setup.task_batch(task.x, task.y, 0, 20), key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 plain, padded)


def test_elbo_decreases_on_a_tiny_problem():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (64, 6))
    y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    p = _params(d=6, hidden=(16,), heads=1)
    method = vcl(None, n_samples=4, log_var_init=-6.0, expected_loss=lambda q, b, k: (
        bayes_mlp.expected_nll(q, b["x"], b["y"], b["head"], k, estimator="local", n_samples=4)))
    q, state = method.init(p)
    q, state = method.begin_task(q, state, 0, 64)
    data = {"x": x, "y": y, "head": jnp.zeros((64,), jnp.int32)}

    def neg_elbo(q):  # many samples: the objective itself, not one noisy estimate
        keys = jax.random.split(jax.random.PRNGKey(9), 64)
        return jnp.mean(jax.vmap(lambda k: method.loss(q, state, data, k)[0])(keys))

    trainer = split_mnist_setup.TaskRunner(method, learning_rate=1e-2, epochs=60, batch_size=None)
    before = neg_elbo(q)
    q, metrics = trainer(q, state, data, jax.random.PRNGKey(1))
    assert metrics["loss"].shape == (60,)
    assert neg_elbo(q) < before - 0.1


def test_predictive_probabilities_are_distributions():
    p = _params()
    q = mf.init_from_params(p, -3.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 12))
    probs = bayes_mlp.predict_proba(q, x, 1, jax.random.PRNGKey(0), n_samples=20, chunk=7)
    assert probs.shape == (9, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_predictive_is_the_mean_of_softmaxes_over_weight_draws():
    """The Bayesian predictive averages each draw's probabilities, not its logits: with a
    wide posterior the two differ, and only the mean of softmaxes is what VCL reports."""
    q = mf.init_from_params(_params(), 0.0)  # σ = 1: draws far apart
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 12))
    key, n_chunks, chunk, head = jax.random.PRNGKey(0), 3, 7, 1
    probs = bayes_mlp.predict_proba(q, x, head, key, n_samples=n_chunks * chunk, chunk=chunk)
    # the same 21 draws, each through the deterministic MLP
    sample_many = jax.jit(mf.sample_many)
    draws = [sample_many(jax.random.split(k, chunk), q) for k in jax.random.split(key, n_chunks)]
    draws = jax.tree.map(lambda *a: jnp.concatenate(a), *draws)
    logits = jax.jit(jax.vmap(lambda w: mlp.apply(w, x, head)))(draws)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits).mean(0), rtol=1e-5, atol=1e-6)
    assert np.abs(probs - jax.nn.softmax(logits.mean(0))).max() > 1e-2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    mnist = require_data(os.path.join(SHARED_DATA, "mnist-5k"), "offline mnist-5k")
    cfg = override(PRESETS["smoke"], [f"data_dir={mnist}"])
    run_dir = str(tmp_path_factory.mktemp("split") / "run")
    return cfg, run_dir, split_mnist.run(cfg, run_dir, progress=False)


def test_smoke_run_end_to_end(smoke):
    cfg, run_dir, metrics = smoke
    for name in ("config.json", "metrics.json", "summary.md", "accuracy_heatmap.png",
                 "average_accuracy.png", "log.jsonl"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert metrics["provenance"]["devices"] and metrics["provenance"]["command"]
    assert set(metrics["runs"]) == set(cfg.methods)
    for r in metrics["runs"].values():
        acc = r["accuracy"]
        assert [len(row) for row in acc] == [1, 2]  # after task t: tasks 0..t
        assert all(0.0 <= a <= 1.0 for row in acc for a in row)
    # The smoke data is easy enough that the first task is learnt well above chance.
    assert metrics["runs"]["mle"]["accuracy"][0][0] > 0.8
    with open(os.path.join(run_dir, "metrics.json")) as f:
        assert json.load(f)["runs"]["vcl"]["average"] == metrics["runs"]["vcl"]["average"]


def test_same_seed_same_numbers(smoke, tmp_path):
    cfg, _, metrics = smoke
    name = "vcl+coreset_random"
    again = split_mnist.run(override(cfg, [f"methods={name}"]), str(tmp_path), progress=False)
    assert again["runs"][name]["accuracy"] == metrics["runs"][name]["accuracy"]


def test_bad_settings_are_clear_errors(smoke, tmp_path):
    cfg, run_dir, _ = smoke
    with pytest.raises(ConfigError, match=r"unknown method 'vcl\+ewk': 'ewk' is not a member"):
        split_mnist.run(override(cfg, ["methods=vcl,vcl+ewk"]), str(tmp_path / "a"), progress=False)
    with pytest.raises(ConfigError, match="unknown estimator"):
        override(cfg, ["estimator=magic"]).validate()
    with pytest.raises(ConfigError, match="larger than task"):
        split_mnist.run(override(cfg, ["coreset_size=500"]), str(tmp_path / "b"),
                        progress=False)
    # The smoke preset reads mnist-5k; asking for the full set there names both folders.
    with pytest.raises(DataError, match="holds 5,000 mnist training images.*mnist-full"):
        split_mnist.run(override(cfg, ["data_variant=full"]), str(tmp_path / "c"),
                        progress=False)
    with pytest.raises(ConfigError, match="unknown data_variant 'half'"):
        override(cfg, ["data_variant=half"]).validate()
    before = open(os.path.join(run_dir, "metrics.json")).read()
    with pytest.raises(ConfigError, match="different config"):
        split_mnist.run(override(cfg, ["epochs=7"]), run_dir, progress=False)
    assert open(os.path.join(run_dir, "metrics.json")).read() == before


def test_smoke_metrics_match_the_golden_file(smoke):
    from tests import golden

    _, _, metrics = smoke
    golden.check("split_mnist_smoke", {
        name: {"accuracy": r["accuracy"],
               "final_losses": [{k: v for k, v in sorted(d.items())} for d in r["final_losses"]]}
        for name, r in metrics["runs"].items()})


def test_natural_gradient_vcl_runs_and_reports_its_posterior_spread(smoke, tmp_path):
    cfg, _, _ = smoke
    cfg = override(cfg, ["methods=vcl,vcl_ng,vcl_ng+coreset_random", "ng_b2=0.5"])
    metrics = split_mnist.run(cfg, str(tmp_path), progress=False)
    for name in ("vcl", "vcl_ng", "vcl_ng+coreset_random"):
        r = metrics["runs"][name]
        assert all(0.0 <= a <= 1.0 for row in r["accuracy"] for a in row)
        spread = json.load(open(tmp_path / "metrics.json"))["runs"][name]
        assert spread["accuracy"] == r["accuracy"]
    # the posterior's standard deviations per layer (5th, 50th, 95th percentile) after each
    # task; natural-gradient VCL's leave the common value a task starts from, 1/√(1 + λ·h₀)
    ng = metrics["runs"]["vcl_ng"]["posterior_std"][-1]
    assert sorted(ng) == ["heads", "hidden0", "hidden1"]
    lo, mid, hi = ng["hidden0"]
    start = 1 / np.sqrt(1 + 64 / cfg.vcl_ng.ng_kl_scale * cfg.vcl_ng.ng_hess_init)
    assert 0 < lo < mid < hi and abs(mid - start) > 0.2 * start
    with pytest.raises(ConfigError, match="ng_kl_scale > 0"):
        override(cfg, ["ng_kl_scale=0"]).validate()
