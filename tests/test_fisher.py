"""Fisher estimates, Gram-matrix analysis, rank-1 EWC, method chaining, distillation, FD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.continual import (
    chain,
    distillation,
    ewc,
    fisher_stats,
    gram_analysis,
    gram_matrix,
    mle,
    per_example_grads,
)
from vcl_jax.continual.consolidation import penalty
from vcl_jax.eval.metrics import frechet_distance, gaussian_stats


def _regression(n=29, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    data = {"x": jax.random.normal(k1, (n, 4)), "y": jax.random.normal(k2, (n,))}
    params = {"w": jnp.array([0.5, -1.0, 2.0, 0.1]), "b": jnp.array([0.3])}

    def example_loss(p, ex):
        return 0.5 * (ex["x"] @ p["w"] + p["b"][0] - ex["y"]) ** 2

    return params, data, example_loss


def _dense(example_loss, params, data):
    g = per_example_grads(example_loss, params, data, chunk=7)
    # The order of jax.flatten_util.ravel_pytree (keys sorted): b, then w.
    return np.concatenate([np.asarray(g["b"]), np.asarray(g["w"])], axis=1).astype(np.float64)


def test_fisher_stats_match_the_dense_per_example_gradients():
    params, data, example_loss = _regression()
    g = _dense(example_loss, params, data)
    stats = fisher_stats(example_loss, params, data, chunk=6)  # 29 = 4·6 + 5: a padded chunk
    mean = np.concatenate([stats.mean["b"], stats.mean["w"]])
    diag = np.concatenate([stats.diag["b"], stats.diag["w"]])
    np.testing.assert_allclose(mean, g.mean(0), rtol=1e-5)
    np.testing.assert_allclose(diag, (g ** 2).mean(0), rtol=1e-5)
    mu = g.mean(0)
    np.testing.assert_allclose(stats.proj_sq, np.mean((g @ mu) ** 2), rtol=1e-4)
    np.testing.assert_allclose(stats.rank1_scale(), np.mean((g @ mu) ** 2) / (mu @ mu) ** 2,
                               rtol=1e-4)
    assert float(stats.rank1_scale(unit=True)) == 1.0


def test_gram_analysis_matches_the_explicit_fisher():
    params, data, example_loss = _regression(n=23)
    g = _dense(example_loss, params, data)
    n = len(g)
    f = g.T @ g / n
    res = gram_matrix(example_loss, params, data, chunk=5)  # 5 chunks, last padded
    np.testing.assert_allclose(res.gram, g @ g.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.mean, g.mean(0), rtol=1e-5)
    out = gram_analysis(res.gram, res.diag_sq_sum, top=3)
    eig = np.sort(np.linalg.eigvalsh(f))[::-1]
    np.testing.assert_allclose(out["eigenvalues"], eig[:3], rtol=1e-4)
    np.testing.assert_allclose(out["ratio21"], eig[1] / eig[0], rtol=1e-4)
    mu = g.mean(0)
    c = np.mean((g @ mu) ** 2) / (mu @ mu) ** 2
    fro = np.linalg.norm(f)
    rel = lambda approx: np.linalg.norm(f - approx) / fro
    np.testing.assert_allclose(out["c"], c, rtol=1e-4)
    np.testing.assert_allclose(out["rel_err_diag"], rel(np.diag(np.diag(f))), rtol=1e-3)
    np.testing.assert_allclose(out["rel_err_rank1"], rel(c * np.outer(mu, mu)), rtol=1e-3)
    np.testing.assert_allclose(out["rel_err_rank1_unit"], rel(np.outer(mu, mu)), rtol=1e-3)
    np.testing.assert_allclose(out["rel_err_best_rank1"], rel(eig[0] * np.outer(
        *[np.linalg.eigh(f)[1][:, -1]] * 2)), rtol=1e-3)
    cos = np.abs(g @ mu) / (np.linalg.norm(g, axis=1) * np.linalg.norm(mu))
    np.testing.assert_allclose(out["cos"], cos, rtol=1e-4)
    # The rank-1 scale c is the Frobenius-optimal one: no other scale does better.
    for s in (0.5 * c, 2.0 * c):
        assert rel(s * np.outer(mu, mu)) >= out["rel_err_rank1"] - 1e-9


def test_collinear_gradients_give_an_exact_rank1_fisher():
    # g_n = a_n · v for every example: F = E[a²] vvᵀ = c μμᵀ exactly.
    v = jnp.array([1.0, -2.0, 0.5])
    data = {"a": jnp.array([0.5, 1.0, 2.0, 3.0, -1.0, 0.7])}
    example_loss = lambda p, ex: ex["a"] * jnp.dot(p["w"], v)
    params = {"w": jnp.zeros(3)}
    res = gram_matrix(example_loss, params, data, chunk=4)
    out = gram_analysis(res.gram, res.diag_sq_sum)
    assert out["ratio21"] < 1e-6
    assert out["rel_err_rank1"] < 1e-3
    np.testing.assert_allclose(out["cos"], 1.0, rtol=1e-5)
    a = np.asarray(data["a"])
    np.testing.assert_allclose(out["c"], np.mean(a**2) / np.mean(a) ** 2, rtol=1e-4)
    assert out["rel_err_diag"] > 0.3  # v has off-diagonal mass: the diagonal misses it


def test_rank1_penalty_per_task_anchor_and_scale():
    params, data, example_loss = _regression()
    for kind in ("rank1", "rank1_unit"):
        method = ewc(None, example_loss, n_tasks=2, lam=3.0, fisher=kind, chunk=8)
        p, state = method.init(params)
        assert float(penalty(p, state)) == 0.0
        state = method.end_task(p, state, 0, data)
        assert float(penalty(p, state)) == pytest.approx(0.0, abs=1e-12)
        stats = fisher_stats(example_loss, params, data)
        c = float(stats.rank1_scale(unit=kind == "rank1_unit"))
        delta = {"w": jnp.array([0.1, 0.2, -0.3, 0.0]), "b": jnp.array([0.05])}
        moved = jax.tree.map(jnp.add, p, delta)
        proj = float(jnp.dot(stats.mean["w"], delta["w"]) + stats.mean["b"][0] * 0.05)
        np.testing.assert_allclose(penalty(moved, state), 0.5 * c * proj**2, rtol=1e-4)
        total, metrics = method.loss(moved, state, data, jax.random.PRNGKey(0))
        np.testing.assert_allclose(total, 3.0 * metrics["penalty"], rtol=1e-6)
        # A direction orthogonal to μ costs nothing under rank-1 (but does under diagonal).
        mu = np.concatenate([stats.mean["w"], stats.mean["b"]])
        ortho = np.array([mu[1], -mu[0], 0, 0, 0], np.float32)
        side = {"w": p["w"] + ortho[:4], "b": p["b"] + ortho[4:]}
        assert float(penalty(side, state)) == pytest.approx(0.0, abs=1e-8)
    diag = ewc(None, example_loss, n_tasks=1, lam=1.0, fisher="diag")
    _, dstate = diag.init(params)
    dstate = diag.end_task(params, dstate, 0, data)
    assert float(penalty(side, dstate)) > 0
    with pytest.raises(ValueError, match="unknown Fisher"):
        ewc(None, example_loss, n_tasks=1, lam=1.0, fisher="kfac")


def test_chain_sums_losses_and_distillation_freezes_the_teacher():
    params, data, example_loss = _regression()
    batch_loss = lambda p, b, k: jnp.mean(jax.vmap(example_loss, (None, 0))(p, b))

    def loss_with_teacher(p, teacher, batch, key):
        base = batch_loss(p, batch, key)
        dist = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p),
                                                         jax.tree.leaves(teacher), strict=True))
        return base + dist, {"loss": base, "distill": dist}

    method = chain(distillation(loss_with_teacher),
                   ewc(None, example_loss, n_tasks=2, lam=2.0, fisher="diag"))
    assert method.name == "distill+ewc_diag"
    p, state = method.init(params)
    state = method.end_task(p, state, 0, data)
    teacher = state[0]
    moved = jax.tree.map(lambda a: a + 0.1, p)
    total, metrics = method.loss(moved, state, data, jax.random.PRNGKey(1))
    assert set(metrics) == {"loss", "distill", "penalty"}
    np.testing.assert_allclose(total, metrics["loss"] + metrics["distill"]
                               + 2.0 * metrics["penalty"], rtol=1e-6)
    np.testing.assert_allclose(metrics["distill"], 0.01 * 5, rtol=1e-5)
    # The teacher gets no gradient, and stays the params of the end of task 0.
    grads = jax.grad(lambda t: method.loss(moved, (t, state[1]), data, jax.random.PRNGKey(1))[0])(
        teacher)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(grads))
    np.testing.assert_array_equal(teacher["w"], params["w"])
    # MLE chained with nothing is MLE.
    plain = chain(mle(batch_loss))
    assert plain.loss(p, plain.init(p)[1], data, None)[0] == batch_loss(p, data, None)


def _teacher_loss(batch_loss):
    def loss_with_teacher(p, teacher, batch, key):
        dist = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p),
                                                         jax.tree.leaves(teacher), strict=True))
        return dist, {"distill": dist}
    return loss_with_teacher


def test_chain_with_vcl_trains_the_posterior_and_the_others_act_on_its_means():
    from vcl_jax.continual import vcl

    params, data, example_loss = _regression()
    batch_loss = lambda p, b, k: jnp.mean(jax.vmap(example_loss, (None, 0))(p, b))
    members = (vcl(batch_loss, n_samples=2, log_var_init=-4.0),
               ewc(None, example_loss, n_tasks=2, lam=3.0, fisher="rank1"),
               distillation(_teacher_loss(batch_loss)))
    method = chain(*members)
    assert method.name == "vcl+ewc_rank1+distill" and method.view is members[0].view
    q, states = method.init(params)
    assert isinstance(q, type(members[0].init(params)[0]))  # the posterior is what trains
    q, states = method.begin_task(q, states, 0, 29)
    states = method.end_task(q, states, 0, data)
    # EWC anchored, and distillation froze, the posterior means; VCL's prior is the posterior.
    np.testing.assert_array_equal(states[1].anchors["w"][0], q.mean["w"])
    np.testing.assert_array_equal(states[2]["w"], q.mean["w"])
    np.testing.assert_array_equal(states[0].prior.mean["w"], q.mean["w"])
    q, states = method.begin_task(q, states, 1, 29)
    moved = q._replace(mean=jax.tree.map(lambda a: a + 0.1, q.mean))
    key = jax.random.PRNGKey(2)
    total, metrics = method.loss(moved, states, data, key)
    # The sum of the members' losses, each at its own point and key.
    parts = [members[0].loss(moved, states[0], data, key)[0],
             members[1].loss(moved.mean, states[1], data, jax.random.fold_in(key, 1))[0],
             members[2].loss(moved.mean, states[2], data, jax.random.fold_in(key, 2))[0]]
    np.testing.assert_allclose(total, sum(parts), rtol=1e-6)
    assert {"loss", "kl", "penalty", "distill"} <= set(metrics)
    np.testing.assert_allclose(metrics["distill"], 0.01 * 5, rtol=1e-5)
    # The penalties reach the means (not the log-variances, which only VCL's terms move).
    g = jax.grad(lambda m: method.loss(moved._replace(mean=m), states, data, key)[0])(moved.mean)
    g_vcl = jax.grad(lambda m: members[0].loss(moved._replace(mean=m), states[0], data, key)[0])(
        moved.mean)
    assert not np.allclose(g["w"], g_vcl["w"])
    draws = method.draws(q, jax.random.PRNGKey(3), 4)
    assert draws["w"].shape == (4, 4)  # VCL's weight draws, not copies of the means
    assert not np.allclose(draws["w"][0], draws["w"][1])


def test_chain_of_params_methods_shares_the_params_and_refuses_two_posteriors():
    from vcl_jax.continual import vcl

    params, data, example_loss = _regression()
    batch_loss = lambda p, b, k: jnp.mean(jax.vmap(example_loss, (None, 0))(p, b))
    rank1 = ewc(batch_loss, example_loss, n_tasks=2, lam=1.0, fisher="rank1")
    method = chain(rank1, distillation(_teacher_loss(batch_loss)))
    assert method.view is None
    p, states = method.init(params)
    assert p is params or jax.tree.all(jax.tree.map(np.array_equal, p, params))
    states = method.end_task(p, states, 0, data)
    np.testing.assert_array_equal(states[0].anchors["w"][0], params["w"])
    np.testing.assert_array_equal(states[1]["w"], params["w"])
    moved = jax.tree.map(lambda a: a + 0.1, p)
    total, metrics = method.loss(moved, states, data, jax.random.PRNGKey(1))
    np.testing.assert_allclose(total, metrics["loss"] + metrics["penalty"] + metrics["distill"],
                               rtol=1e-6)
    assert metrics["penalty"] > 0
    with pytest.raises(ValueError, match="at most one method"):
        chain(vcl(batch_loss), rank1, vcl(batch_loss))


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    sa = gaussian_stats(a)
    assert frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-8)
    shifted = (sa[0] + 2.0, sa[1])
    assert frechet_distance(sa, shifted) == pytest.approx(4.0 * 5, rel=1e-6)
    # Against the closed form with scipy's matrix square root.
    from scipy.linalg import sqrtm

    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    sb = gaussian_stats(b)
    ref = (np.sum((sa[0] - sb[0]) ** 2) + np.trace(sa[1]) + np.trace(sb[1])
           - 2 * np.real(np.trace(sqrtm(sa[1] @ sb[1]))))
    assert frechet_distance(sa, sb) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="features"):
        gaussian_stats(np.zeros((1, 5)))


def _select_first(n):
    return lambda task, ex: np.arange(task, task + n)  # a different coreset per task


def test_chain_with_a_coreset_withholds_replays_and_tunes_on_it():
    from vcl_jax.continual import TrainData, coreset, vcl

    params, data, example_loss = _regression()
    batch_loss = lambda p, b, k: jnp.mean(jax.vmap(example_loss, (None, 0))(p, b))
    example = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in data.items()}
    base = vcl(batch_loss, n_samples=2, log_var_init=-4.0)
    for mode in ("finetune", "finetune_each", "replay"):
        core = coreset(_select_first(3), 3, 2, example, mode=mode)
        method = chain(base, core)
        assert method.name == f"vcl+coreset_{mode}" and method.view is base.view
        q, states = method.init(params)
        states, t0 = method.prepare(q, states, 0, TrainData(data, 29))
        # Task 0's coreset left its training data and went into the pool's first slot.
        assert t0.n_data == 26 and t0.data["x"].shape == (26, 4)
        np.testing.assert_array_equal(states[1]["x"][:3], data["x"][:3])
        np.testing.assert_array_equal(t0.data["x"], data["x"][3:])
        states, t1 = method.prepare(q, states, 1, TrainData(data, 29))
        np.testing.assert_array_equal(states[1]["y"][3:], data["y"][1:4])
        if mode == "replay":  # task 1 trains on its own examples and task 0's coreset
            assert t1.n_data == 29 and method.tune_data is None  # nothing to tune on
            np.testing.assert_array_equal(t1.data["x"][26:], data["x"][:3])
        elif mode == "finetune":  # both coresets, in task order, for the copy tuned
            assert t1.n_data == 26
            tune = method.tune_data(states, 1)
            np.testing.assert_array_equal(tune["x"], np.concatenate([data["x"][:3],
                                                                     data["x"][1:4]]))
        else:  # one data set per task so far, each for a copy of its own
            assert t1.n_data == 26
            tune = method.tune_data(states, 1)
            assert len(tune) == 2
            np.testing.assert_array_equal(tune[0]["x"], data["x"][:3])
            np.testing.assert_array_equal(tune[1]["x"], data["x"][1:4])
        # The coreset adds nothing to the loss: the chain's is VCL's, at the same key.
        key = jax.random.PRNGKey(4)
        q, states = method.begin_task(q, states, 1, 26)
        np.testing.assert_array_equal(method.loss(q, states, data, key)[0],
                                      base.loss(q, states[0], data, key)[0])
    with pytest.raises(ValueError, match="coreset mode 'both'"):
        coreset(_select_first(3), 3, 2, example, mode="both")


def test_chain_with_generative_replay_gives_later_tasks_a_pool_from_the_model():
    from vcl_jax.continual import TrainData, generative_replay, vcl

    params, data, example_loss = _regression()
    batch_loss = lambda p, b, k: jnp.mean(jax.vmap(example_loss, (None, 0))(p, b))
    seen = []

    def sample_pool(p, task):  # a stand-in generator: the model's weights, tagged by task
        seen.append(task)
        return {"pool": p["w"] * task}

    for first in (distillation(_teacher_loss(batch_loss)),
                  vcl(batch_loss, n_samples=2, log_var_init=-4.0)):
        method = chain(first, ewc(None, example_loss, n_tasks=2, lam=3.0, fisher="rank1"),
                       generative_replay(sample_pool))
        t, states = method.init(params)
        states, t0 = method.prepare(t, states, 0, TrainData(data, 29))
        assert t0.shared is None and seen == []  # nothing to replay on the first task
        t, states = method.begin_task(t, states, 0, 29)
        states = method.end_task(t, states, 0, data)
        states, t1 = method.prepare(t, states, 1, TrainData(data, 29))
        # The pool comes from the params the chain trains (VCL: the posterior means).
        point = t.mean if first.view else t
        np.testing.assert_array_equal(t1.shared["pool"], point["w"] * 1)
        assert seen.pop() == 1 and t1.data is data and t1.n_data == 29
        key = jax.random.PRNGKey(5)
        total = method.loss(t, states, data, key)[0]
        parts = [first.loss(t, states[0], data, key)[0],
                 method.loss(t, states, data, key)[1]["penalty"] * 3.0]
        np.testing.assert_allclose(total, sum(parts), rtol=1e-6)
