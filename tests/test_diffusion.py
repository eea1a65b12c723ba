"""Noise schedule, forward noising, per-example loss, samplers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.diffusion import ddim_sample, ddpm_sample, example_loss, linear_schedule, q_sample
from vcl_jax.diffusion.loss import batch_loss
from vcl_jax.diffusion.samplers import ddim_timesteps, guided_eps


def test_linear_schedule_alpha_bar():
    s = linear_schedule(400, 1e-4, 0.02)
    beta = np.linspace(1e-4, 0.02, 400)
    np.testing.assert_allclose(s.beta, beta, rtol=1e-5)
    np.testing.assert_allclose(s.alpha_bar, np.cumprod(1 - beta), rtol=1e-4)
    assert s.T == 400 and float(s.alpha_bar[0]) == pytest.approx(1 - 1e-4)
    assert float(s.alpha_bar[-1]) == pytest.approx(np.prod(1 - beta), rel=1e-3)
    assert float(s.alpha_bar[-1]) < 0.02  # x_T is nearly pure noise
    with pytest.raises(ValueError, match="beta"):
        linear_schedule(10, 0.5, 0.1)


def test_q_sample_moments():
    s = linear_schedule(100)
    x0 = jnp.full((20000,), 2.0)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = q_sample(s, x0, 50, noise)
    ab = float(s.alpha_bar[49])
    assert float(xt.mean()) == pytest.approx(2 * np.sqrt(ab), abs=0.03)
    assert float(xt.var()) == pytest.approx(1 - ab, rel=0.05)


def _perfect_eps_fn(x, t, task, keep):  # predicts zero noise
    return jnp.zeros_like(x)


def test_example_loss_shapes_and_value():
    s = linear_schedule(50)
    x0 = jnp.zeros((28, 28, 1))
    loss = example_loss(_perfect_eps_fn, s, jax.random.key(0), x0, jnp.array(0))
    assert loss.shape == ()
    # With ε̂ = 0 the loss is E[ε²] = 1 (per-pixel mean).
    assert float(loss) == pytest.approx(1.0, abs=0.15)
    per = jax.vmap(lambda k: example_loss(_perfect_eps_fn, s, k, x0, jnp.array(0)))(
        jax.random.split(jax.random.key(1), 8))
    assert per.shape == (8,)
    b = batch_loss(_perfect_eps_fn, s, jax.random.key(2), jnp.zeros((8, 28, 28, 1)),
                   jnp.zeros(8, jnp.int32))
    assert b.shape == () and float(b) == pytest.approx(1.0, abs=0.05)


def test_batch_loss_is_the_mean_of_example_losses():
    """One call of the network on the batch gives the vmap-of-examples loss: the same
    timesteps, noise and guidance drops per example (a network that depends on all four)."""
    s = linear_schedule(50)

    def eps_fn(x, t, task, keep):
        w = t[:, None, None, None] + 0.1 * task[:, None, None, None] + keep[:, None, None, None]
        return jnp.tanh(x) * w

    x0 = jax.random.uniform(jax.random.key(0), (6, 5, 4, 2))
    task = jnp.arange(6) % 3
    key = jax.random.key(1)
    per = jax.vmap(lambda k, x, d: example_loss(eps_fn, s, k, x, d, p_uncond=0.5))(
        jax.random.split(key, 6), x0, task)
    np.testing.assert_allclose(batch_loss(eps_fn, s, key, x0, task, p_uncond=0.5),
                               jnp.mean(per), rtol=1e-6)


def test_guidance_combines_conditional_and_unconditional():
    def eps_fn(x, t, task, keep):
        return jnp.where(keep[:, None, None, None], 1.0, 0.25) * jnp.ones_like(x)

    out = guided_eps(eps_fn, jnp.zeros((3, 4, 4, 1)), jnp.ones(3), jnp.zeros(3, int), 2.0)
    np.testing.assert_allclose(out, 3 * 1.0 - 2 * 0.25)


def test_unguided_sampling_skips_the_unconditional_pass():
    batches = []

    def eps_fn(x, t, task, keep):
        batches.append((x.shape[0], bool(np.all(np.asarray(keep)))))
        return jnp.where(keep[:, None, None, None], 1.0, 0.25) * jnp.ones_like(x)

    out = guided_eps(eps_fn, jnp.zeros((3, 4, 4, 1)), jnp.ones(3), jnp.zeros(3, int), 0.0)
    np.testing.assert_allclose(out, 1.0)  # the conditional prediction itself
    assert batches == [(3, True)]  # one call, conditional only


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_shape_and_range(sampler):
    s = linear_schedule(30)
    eps_fn = lambda x, t, task, keep: 0.5 * x  # a fixed, contracting predictor
    task = jnp.arange(5) % 2
    if sampler == "ddpm":
        x = ddpm_sample(eps_fn, s, jax.random.key(0), task, (8, 8, 1), guidance=2.0)
    else:  # under jit, as the experiments call it
        run = jax.jit(lambda s, k, d: ddim_sample(eps_fn, s, k, d, (8, 8, 1), steps=10))
        x = run(s, jax.random.key(0), task)
    assert x.shape == (5, 8, 8, 1)
    assert np.all(np.isfinite(np.asarray(x))) and float(jnp.abs(x).max()) < 50


def test_ddim_eta0_is_deterministic_given_start():
    s = linear_schedule(40)
    eps_fn = lambda x, t, task, keep: 0.3 * x + 0.1 * task[:, None, None, None]
    task = jnp.array([0, 1, 2])
    x_t = jax.random.normal(jax.random.key(7), (3, 6, 6, 1))
    a = ddim_sample(eps_fn, s, jax.random.key(0), task, (6, 6, 1), steps=8, eta=0.0, x_init=x_t)
    b = ddim_sample(eps_fn, s, jax.random.key(1), task, (6, 6, 1), steps=8, eta=0.0, x_init=x_t)
    np.testing.assert_array_equal(a, b)
    c = ddim_sample(eps_fn, s, jax.random.key(1), task, (6, 6, 1), steps=8, eta=1.0, x_init=x_t)
    assert not np.allclose(a, c)


def test_ddim_timesteps():
    ts = ddim_timesteps(400, 50)
    assert ts[0] == 400 and ts[-1] == 1 and len(ts) == 50
    assert np.all(np.diff(np.asarray(ts)) < 0)
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


@pytest.mark.slow  # ~20 s of compiles for an option (eval_average_draws); `make test-all`
def test_generate_averages_noise_over_draws():
    from vcl_jax.diffusion.generate import generate
    from vcl_jax.models.unet import ContextUNet

    model = ContextUNet(n_feat=8, n_tasks=2, embed_dim=4)
    args = (jnp.zeros((2, 28, 28, 1)), jnp.ones(2), jnp.zeros(2, int), jnp.ones(2, bool))
    p1, p2 = (model.init(jax.random.key(i), *args)["params"] for i in (1, 2))
    stack = lambda *ps: jax.tree.map(lambda *a: jnp.stack(a), *ps)
    s, key, tasks = linear_schedule(10), jax.random.key(3), np.array([0, 1, 1])
    one = generate(model, stack(p1), s, key, tasks, (28, 28, 1))
    same = generate(model, stack(p1, p1), s, key, tasks, (28, 28, 1), average=True)
    np.testing.assert_allclose(same, one, atol=1e-5)  # averaging identical draws changes nothing
    mixed = generate(model, stack(p1, p2), s, key, tasks, (28, 28, 1), average=True)
    spread = generate(model, stack(p1, p2), s, key, tasks, (28, 28, 1))
    assert mixed.shape == (3, 28, 28, 1)
    assert not np.allclose(mixed, one, atol=1e-3) and not np.allclose(mixed, spread, atol=1e-3)


def test_call_batches():
    from vcl_jax.diffusion.generate import call_batches

    assert call_batches(0) == [] and call_batches(0, 64) == []
    assert call_batches(50) == [50] and call_batches(50, 64) == [50]
    assert call_batches(130, 64) == [64, 64, 2] and call_batches(128, 64) == [64, 64]


class _Toy:
    """A stand-in noise predictor with the U-Net's call (params, x, t, task, keep): cheap to
    compile, its output depends on every input."""

    @staticmethod
    def apply(variables, x, t, task, keep):
        w = variables["params"]["w"]
        shift = jnp.where(keep, task.astype(x.dtype), -1.0)[:, None, None, None]
        return w * jnp.tanh(x) + 0.1 * t[:, None, None, None] + 0.05 * shift


def test_generate_batches_keep_each_images_noise():
    from vcl_jax.diffusion.generate import generate

    s, key = linear_schedule(10), jax.random.key(3)
    draws = {"w": jnp.asarray([0.3])}
    tasks = np.arange(20) % 3
    kw = dict(sampler="ddim", ddim_steps=5, eta=1.0)
    whole = generate(_Toy, draws, s, key, tasks, (4, 4, 1), **kw)
    # An image's noise does not depend on how many are sampled with it: the first three agree.
    first = generate(_Toy, draws, s, key, tasks[:3], (4, 4, 1), **kw)
    np.testing.assert_allclose(first, whole[:3], atol=1e-6)
    # Calls of at most 8: the first call's images as before, the later calls' new noise.
    chunked = generate(_Toy, draws, s, key, tasks, (4, 4, 1), max_batch=8, **kw)
    np.testing.assert_allclose(chunked[:8], whole[:8], atol=1e-6)
    assert np.all(np.isfinite(chunked)) and not np.allclose(chunked[8:], whole[8:], atol=1e-3)
    assert chunked.shape == whole.shape == (20, 4, 4, 1)
    # Two draws spread round-robin: draw 0 samples the even images as it would alone.
    two = {"w": jnp.asarray([0.3, -0.2])}
    spread = generate(_Toy, two, s, key, tasks, (4, 4, 1), max_batch=4, **kw)
    alone = generate(_Toy, draws, s, key, tasks[0::2], (4, 4, 1), max_batch=4, **kw)
    np.testing.assert_allclose(spread[0::2], alone, atol=1e-6)
    assert not np.allclose(spread[1::2], whole[1::2], atol=1e-3)
    with pytest.raises(ValueError, match="max_batch"):
        generate(_Toy, draws, s, key, tasks, (4, 4, 1), max_batch=0, **kw)


# --- the samplers against the reverse process of Gaussian data, known in closed form ---
#
# With x_0 ~ N(μ_d, s²) per pixel for task d, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε gives
# E[ε | x_t] = k_t (x_t − √ᾱ_t μ_d) with k_t = √(1−ᾱ_t) / (ᾱ_t s² + 1 − ᾱ_t): the exact noise
# predictor is linear in x_t, so every sampler step is x' = A x + B + σ z and the chain's
# mean and variance follow from m' = A m + B, v' = A² v + σ², computed here in float64
# from the DDPM and DDIM papers' update rules.

_MU, _S2, _T = np.array([-0.5, 0.8]), 0.09, 400


def _exact_eps(sched, mu, s2):
    """E[ε | x_t] of Gaussian data (per-task means ``mu``), as the sampler calls it."""
    mu = jnp.asarray(mu, jnp.float32)

    def eps_fn(x, t, task, keep):
        del keep
        ab = sched.alpha_bar[jnp.round(t * sched.T).astype(jnp.int32) - 1][:, None, None, None]
        k = jnp.sqrt(1 - ab) / (ab * s2 + 1 - ab)
        return k * (x - jnp.sqrt(ab) * mu[task][:, None, None, None])

    return eps_fn


def _linear_eps(ab, mu, s2):
    """(k, c) of ε = k x + c at ᾱ = ``ab`` (float64)."""
    k = np.sqrt(1 - ab) / (ab * s2 + 1 - ab)
    return k, -k * np.sqrt(ab) * mu


def _start(sched, task, shape, key):
    """x_T from the forward marginal N(√ᾱ_T μ_d, ᾱ_T s² + 1 − ᾱ_T), and its moments."""
    ab = float(sched.alpha_bar[-1])
    m, v = np.sqrt(ab) * _MU, ab * _S2 + 1 - ab
    z = jax.random.normal(key, (len(task), *shape))
    return jnp.asarray(m, jnp.float32)[task][:, None, None, None] + np.sqrt(v) * z, m, v


def _ddpm_moments(sched, m, v, guidance=0.0, mu_uncond=None):
    beta = np.asarray(sched.beta, np.float64)
    ab = np.cumprod(1 - beta)
    for t in range(sched.T, 0, -1):
        i = t - 1
        k, c = _linear_eps(ab[i], _MU, _S2)
        if guidance:
            ku, cu = _linear_eps(ab[i], mu_uncond, _S2)
            k, c = (1 + guidance) * k - guidance * ku, (1 + guidance) * c - guidance * cu
        # μ_θ = (x − β/√(1−ᾱ) ε) / √(1−β), σ² = β (none at t = 1)
        a = (1 - beta[i] / np.sqrt(1 - ab[i]) * k) / np.sqrt(1 - beta[i])
        b = -beta[i] / np.sqrt(1 - ab[i]) * c / np.sqrt(1 - beta[i])
        m, v = a * m + b, a * a * v + (beta[i] if t > 1 else 0.0)
    return m, v


def _ddim_moments(sched, m, v, steps, eta):
    ab = np.cumprod(1 - np.asarray(sched.beta, np.float64))
    ts = np.asarray(ddim_timesteps(sched.T, steps))
    for j, t in enumerate(ts):
        a_t = ab[t - 1]
        a_p = ab[ts[j + 1] - 1] if j + 1 < len(ts) else 1.0
        k, c = _linear_eps(a_t, _MU, _S2)
        # DDIM eq. 12: x' = √ᾱ' x̂_0 + √(1−ᾱ'−σ²) ε + σ z, x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ
        sigma2 = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        d = np.sqrt(1 - a_p - sigma2)
        a = np.sqrt(a_p / a_t) * (1 - np.sqrt(1 - a_t) * k) + d * k
        b = -np.sqrt(a_p / a_t) * np.sqrt(1 - a_t) * c + d * c
        m, v = a * m + b, a * a * v + sigma2
    return m, v


def _per_task_moments(x, task):
    x = np.asarray(x, np.float64)
    return (np.array([x[task == d].mean() for d in (0, 1)]),
            np.array([x[task == d].var() for d in (0, 1)]))


_TASK = np.repeat([0, 1], 2048)  # 2,048 images of 8×8 per task: 131,072 values each


def test_ddpm_samples_gaussian_data_with_its_mean_and_variance():
    sched = linear_schedule(_T)
    task = jnp.asarray(_TASK)
    x_t, m, v = _start(sched, task, (8, 8, 1), jax.random.key(0))
    run = jax.jit(lambda k, x: ddpm_sample(_exact_eps(sched, _MU, _S2), sched, k, task,
                                           (8, 8, 1), guidance=0.0, x_init=x))
    mean, var = _per_task_moments(run(jax.random.key(1), x_t), _TASK)
    m_chain, v_chain = _ddpm_moments(sched, m, v)
    # the chain's moments (σ² = β_t would give 0.963·s² with β̃_t instead): within ~5 SE
    np.testing.assert_allclose(mean, m_chain, atol=0.005)
    np.testing.assert_allclose(var, v_chain, rtol=0.02)
    # and 400 steps of it bring back the data's: μ_d exactly, s² within 1.1%
    np.testing.assert_allclose(m_chain, _MU, atol=1e-9)
    np.testing.assert_allclose(v_chain, _S2, rtol=0.011)
    np.testing.assert_allclose(var, _S2, rtol=0.03)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_gaussian_data_with_its_chains_moments(eta):
    sched = linear_schedule(_T)
    task = jnp.asarray(_TASK)
    x_t, m, v = _start(sched, task, (8, 8, 1), jax.random.key(0))
    run = jax.jit(lambda k, x: ddim_sample(_exact_eps(sched, _MU, _S2), sched, k, task,
                                           (8, 8, 1), steps=100, eta=eta, guidance=0.0,
                                           x_init=x))
    mean, var = _per_task_moments(run(jax.random.key(1), x_t), _TASK)
    m_chain, v_chain = _ddim_moments(sched, m, v, 100, eta)
    np.testing.assert_allclose(mean, _MU, atol=0.005)
    np.testing.assert_allclose(m_chain, _MU, atol=1e-9)
    # DDIM-100's discrete chain shrinks the variance (0.95·s² at η = 0, 0.88·s² at η = 1):
    # the samples must show the chain's value, not the data's
    np.testing.assert_allclose(var, v_chain, rtol=0.02)
    assert abs(float(v_chain) / _S2 - 1) > 0.04


def test_ddpm_guidance_follows_the_combined_prediction():
    # guided ε̂ = (1+α) ε(x, d) − α ε(x, ∅) (the paper's eq. 4); with the unconditional
    # prediction that of data at mean μ_∅, ε̂ is linear too and the chain's mean is known
    sched = linear_schedule(_T)
    task = jnp.asarray(_TASK)
    mu_u, alpha = np.array([0.1, 0.1]), 2.0
    cond, uncond = _exact_eps(sched, _MU, _S2), _exact_eps(sched, mu_u, _S2)

    def eps_fn(x, t, task, keep):
        return jnp.where(keep[:, None, None, None], cond(x, t, task, keep),
                         uncond(x, t, task, keep))

    x_t, m, v = _start(sched, task, (8, 8, 1), jax.random.key(0))
    run = jax.jit(lambda k, x: ddpm_sample(eps_fn, sched, k, task, (8, 8, 1),
                                           guidance=alpha, x_init=x))
    mean, var = _per_task_moments(run(jax.random.key(1), x_t), _TASK)
    m_chain, v_chain = _ddpm_moments(sched, m, v, alpha, mu_u)
    np.testing.assert_allclose(mean, m_chain, atol=0.005)
    np.testing.assert_allclose(var, v_chain, rtol=0.02)
    assert np.all(np.abs(m_chain - _MU) > 0.1)  # guidance moved the means away from μ_d


class _Recorder:
    """A noise predictor ε = w·x that reports each weight it is called with."""

    seen: list = []

    @staticmethod
    def apply(variables, x, t, task, keep):
        w = variables["params"]["w"]
        jax.debug.callback(lambda w: _Recorder.seen.append(float(w)), w)
        return w * x


def test_generate_draws_fresh_weights_at_every_step():
    from vcl_jax.diffusion.generate import fresh_draws, generate

    def sample(source, key, n):  # n weight draws around the source's mean
        return {"w": source["w"] + 0.1 * jax.random.normal(key, (n,))}

    s, key, tasks = linear_schedule(10), jax.random.key(3), np.array([0, 1, 1])
    kw = dict(sampler="ddim", ddim_steps=5, eta=0.0, average=True)
    source, k_w = {"w": jnp.asarray(0.3)}, jax.random.key(4)
    _Recorder.seen = []
    fresh = generate(_Recorder, (source, k_w), s, key, tasks, (4, 4, 1),
                     redraw=fresh_draws(sample, 2), **kw)
    fresh_seen = list(_Recorder.seen)
    assert len(fresh_seen) == 5 * 2 and len(set(fresh_seen)) == 10  # 2 new draws per step
    _Recorder.seen = []
    once = generate(_Recorder, sample(source, k_w, 2), s, key, tasks, (4, 4, 1), **kw)
    assert len(_Recorder.seen) == 10 and len(set(_Recorder.seen)) == 2  # the same 2 each step
    assert not np.allclose(fresh, once, atol=1e-4)
    again = generate(_Recorder, (source, k_w), s, key, tasks, (4, 4, 1),
                     redraw=fresh_draws(sample, 2), **kw)
    np.testing.assert_array_equal(again, fresh)  # reproducible from its keys
    with pytest.raises(ValueError, match="average"):
        generate(_Recorder, (source, k_w), s, key, tasks, (4, 4, 1),
                 redraw=fresh_draws(sample, 2), sampler="ddim", ddim_steps=5)
