"""Monte-Carlo estimators of the expected log-likelihood of a mean-field MLP.

Three unbiased estimators of E_q[mean NLL of a batch] for the multi-head MLP
of ``vcl_jax.models.mlp``; they differ in cost and variance:

* ``paper``: K weight draws, each used for the whole batch (Nguyen et al.'s
  code; the batch is evaluated K times).
* ``local``: local reparameterisation (Kingma et al. 2015): each dense layer's
  pre-activations are sampled from their exact Gaussian given the layer's
  input, with independent noise per example. The first layer's input is the
  same for all K samples, so its mean and variance are computed once; per-example
  noise gives a lower-variance gradient than shared weight draws.
* ``grouped``: K weight draws, each used for one K-th of the batch (one pass
  over the batch in total).

Per example every estimator has the same distribution of outputs, so each is an
unbiased estimate of the same objective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vcl_jax.models import mlp
from vcl_jax.vi import mean_field as mf

PyTree = Any
ESTIMATORS = ("paper", "local", "grouped")


def _n_heads(q: mf.MeanField) -> int:
    return q.mean["heads"]["w"].shape[0]


def _layers(q: mf.MeanField) -> list[mf.MeanField]:
    return [mf.MeanField(m, lv) for m, lv in
            zip(mlp.layers_of(q.mean), mlp.layers_of(q.log_var), strict=True)]


def dense_local(layer: mf.MeanField, x: jax.Array, key: jax.Array,
                n_samples: int | None = None) -> jax.Array:
    """One dense layer's pre-activations sampled by local reparameterisation.

    Args:
      layer: posterior of ``{"w": [D_in, D_out], "b": [D_out]}``.
      x: ``[..., D_in]`` inputs.
      key: PRNG key for the noise.
      n_samples: when given, ``n_samples`` draws for the same ``x``: output
        ``[n_samples, ..., D_out]`` (the mean and variance are computed once).

    Returns:
      ``[..., D_out]`` (or ``[n_samples, ..., D_out]``) samples of ``x @ w + b``.
    """
    mean = mlp.dense(layer.mean, x)
    var = (x * x) @ jnp.exp(layer.log_var["w"]) + jnp.exp(layer.log_var["b"])
    shape = mean.shape if n_samples is None else (n_samples, *mean.shape)
    return mean + jnp.sqrt(var) * mf.standard_normal(key, shape, mean.dtype)


def sample_outputs_local(q: mf.MeanField, x: jax.Array, key: jax.Array,
                         n_samples: int) -> jax.Array:
    """``[K, B, H·O]`` outputs of all heads, K local-reparameterisation samples per example."""
    layers = _layers(q)
    keys = jax.random.split(key, len(layers))
    h = x
    for i, (layer, k) in enumerate(zip(layers, keys, strict=True)):
        h = dense_local(layer, h, k, n_samples if i == 0 else None)
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def sample_outputs_weights(q: mf.MeanField, x: jax.Array, key: jax.Array,
                           n_samples: int) -> jax.Array:
    """``[K, B, H·O]`` outputs of all heads, K weight draws each shared by the batch."""

    draws = mf.sample_many(jax.random.split(key, n_samples), q)
    # x broadcast behind a barrier: otherwise XLA:CPU merges the K first-layer products into
    # one matmul against the draws' kernels concatenated, a transposed copy that cost as much
    # as the matmul (the predictive ran ~20% slower; the numbers are the same)
    xs = jax.lax.optimization_barrier(jnp.broadcast_to(x, (n_samples, *x.shape)))
    return jax.vmap(lambda w, xk: mlp.forward(mlp.layers_of(w), xk))(draws, xs)


def expected_nll(q: mf.MeanField, x: jax.Array, y: jax.Array, head: jax.Array | int,
                 key: jax.Array, *, estimator: str = "local", n_samples: int = 10,
                 weight: jax.Array | None = None) -> jax.Array:
    """Estimate of E_q[mean over the batch of −log p(y | x, w)].

    Args:
      q: the posterior over the MLP's params.
      x: ``[B, D]`` inputs.
      y: ``[B]`` labels within the head.
      head: head index, one for all or ``[B]``.
      key: PRNG key.
      estimator: ``paper``, ``local`` or ``grouped`` (module docstring).
      n_samples: K.
      weight: optional ``[B]`` example weights (0 marks padding); the mean is then
        weighted, ``Σ w·nll / Σ w``, so a batch padded to a fixed size gives the loss of its
        real examples.
    """
    n_heads = _n_heads(q)
    head = jnp.broadcast_to(jnp.asarray(head, jnp.int32), y.shape)
    weight = jnp.ones(y.shape, jnp.float32) if weight is None else weight
    if estimator == "paper":
        out = sample_outputs_weights(q, x, key, n_samples)
    elif estimator == "local":
        out = sample_outputs_local(q, x, key, n_samples)
    elif estimator == "grouped":
        return _grouped_nll(q, x, y, head, weight, key, n_samples)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
    per_example = jnp.mean(mlp.nll(mlp.select_head(out, head, n_heads), y), axis=0)
    return jnp.sum(per_example * weight) / jnp.sum(weight)


def _grouped_nll(q, x, y, head, weight, key, n_samples):
    b = x.shape[0]
    k = min(n_samples, b)
    g = -(-b // k)
    pad = g * k - b
    split = lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]).reshape(
        k, g, *a.shape[1:])

    def one(w, xg, yg, hg):
        out = mlp.forward(mlp.layers_of(w), xg)
        return mlp.nll(mlp.select_head(out, hg, _n_heads(q)), yg)

    draws = mf.sample_many(jax.random.split(key, k), q)
    losses = jax.vmap(one)(draws, split(x), split(y), split(head))
    return jnp.sum(losses * split(weight)) / jnp.sum(weight)


def predict_proba(q: mf.MeanField, x: jax.Array, head: jax.Array | int, key: jax.Array,
                  n_samples: int = 100, chunk: int = 10) -> jax.Array:
    """Predictive probabilities ``[B, O]``: softmax averaged over weight draws.

    Draws are processed ``chunk`` at a time so memory stays bounded; ``n_samples``
    is rounded up to a multiple of ``chunk``.
    """
    n_heads = _n_heads(q)
    chunk = max(1, min(chunk, n_samples))
    n_chunks = -(-n_samples // chunk)

    def probs(k):
        out = sample_outputs_weights(q, x, k, chunk)
        return jnp.sum(jax.nn.softmax(mlp.select_head(out, head, n_heads)), axis=0)

    total = jnp.sum(jax.lax.map(probs, jax.random.split(key, n_chunks)), axis=0)
    return total / (n_chunks * chunk)


def reset_head(q: mf.MeanField, head: int, mean: PyTree, log_var: float) -> mf.MeanField:
    """``q`` with head ``head`` set to mean ``mean`` (``{"w": [D, O], "b": [O]}``) and a
    constant log-variance."""

    def put(tree, w, b):
        heads = {"w": tree["heads"]["w"].at[head].set(w), "b": tree["heads"]["b"].at[head].set(b)}
        return dict(tree, heads=heads)

    w_shape = q.mean["heads"]["w"].shape[1:]
    b_shape = q.mean["heads"]["b"].shape[1:]
    return mf.MeanField(put(q.mean, mean["w"], mean["b"]),
                        put(q.log_var, jnp.full(w_shape, log_var), jnp.full(b_shape, log_var)))
