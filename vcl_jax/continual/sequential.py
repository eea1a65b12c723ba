"""Plain sequential maximum-likelihood training (naive fine-tuning)."""

from __future__ import annotations

from vcl_jax.continual.base import BatchLoss, Method, stack


def mle(batch_loss: BatchLoss) -> Method:
    """Sequential MLE: the trainable variables are the params; no state."""

    def init(params):
        return params, ()

    def begin_task(params, state, task, n_data):
        del task, n_data
        return params, state

    def loss(params, state, batch, key):
        del state
        value = batch_loss(params, batch, key)
        return value, {"loss": value}

    def end_task(params, state, task, data=None):
        del params, task, data
        return state

    def draws(params, key, n):
        del key
        return stack(params, 1 if n else 0)

    return Method("mle", init, begin_task, loss, end_task, draws)
