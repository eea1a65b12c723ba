"""Orbax checkpoints: one per finished task, each holding a state pytree and JSON metadata.

The metadata always carries the run's config; restoring into a run whose config
differs is refused (:class:`ConfigMismatchError`) so that a run with other
settings can never overwrite or silently continue another run's checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class ConfigMismatchError(ValueError):
    """A checkpoint directory belongs to a run with another config."""


def config_diff(saved: dict, current: dict, ignore: tuple[str, ...] = (),
                added: dict | None = None) -> list[str]:
    """Human-readable differences between two flat-ish config dicts, over the keys of
    ``current`` (a key only the saved config has does not matter to this run).
    ``added`` maps fields introduced after ``saved`` was written to the value it
    implicitly had."""
    saved = {**(added or {}), **saved}
    keys = sorted(set(current) - set(ignore))
    return [f"{k}: checkpoint has {saved.get(k, '<absent>')!r}, this run has "
            f"{current.get(k, '<absent>')!r}" for k in keys if saved.get(k) != current.get(k)]


class Checkpoints:
    """A ``CheckpointManager`` over ``directory``, one step per finished task.

    Args:
      directory: where checkpoints live (created if absent).
      config: the run's config as a JSON-able dict; compared with the saved one.
      ignore: config keys that may differ between runs sharing checkpoints.
      added: fields newer than some checkpoints, with the value those implicitly had.
    """

    def __init__(self, directory: str, config: dict, *, ignore: tuple[str, ...] = (),
                 added: dict | None = None):
        self.directory = os.path.abspath(directory)
        self.config = json.loads(json.dumps(config))
        self._ignore = ignore
        self._added = json.loads(json.dumps(added or {}))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
        )
        latest = self._manager.latest_step()
        if latest is not None:
            self._check_config(latest)

    def _check_config(self, step: int) -> None:
        meta = self.restore_meta(step)
        diff = config_diff(meta.get("config", {}), self.config, self._ignore, self._added)
        if diff:
            raise ConfigMismatchError(
                f"checkpoints in {self.directory} were written with another config:\n  "
                + "\n  ".join(diff)
                + "\nUse a new run directory (or delete this one yourself); "
                "nothing was overwritten.")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Saves ``state`` and ``meta`` (plus the config) as ``step``; waits until written."""
        meta = dict(meta, config=self.config)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore(self, step: int, like: PyTree) -> tuple[PyTree, dict]:
        """Restores ``step`` into the structure, shapes and dtypes of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def close(self) -> None:
        self._manager.close()
