"""Empirical Fisher information from per-example gradients, without a P×P matrix.

With ``g_n = ∇ example_loss(θ, x_n)`` for N examples and ``F = E[g gᵀ]``:

* diagonal: ``F_ii = E[g_i²]``;
* rank-1: ``F ≈ c μμᵀ`` with ``μ = E[g]`` and ``c = E[(μᵀg)²] / ‖μ‖⁴``, the scale that
  minimises ``‖F − c μμᵀ‖_F`` (``c = 1`` is the plain variant);
* spectrum and approximation errors: from the N×N Gram matrix ``K = G Gᵀ`` (rows of
  ``G`` are the flattened ``g_n``): the non-zero eigenvalues of F are those of ``K/N``,
  ``‖F‖²_F = ‖K‖²_F / N²``, ``μᵀg_n = (K1)_n / N`` and ``‖μ‖² = 1ᵀK1 / N²``.

Everything streams over chunks of examples, so memory is bounded by one chunk of
per-example gradients (two for the Gram matrix), whatever N is. Each compiled function
is jitted once per ``example_loss`` and chunk shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
ExampleLoss = Callable[[PyTree, PyTree], jax.Array]  # (params, one example) -> scalar


class FisherStats(NamedTuple):
    """Moments of the per-example gradients.

    Attributes:
      mean: μ = E[g], shaped like the params.
      diag: E[g²] (the diagonal Fisher), shaped like the params.
      proj_sq: E[(μᵀg)²], a scalar (NaN when not computed).
      n: number of examples.
    """

    mean: PyTree
    diag: PyTree
    proj_sq: jax.Array
    n: int

    def mean_sq_norm(self) -> jax.Array:
        """‖μ‖²."""
        return tree_dot(self.mean, self.mean)

    def rank1_scale(self, unit: bool = False) -> jax.Array:
        """c = E[(μᵀg)²] / ‖μ‖⁴ (or 1 when ``unit``)."""
        if unit:
            return jnp.ones((), jnp.float32)
        return self.proj_sq / jnp.maximum(self.mean_sq_norm() ** 2, 1e-30)


@jax.jit
def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ over all leaves of ⟨a, b⟩."""
    return sum(jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(x * y), a, b)),
               jnp.zeros((), jnp.float32))


@jax.jit
def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


@jax.jit
def _tree_div(a: PyTree, n: int | jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x / n, a)


def n_examples(data: PyTree) -> int:
    return int(jax.tree.leaves(data)[0].shape[0])


def chunks(data: PyTree, chunk: int) -> Iterator[tuple[PyTree, jax.Array]]:
    """``(rows, weights)`` per chunk; the last chunk is padded by repeating row 0 with
    weight 0, so every call has the same shape (one compilation)."""
    n = n_examples(data)
    if n < 1:
        raise ValueError("per-example gradients need at least one example")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    chunk = min(chunk, n)
    for start in range(0, n, chunk):
        idx = np.arange(start, start + chunk)
        weights = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)
        yield jax.tree.map(lambda a, idx=idx: a[idx], data), jnp.asarray(weights)


def _grads(example_loss: ExampleLoss, params: PyTree, data: PyTree) -> PyTree:
    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, data)


@functools.partial(jax.jit, static_argnums=0)
def _moments(example_loss, params, data, w):
    g = _grads(example_loss, params, data)
    wsum = lambda x: jnp.tensordot(w, x, axes=1)
    return jax.tree.map(wsum, g), jax.tree.map(lambda x: wsum(x * x), g)


@functools.partial(jax.jit, static_argnums=0)
def _proj_sq(example_loss, params, data, w, mu):
    g = _grads(example_loss, params, data)
    per = sum(jax.tree.leaves(jax.tree.map(
        lambda x, m: jnp.sum((x * m[None]).reshape(x.shape[0], -1), axis=1), g, mu)))
    return jnp.sum(w * per ** 2)


def per_example_grads(example_loss: ExampleLoss, params: PyTree, data: PyTree,
                      chunk: int = 256) -> PyTree:
    """``∇ example_loss`` for every example, stacked ``[N, ...params]`` (small models and
    tests only: it holds N copies of the params)."""
    grad = jax.jit(lambda p, d: _grads(example_loss, p, d))
    n = n_examples(data)
    outs = [grad(params, rows) for rows, _ in chunks(data, chunk)]
    return jax.tree.map(lambda *gs: jnp.concatenate(gs)[:n], *outs)


def fisher_stats(example_loss: ExampleLoss, params: PyTree, data: PyTree, *, chunk: int = 256,
                 rank1: bool = True) -> FisherStats:
    """μ, diag F and (when ``rank1``) E[(μᵀg)²] over the examples of ``data``.

    Two passes over the data when ``rank1`` (μ must be known before the projections),
    one otherwise. ``example_loss`` must be deterministic given the example (put the
    timestep and noise of a diffusion loss into the example).
    """
    n = n_examples(data)
    total_g = total_g2 = None
    for rows, w in chunks(data, chunk):
        g, g2 = _moments(example_loss, params, rows, w)
        total_g = g if total_g is None else _tree_add(total_g, g)
        total_g2 = g2 if total_g2 is None else _tree_add(total_g2, g2)
    mean, diag = _tree_div(total_g, n), _tree_div(total_g2, n)
    proj = jnp.full((), jnp.nan, jnp.float32)
    if rank1:
        proj = sum(_proj_sq(example_loss, params, rows, w, mean)
                   for rows, w in chunks(data, chunk)) / n
    return FisherStats(mean, diag, proj, n)


def diag_fisher(example_loss: ExampleLoss, params: PyTree, data: PyTree,
                chunk: int = 256) -> PyTree:
    """Diagonal empirical Fisher ``E[g²]`` (one pass)."""
    return fisher_stats(example_loss, params, data, chunk=chunk, rank1=False).diag


# ---------------------------------------------------------------------------------------
# Gram-matrix analysis (the rank-1 paper's Figures 2 and 3)


@functools.partial(jax.jit, static_argnums=0)
def _flat_grads(example_loss, params, data, w):
    g = jax.vmap(lambda ex: ravel_pytree(jax.grad(example_loss)(params, ex))[0])(data)
    return g * w[:, None]


class GramResult(NamedTuple):
    """Attributes: gram ``[N, N]`` = G Gᵀ (float64); diag_sq_sum Σ_i F_ii²; mean μ (flat)."""

    gram: np.ndarray
    diag_sq_sum: float
    mean: np.ndarray


def gram_matrix(example_loss: ExampleLoss, params: PyTree, data: PyTree, *,
                chunk: int = 64) -> GramResult:
    """The Gram matrix of the per-example gradients, chunk pair by chunk pair (memory: two
    chunks of flattened gradients), plus Σ_i F_ii² and μ, which need P-sized sums only."""
    n = n_examples(data)
    parts = list(chunks(data, chunk))
    m = len(parts)
    size = min(chunk, n)
    gram = np.zeros((m * size, m * size))
    diag_sum = mean_sum = None
    for i, (rows_i, w_i) in enumerate(parts):
        gi = _flat_grads(example_loss, params, rows_i, w_i)
        sq = jnp.sum(gi * gi, axis=0)
        diag_sum = sq if diag_sum is None else diag_sum + sq
        mean_sum = gi.sum(0) if mean_sum is None else mean_sum + gi.sum(0)
        for j in range(i + 1):
            gj = gi if j == i else _flat_grads(example_loss, params, *parts[j])
            block = np.asarray(gi @ gj.T, np.float64)
            gram[i * size:(i + 1) * size, j * size:(j + 1) * size] = block
            gram[j * size:(j + 1) * size, i * size:(i + 1) * size] = block.T
    diag_f = np.asarray(diag_sum, np.float64) / n
    return GramResult(gram[:n, :n], float(np.sum(diag_f ** 2)),
                      np.asarray(mean_sum, np.float64) / n)


def gram_analysis(gram: np.ndarray, diag_sq_sum: float, *, top: int = 5) -> dict:
    """Spectrum and approximation errors of F = GᵀG / N from its Gram matrix.

    Returns a dict of floats/lists: ``eigenvalues`` (top ``top`` of F), ``ratio21``
    (λ₂/λ₁), ``cos`` (|cos(g_n, μ)| per example), ``mean_abs_cos``, ``c`` (Frobenius-
    optimal rank-1 scale), ``rel_err_diag``, ``rel_err_rank1`` (c μμᵀ), ``rel_err_rank1_unit``
    (μμᵀ), ``rel_err_best_rank1`` (λ₁ v₁v₁ᵀ, the best any rank-1 can do), ``mu_sq_norm``.
    Relative errors are ‖F − F̂‖_F / ‖F‖_F.
    """
    k = np.asarray(gram, np.float64)
    n = k.shape[0]
    eig = np.sort(np.linalg.eigvalsh(k / n))[::-1]
    eig = np.maximum(eig, 0.0)
    f_sq = float(np.sum(k * k)) / n**2
    s = k.sum(1) / n  # μᵀg_n
    mu_sq = float(k.sum()) / n**2
    e_proj = float(np.mean(s * s))
    c = e_proj / max(mu_sq**2, 1e-300)
    norms = np.sqrt(np.maximum(np.diag(k), 1e-300))
    cos = np.abs(s) / (norms * np.sqrt(max(mu_sq, 1e-300)))

    def rel(err_sq: float) -> float:
        return float(np.sqrt(max(err_sq, 0.0) / f_sq)) if f_sq > 0 else float("nan")

    return {
        "eigenvalues": eig[:top].tolist(),
        "ratio21": float(eig[1] / eig[0]) if n > 1 and eig[0] > 0 else float("nan"),
        "cos": cos.tolist(),
        "mean_abs_cos": float(np.mean(cos)),
        "c": c,
        "mu_sq_norm": mu_sq,
        "rel_err_diag": rel(f_sq - diag_sq_sum),
        "rel_err_rank1": rel(f_sq - 2 * c * e_proj + c**2 * mu_sq**2),
        "rel_err_rank1_unit": rel(f_sq - 2 * e_proj + mu_sq**2),
        "rel_err_best_rank1": rel(f_sq - eig[0] ** 2),
    }
