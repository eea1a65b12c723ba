"""Divergence checks: stop a run at the first non-finite loss term or trainable value.

The checks run where the host already waits for the device (once per epoch, when its
metrics come back as floats), so they add one small reduction per epoch and no
per-step synchronisation. A run that stops here has not checkpointed the bad state:
its earlier tasks' checkpoints are untouched and a re-run resumes after the last
finished task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class DivergenceError(RuntimeError):
    """A loss term or a trainable value became NaN or infinite."""


@jax.jit
def _finite_per_leaf(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


ADVICE = ("Stopped before checkpointing this task; the checkpoints and metrics of earlier "
          "tasks are unchanged. Re-running the same command resumes after the last finished "
          "task (and stops here again unless a setting changes, e.g. a lower learning_rate).")


def check_finite(metrics: Mapping[str, Any], trainable: PyTree, where: str) -> None:
    """Raises :class:`DivergenceError` naming ``where`` and the first bad term or leaf.

    Args:
      metrics: loss terms of the last chunk of steps (floats or arrays).
      trainable: the trainable variables after it (for VCL the posterior, so its means
        and log-variances are both checked).
      where: experiment, method, task and epoch, for the message.
    """
    values = {name: np.asarray(v) for name, v in metrics.items()}
    bad = {name: v[~np.isfinite(v)].ravel()[0] for name, v in values.items()
           if not np.all(np.isfinite(v))}
    if bad:
        names = " and ".join(map(repr, bad))
        raise DivergenceError(f"{where}: the training {names} became "
                              f"{float(next(iter(bad.values())))}. " + ADVICE)
    ok = np.asarray(_finite_per_leaf(trainable))
    if ok.all():
        return
    flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    bad = [p for p, good in zip(paths, ok, strict=True) if not good]
    raise DivergenceError(f"{where}: non-finite values in the trainable variables "
                          f"{', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}. "
                          + ADVICE)


def first_bad_epoch(history: Mapping[str, Any]) -> int | None:
    """The first epoch (0-based) whose metrics ``{name: [epochs]}`` are not all finite."""
    rows = [np.asarray(v).reshape(len(np.asarray(v)), -1) for v in history.values()]
    if not rows:
        return None
    bad = ~np.all(np.isfinite(np.concatenate(rows, axis=1)), axis=1)
    return int(np.argmax(bad)) if bad.any() else None
