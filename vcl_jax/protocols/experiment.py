"""What the three experiments' runs share: a sub-run's identity (the config sections its
method uses), the check of a run directory's checkpoints before anything is written, the
frame of a run (its lock and config, then its metrics and report), and reading a finished
run back (its config, a task's checkpoint)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from vcl_jax import checkpoint, distributed, runlog
from vcl_jax.config import ConfigError, flatten, from_dict, to_dict
from vcl_jax.continual.methods import Spec
from vcl_jax.run_lock import RunLock

C = TypeVar("C")


def identity(cfg, name: str, spec: Spec, **sweep) -> dict:
    """What determines one sub-run, the key of its checkpoints: the config's sections that
    its method uses (a member's own section only when the method has that member) as
    ``section.field`` keys, the method's name, and the sweep's values that pick the sub-run
    (``sweep``, e.g. its coreset size). Where the data was read from is not part of it (its
    checksum is: :class:`~vcl_jax.checkpoint.Checkpoints`' ``data``)."""
    own = {"vcl": spec.variational, "vcl_ng": spec.trainer == "vcl_ng",
           "ewc": spec.penalty is not None, "replay": spec.replay is not None,
           "coreset": spec.coreset is not None}
    raw = to_dict(cfg)
    unused = {k for k, v in raw.items() if not isinstance(v, dict)}  # the sweep
    unused |= {section for section, used in own.items() if not used}
    flat = flatten({k: v for k, v in raw.items() if k not in unused})
    flat.pop("data.data_dir", None)
    return {**flat, "method": name, **sweep}


def check_checkpoints(run_dir: str, opens: dict[str, Callable[[str], checkpoint.Checkpoints]]
                      ) -> None:
    """Refuses, before anything is written, a run directory whose checkpoints were written
    with settings or data that matter to them: ``opens`` maps each sub-run's folder to the
    opener of its checkpoints (which raises, naming the difference, on a mismatch)."""
    for sub, open_ in opens.items():
        folder = os.path.join(run_dir, sub, "checkpoints")
        if os.path.isdir(folder):
            open_(folder).close()


@contextlib.contextmanager
def locked(run_dir: str, cfg) -> Iterator[None]:
    """Holds the run directory's lock; process 0 first writes the run's ``config.json``."""
    with RunLock(run_dir):
        if distributed.is_primary():
            checkpoint.write_run_config(run_dir, to_dict(cfg))
        yield


def finish(run_dir: str, cfg, data: dict, runs: dict, report: Callable[[dict], None],
           **extra) -> dict:
    """The run's metrics (config, provenance, data, ``extra``, then the sub-runs' records
    ``runs``): process 0 writes them to ``metrics.json`` and ``report(metrics)`` writes the
    figures and summary; every process waits for that."""
    metrics = {"config": to_dict(cfg), "provenance": runlog.provenance(), "data": data,
               **extra, "runs": runs}
    if distributed.is_primary():
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        report(metrics)
    distributed.sync("outputs written")
    return metrics


def read_config(run_dir: str, cls: type[C], experiment: str) -> C:
    """The config of the run in ``run_dir``; a clear error naming ``experiment`` when the
    folder holds none."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise ConfigError(f"{run_dir} is not a {experiment} run directory (no config.json)")
    return from_dict(cls, checkpoint.read_run_config(run_dir))


def restore_task(folder: str, open_: Callable[[str], checkpoint.Checkpoints], task: int | None,
                 like: Any) -> tuple[int, Any]:
    """The state of the checkpoint in ``folder`` (opened by ``open_``) after ``task`` (None:
    the last finished one), restored into ``like``'s structure, and that task. A missing
    folder is an error, not created."""
    if not os.path.isdir(folder):
        raise ConfigError(f"no checkpoints in {folder}")
    ckpt = open_(folder)
    try:
        steps = ckpt.all_steps()
        task = steps[-1] if task is None and steps else task
        if task not in steps:
            raise ConfigError(f"{folder} has checkpoints after tasks {steps}, not {task}")
        restored, _ = ckpt.restore(task, like)
    finally:
        ckpt.close()
    return task, restored
