"""Variational continual learning (Nguyen et al. 2018) with mean-field Gaussians.

Objective for task d, minimised over q_d = (mean, log_var):

    E_{w~q_d}[ batch_loss(w) ] + kl_scale · KL(q_d ‖ q_{d−1}) / N_d

estimated with ``n_samples`` = K reparameterised weight draws per step (``vmap``
over keys). Two estimators of the expected loss, both unbiased for the same
objective:

* ``paper`` (the authors' code): every draw sees the whole batch, with its own
  diffusion noise — K passes over the batch, about K× the cost of an MLE step;
* ``grouped``: draw k sees only the k-th of K equal slices of the batch — one
  pass in total, about the cost of an MLE step, but each example sees one draw.

With K = 1 the two are the same computation. The per-example diffusion
loss is a per-pixel mean, so with ``kl_scale = 1`` the KL carries the same
relative weight as in the paper author's code (KL divided by the dataset size,
per-pixel-mean loss). After each task the posterior becomes the prior.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vcl_jax.continual.base import BatchLoss, Method, View
from vcl_jax.vi import mean_field as mf
from vcl_jax.vi.natural_gradient import natural_mean_field, with_curvature

PyTree = Any
ExpectedLoss = Callable[[mf.MeanField, PyTree, jax.Array], jax.Array]
ESTIMATORS = ("paper", "grouped")
DRAWS = ("vmap", "loop")  # how the K draws are laid out in the compiled step (same math)


class VCLState(NamedTuple):
    """Attributes: prior (the previous task's posterior), kl_weight (kl_scale / N_d)."""

    prior: mf.MeanField
    kl_weight: jax.Array


def split_batch(batch: PyTree, k: int) -> PyTree:
    """``[B, ...]`` leaves → ``[k, B/k, ...]``: k equal slices of a batch."""

    def split(a):
        if a.shape[0] % k:
            raise ValueError(f"the grouped VCL estimator needs a batch size divisible by the "
                             f"number of weight draws K={k}, got a batch of {a.shape[0]}")
        return a.reshape(k, a.shape[0] // k, *a.shape[1:])

    return jax.tree.map(split, batch)


def vcl(
    batch_loss: BatchLoss,
    *,
    mask: PyTree | None = None,
    n_samples: int = 10,
    estimator: str = "paper",
    draws: str = "vmap",
    kl_scale: float = 1.0,
    likelihood_scale: float = 1.0,
    prior_sigma: float = 1.0,
    log_var_init: float | Callable[[PyTree], PyTree] = -10.0,
    pretrained_prior: bool = False,
    weight_noise: bool = True,
    expected_loss: ExpectedLoss | None = None,
    prior_decay: float = 1.0,
) -> Method:
    """Builds the VCL method.

    Args:
      batch_loss: ``(params, batch, key) -> scalar`` mean loss of a batch.
      mask: pytree of bools, True for random (variational) leaves; the others
        (per-task embeddings, norm layers) stay deterministic and outside the KL.
      n_samples: weight draws per training step (K).
      estimator: ``paper`` (each draw over the whole batch) or ``grouped`` (each
        draw over one K-th of the batch; the batch size must be a multiple of K).
      draws: ``vmap`` (one batched computation over the K draws) or ``loop`` (K copies
        of the network in the compiled step, each with plain, unbatched weights: a
        longer compile, but no batched-kernel convolutions, which XLA:CPU runs slowly).
        The same estimate either way.
      kl_scale: multiplier of KL / N_d.
      likelihood_scale: how many likelihood terms one example's loss stands for, when
        ``batch_loss`` averages over several (the KL weight is ``kl_scale / (N_d ·
        likelihood_scale)``): 1 keeps the loss as it is (the diffusion authors' code
        averages the squared error over pixels), the number of pixels makes it the sum over
        pixels of the VCL paper's equations 2–3 (a KL 784× lighter per example on MNIST).
      prior_sigma: σ₀ of the first task's prior N(0, σ₀² I).
      log_var_init: initial log-variance of the posterior: one number for every leaf, or a
        function ``params -> log-variance pytree`` (e.g. a width relative to each layer's
        weights, :func:`relative_log_var`).
      pretrained_prior: the first task's prior is N(params, exp(log_var_init))
        around the params given to ``init`` (the authors' code: MLE pre-training on
        the first task gives the prior means) instead of N(0, prior_sigma² I).
      expected_loss: ``(q, batch, key) -> scalar``, an estimator of
        E_q[batch_loss] that replaces ``estimator``'s weight draws, e.g. local reparameterisation
        (``vcl_jax.models.bayes_mlp``). ``batch_loss`` is unused when given.
      weight_noise: False trains the likelihood at the posterior means (no draws) while the
        KL still acts: a diagnostic that separates the KL's pull from the weight noise (the
        log-variances then follow the KL alone, to the prior's).
      prior_decay: γ ∈ (0, 1], the next task's prior is the posterior with its precisions
        multiplied by γ (its means kept): 1 is VCL's exact recursion; below 1 the earlier
        tasks hold the weights less and a new task is learnt more freely, as online EWC's
        decay of the old penalty. (A KL weight does not do this once the precisions are
        learnt: scaling the KL scales the new task's and the old tasks' precisions alike.)
    """
    if n_samples < 1:
        raise ValueError(f"VCL needs n_samples ≥ 1, got {n_samples}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown VCL estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
    if draws not in DRAWS:
        raise ValueError(f"unknown VCL draws layout {draws!r}; accepted: {', '.join(DRAWS)}")
    if likelihood_scale <= 0:
        raise ValueError(f"VCL needs likelihood_scale > 0, got {likelihood_scale}")
    if not 0 < prior_decay <= 1:
        raise ValueError(f"VCL needs 0 < prior_decay ≤ 1, got {prior_decay}")

    def init_fn(params):
        if callable(log_var_init):
            q = mf.MeanField(params, log_var_init(params))
        else:
            q = mf.init_from_params(params, log_var_init)
        p = jax.tree.map(jnp.copy, q) if pretrained_prior else mf.prior(params, prior_sigma)
        return q, VCLState(p, jnp.zeros((), jnp.float32))

    def begin_task_fn(q, state, task, n_data):
        del task
        if n_data < 1:
            raise ValueError(f"a task needs data, got n_data={n_data}")
        weight = kl_scale / (n_data * likelihood_scale)
        return q, state._replace(kl_weight=jnp.asarray(weight, jnp.float32))

    def one_draw(q, k, batch):
        kw, kd = jax.random.split(k)
        return batch_loss(mf.sample(kw, q, mask), batch, kd)

    def weight_draws(q, batch, key):
        if not weight_noise:
            return batch_loss(q.mean, batch, key)
        keys = jax.random.split(key, n_samples)
        # paper: every draw gets the whole batch; grouped: draw k gets the k-th of K equal
        # slices (so the mean of the slice means is the batch mean)
        per_draw = None if estimator == "paper" else 0
        batches = batch if estimator == "paper" else split_batch(batch, n_samples)
        if draws == "vmap":  # the draws of one_draw, made together (a cheaper gradient)
            pairs = jax.vmap(jax.random.split)(keys)
            ws = mf.sample_many(pairs[:, 0], q, mask)
            losses = jax.vmap(batch_loss, (0, per_draw, 0))(ws, batches, pairs[:, 1])
        else:
            pick = (lambda i: batches) if per_draw is None else (
                lambda i: jax.tree.map(lambda a: a[i], batches))
            losses = jnp.stack([one_draw(q, keys[i], pick(i)) for i in range(n_samples)])
        return jnp.mean(losses)

    estimate = expected_loss or weight_draws

    def loss_fn(q, state, batch, key):
        nll = estimate(q, batch, key)
        kl = mf.kl(q, state.prior, mask)
        return nll + state.kl_weight * kl, {"loss": nll, "kl": kl}

    def end_task_fn(q, state, task, data=None):
        del task, data
        # precision × γ is log-variance − log γ
        prior = q._replace(log_var=jax.tree.map(lambda lv: lv - math.log(prior_decay), q.log_var))
        return state._replace(prior=jax.tree.map(jnp.copy, prior))

    # Inner functions are named *_fn: a closure looks names up when it runs, so a `def draws`
    # here would replace the `draws` argument inside `weight_draws`.
    @functools.partial(jax.jit, static_argnums=2)
    def draws_fn(q, key, n):
        return mf.sample_many(jax.random.split(key, n), q, mask)

    # Params-level methods chained with VCL (EWC, distillation) act on the posterior means.
    means = View(lambda q: q.mean, lambda q, params: q._replace(mean=params))
    return Method("vcl", init_fn, begin_task_fn, loss_fn, end_task_fn, draws_fn, means)


def vcl_ng(
    batch_loss: BatchLoss,
    *,
    mask: PyTree | None = None,
    hess_init: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    clip: float | None = None,
    deterministic_scale: float = 0.01,
    floor: bool = True,
    **vcl_kwargs,
) -> Method:
    """VCL trained by natural gradients (IVON's update, :mod:`vcl_jax.vi.natural_gradient`):
    the same objective and posterior as :func:`vcl`, but the posterior's precisions are
    learnt from the loss's curvature instead of by Adam on the log-variances.

    The method owns its update (:attr:`Method.optimizer`): λ, the effective sample size, is
    ``1 / kl_weight`` = N_d · likelihood_scale / kl_scale, so that the posterior is
    N(m, 1/(λ(h + δ))) with δ the prior's precision per datum; the prior is the previous
    task's posterior (per weight: its mean and precision P_{d−1}), so the precision after
    task d is λ_d·h_d + P_{d−1}. At each task's start the precision is reset to P_{d−1} + λ_d·h₀
    (IVON's initial Hessian h₀ = ``hess_init``). One weight draw per step is IVON's
    setting (``n_samples=1``).

    Args:
      batch_loss, mask, **vcl_kwargs: as :func:`vcl` (``kl_scale`` must be > 0).
      hess_init: h₀, the curvature per datum assumed at a task's start.
      b1, b2, clip, deterministic_scale: the update's (:func:`natural_mean_field`).
      floor: keep the curvature estimate ≥ 0, so that no weight's posterior is broader than
        its prior (:func:`natural_mean_field`'s ``prior_log_var``); False is IVON's plain
        update.
    """
    if vcl_kwargs.get("kl_scale", 1.0) <= 0:
        raise ValueError("natural-gradient VCL needs kl_scale > 0 (its λ is N/kl_scale), got "
                         f"{vcl_kwargs['kl_scale']}")
    if hess_init <= 0:
        raise ValueError(f"natural-gradient VCL needs hess_init > 0, got {hess_init}")
    base = vcl(batch_loss, mask=mask, **vcl_kwargs)

    def begin_task_fn(q, state, task, n_data):
        q, state = base.begin_task(q, state, task, n_data)
        return with_curvature(q, state.prior, 1.0 / state.kl_weight, hess_init, mask), state

    def optimizer_fn(learning_rate):
        tx = optax.inject_hyperparams(
            lambda learning_rate: natural_mean_field(
                learning_rate, b1=b1, b2=b2, clip=clip, mask=mask,
                deterministic_scale=deterministic_scale))(learning_rate=learning_rate)

        def update_fn(grads, opt_state, q=None, *, method_state, **extra):
            del extra
            return tx.update(grads, opt_state, q, ess=1.0 / method_state.kl_weight,
                             prior_log_var=method_state.prior.log_var if floor else None)

        return optax.GradientTransformationExtraArgs(tx.init, update_fn)

    return base._replace(name="vcl_ng", begin_task=begin_task_fn, optimizer=optimizer_fn)
