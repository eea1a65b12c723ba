"""Plain sequential maximum-likelihood training (naive fine-tuning)."""

from __future__ import annotations

from vcl_jax.continual.base import BatchLoss, Method, keep_begin, keep_end, point_draws


def mle(batch_loss: BatchLoss) -> Method:
    """Sequential MLE: the trainable variables are the params; no state."""

    def init(params):
        return params, ()

    def loss(params, state, batch, key):
        del state
        value = batch_loss(params, batch, key)
        return value, {"loss": value}

    return Method("mle", init, keep_begin, loss, keep_end, point_draws)
