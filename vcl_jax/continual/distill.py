"""Distillation from a frozen teacher: the model at the end of the previous task.

The method's state is the teacher's params, frozen at every ``end_task``. Its loss is a
``loss_with_teacher(params, teacher, batch, key) -> (loss, metrics)`` supplied by the
protocol, which decides what the teacher is asked about (for diffusion models: the
ε-predictions on noised replay images, :mod:`vcl_jax.protocols.rank1_ewc`), so the
student's and the teacher's forward passes can share their inputs in one step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vcl_jax.continual.base import Method, keep_begin, point_draws

PyTree = Any
LossWithTeacher = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]


def distillation(loss_with_teacher: LossWithTeacher) -> Method:
    """Builds the method; before the first ``end_task`` the teacher is the initial params
    (unused: the first task has nothing to distil)."""

    def init(params):
        return params, jax.tree.map(jnp.copy, params)

    def loss(params, teacher, batch, key):
        return loss_with_teacher(params, jax.lax.stop_gradient(teacher), batch, key)

    def end_task(params, teacher, task, data=None):
        del teacher, task, data
        return jax.tree.map(jnp.copy, params)

    return Method("distill", init, keep_begin, loss, end_task, point_draws)
