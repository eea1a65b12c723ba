"""A multi-head MLP (shared ReLU hidden layers, one linear head per task), as pure functions.

The discriminative VCL experiment (Nguyen et al. 2018) needs the network layer by
layer: the local-reparameterisation estimator replaces each dense layer's
computation, not its weights. So the forward pass is written once over a list
of layers and a pluggable ``dense`` function; a deterministic network, a
weight draw and a mean-field posterior all go through it.

Params: ``{"hidden": [{"w": [D_in, D_out], "b": [D_out]}, ...],
"heads": {"w": [H, D, O], "b": [H, O]}}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Dense = Callable[[Any, jax.Array], jax.Array]


def truncated_normal(key: jax.Array, shape: Sequence[int], std: float = 0.1) -> jax.Array:
    """N(0, std²) truncated at ±2 std (TensorFlow's ``truncated_normal``, the original init)."""
    return std * jax.random.truncated_normal(key, -2.0, 2.0, tuple(shape), jnp.float32)


def init_mlp(key: jax.Array, in_dim: int, hidden: Sequence[int], n_heads: int,
             out_dim: int, std: float = 0.1) -> PyTree:
    """Params of a multi-head MLP, weights and biases ~ truncated N(0, std²).

    Args:
      key: PRNG key.
      in_dim: input features D.
      hidden: widths of the shared hidden layers.
      n_heads: number of task heads H.
      out_dim: outputs per head O.
      std: init scale.
    """
    dims = [in_dim, *hidden]
    keys = jax.random.split(key, 2 * len(hidden) + 2)
    layers = [{"w": truncated_normal(keys[2 * i], (dims[i], dims[i + 1]), std),
               "b": truncated_normal(keys[2 * i + 1], (dims[i + 1],), std)}
              for i in range(len(hidden))]
    heads = {"w": truncated_normal(keys[-2], (n_heads, dims[-1], out_dim), std),
             "b": truncated_normal(keys[-1], (n_heads, out_dim), std)}
    return {"hidden": layers, "heads": heads}


def layers_of(params: PyTree) -> list[dict]:
    """The hidden layers, then all heads as one dense layer ``[D, H·O]``.

    Computing every head costs ``H·O`` extra outputs (10 for split MNIST) and
    lets one batch mix examples of different tasks.
    """
    w, b = params["heads"]["w"], params["heads"]["b"]
    n_heads, d, o = w.shape
    heads = {"w": jnp.transpose(w, (1, 0, 2)).reshape(d, n_heads * o),
             "b": b.reshape(n_heads * o)}
    return [*params["hidden"], heads]


def dense(layer: dict, x: jax.Array) -> jax.Array:
    """``x @ w + b`` for ``x: [..., D_in]``."""
    return x @ layer["w"] + layer["b"]


def forward(layers: Sequence[Any], x: jax.Array, dense_fn: Dense = dense) -> jax.Array:
    """Outputs of the last layer: ReLU between layers, none after the last.

    Args:
      layers: per layer, whatever ``dense_fn`` takes (params, a weight draw, a posterior).
      x: ``[..., D]`` inputs.
      dense_fn: computes one dense layer.

    Returns:
      ``[..., D_out]`` outputs of the last layer.
    """
    h = x
    for i, layer in enumerate(layers):
        h = dense_fn(layer, h)
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def select_head(out: jax.Array, head: int | jax.Array, n_heads: int) -> jax.Array:
    """Logits ``[..., B, O]`` of each example's head from all heads' outputs ``[..., B, H·O]``.

    Args:
      out: the last layer's outputs.
      head: one head for all examples, or ``[B]`` one per example.
      n_heads: H.
    """
    out = out.reshape(*out.shape[:-1], n_heads, -1)  # [..., B, H, O]
    head = jnp.broadcast_to(jnp.asarray(head, jnp.int32), out.shape[-3:-2])
    idx = jnp.broadcast_to(head[:, None, None], (*out.shape[:-2], 1, out.shape[-1]))
    return jnp.take_along_axis(out, idx, axis=-2)[..., 0, :]


def apply(params: PyTree, x: jax.Array, head: int | jax.Array) -> jax.Array:
    """Logits ``[B, O]`` for inputs ``x: [B, D]`` through ``head`` (int or ``[B]``)."""
    return select_head(forward(layers_of(params), x), head, params["heads"]["w"].shape[0])


def nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example negative log-likelihood ``[...]`` of integer labels (broadcast to ``logits``)."""
    logp = jax.nn.log_softmax(logits)
    labels = jnp.broadcast_to(labels, logp.shape[:-1])
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def diag_fisher(params: PyTree, x: jax.Array, y: jax.Array, head: jax.Array) -> PyTree:
    """Diagonal empirical Fisher ``E_n[g_n²]`` of the per-example NLL, in closed form.

    A dense layer's per-example gradient is the outer product ``a_n δ_nᵀ`` of its input
    and the NLL's gradient at its outputs, so ``Σ_n g_n²`` is the matmul ``(a²)ᵀ δ²`` and
    the bias's is ``Σ_n δ_n²``: the same numbers as squaring vmapped per-example gradients,
    without holding N copies of the params. (Unselected heads get δ = 0, as they should.)
    """
    layers = layers_of(params)
    n_heads = params["heads"]["w"].shape[0]

    def total_nll(shifts):
        h, inputs = x, []
        for i, (layer, s) in enumerate(zip(layers, shifts, strict=True)):
            inputs.append(h)
            h = dense(layer, h) + s
            if i < len(layers) - 1:
                h = jax.nn.relu(h)
        return jnp.sum(nll(select_head(h, head, n_heads), y)), inputs

    shifts = [jnp.zeros((x.shape[0], layer["b"].shape[0]), x.dtype) for layer in layers]
    deltas, inputs = jax.grad(total_nll, has_aux=True)(shifts)
    n = x.shape[0]
    out = [{"w": (a * a).T @ (d * d) / n, "b": jnp.sum(d * d, axis=0) / n}
           for a, d in zip(inputs, deltas, strict=True)]
    d_in, o = params["heads"]["w"].shape[1:]
    heads = {"w": jnp.transpose(out[-1]["w"].reshape(d_in, n_heads, o), (1, 0, 2)),
             "b": out[-1]["b"].reshape(n_heads, o)}
    return {"hidden": out[:-1], "heads": heads}
