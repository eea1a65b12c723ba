"""Orbax checkpoints: one per finished task, each holding a state pytree and JSON metadata.

The metadata always carries the run's config and the run format that wrote it; restoring
into a run whose config differs, or from another format, is refused
(:class:`ConfigMismatchError`) so that a run with other settings can never overwrite or
silently continue another run's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vcl_jax import interrupt
from vcl_jax.config import ConfigError

PyTree = Any


# The format of a run directory: the layout of its checkpoints' states and records and the
# meaning of its config's fields. Raised whenever one of them changes; a run directory
# written by another format is refused by name (there are no per-field upgrades).
# 3: formats recorded in config.json and every checkpoint; methods named in one grammar.
# 4: configs in sections (config.json nested; checkpoints keyed by ``section.field``).
RUN_FORMAT = 4


class ConfigMismatchError(ValueError):
    """A checkpoint directory belongs to a run with another config or run format."""


def check_format(written: Any, where: str) -> None:
    """Refuses what a run of another format wrote (``written``: the format it recorded, or
    None for one written before formats were recorded).

    Raises:
      ConfigMismatchError: naming the format and the way out.
    """
    if written != RUN_FORMAT:
        which = (f"run format {written}" if written is not None
                 else "a run format before 3 (from before formats were recorded)")
        raise ConfigMismatchError(
            f"{where} was written by {which}; this code reads run format {RUN_FORMAT} only. "
            "Use a new run directory (or re-run that run with the code that wrote it); "
            "nothing was overwritten.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or writing one failed."""


def _reason(e: BaseException) -> str:
    """The first line of an exception (TensorStore's messages run to many lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def write_run_config(run_dir: str, config: dict) -> None:
    """``run_dir/config.json``: the run's config (:func:`vcl_jax.config.to_dict`) and the run
    format that wrote it."""
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"format": RUN_FORMAT, **config}, f, indent=2)


def read_run_config(run_dir: str) -> dict:
    """The config a run directory's ``config.json`` holds (``run_dir`` may also be that file
    itself), without its format, after checking that format.

    Raises:
      ConfigError: no config.json there, or an unreadable one.
      ConfigMismatchError: one written by another run format.
    """
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); choose another run directory") from e
    check_format(raw.pop("format", None), path)
    return raw


def config_diff(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two flat-ish config dicts, over the keys of
    ``current`` (a key only the saved config has does not matter to this run)."""
    keys = sorted(set(current) - set(ignore))
    return [f"{k}: checkpoint has {saved.get(k, '<absent>')!r}, this run has "
            f"{current.get(k, '<absent>')!r}" for k in keys if saved.get(k) != current.get(k)]


class Checkpoints:
    """A ``CheckpointManager`` over ``directory``, one step per finished task.

    Args:
      directory: where checkpoints live (created if absent).
      config: the run's config as a JSON-able dict; compared with the saved one.
      ignore: config keys that may differ between runs sharing checkpoints.
      data: what the run trains on (:func:`vcl_jax.data.identity`: dataset, sizes, a
        checksum; not the folder), stored under the key ``data`` of the config, so the same
        data read from another folder resumes and other data is refused. Read-only tools
        leave it out.
      local: files of this process alone (a cache) in a multi-process run; by default every
        process takes part in each save and restore, as Orbax coordinates them.
      run: the checkpoints of a run, which record and check :data:`RUN_FORMAT`; False for a
        cache whose entries the run format does not describe (the evaluation classifiers:
        their key is their own config and data, and a run's format says nothing of them).
    """

    def __init__(self, directory: str, config: dict, *, ignore: tuple[str, ...] = (),
                 data: dict | None = None, local: bool = False, run: bool = True):
        self.directory = os.path.abspath(directory)
        extra = {} if data is None else {"data": data}
        self.config = json.loads(json.dumps({**config, **extra}))
        self._ignore = ignore
        self._run = run
        # local: this process's own files (e.g. a cache), with no other process taking part
        # in a multi-process run; else Orbax coordinates every process's save and restore
        me, self._local = jax.process_index(), local
        processes = (ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
                     if local else ocp.options.MultiprocessingOptions())
        if local:
            os.makedirs(self.directory, exist_ok=True)  # Orbax creates only shared folders
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=not local,
                                                 multiprocessing_options=processes),
        )
        latest = self._manager.latest_step()
        if latest is not None:
            self._check_config(latest)

    def _check_config(self, step: int) -> None:
        meta = self.restore_meta(step)
        if self._run:
            check_format(meta.get("format"), f"checkpoint step {step} in {self.directory}")
        diff = config_diff(meta.get("config", {}), self.config, self._ignore)
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
        """Saves ``state`` and ``meta`` (plus the config) as ``step``; waits until written.

        Orbax writes into a temporary folder and renames it when complete, so a write that
        fails or is killed half way leaves the earlier steps as they were. A failed write
        (e.g. a full disk) removes its own partial folder and raises :class:`CheckpointError`.
        """
        meta = dict(meta, config=self.config, **({"format": RUN_FORMAT} if self._run else {}))
        try:
            with interrupt.deferred():  # SIGTERM / Ctrl-C stop the run after this write
                self._manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
                self._manager.wait_until_finished()
        except OSError as e:
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            earlier = [s for s in self.all_steps() if s < step]
            kept = f"steps {earlier[0]}..{earlier[-1]} are intact" if earlier else "no earlier step"
            raise CheckpointError(
                f"writing checkpoint step {step} to {self.directory} failed ({_reason(e)}); "
                f"{kept}. Fix the cause (e.g. free disk space) and re-run the same command: "
                f"it resumes after the last written step.") from e

    def _unreadable(self, step: int, e: BaseException) -> CheckpointError:
        path = os.path.join(self.directory, str(step))
        aside = os.path.join(os.path.dirname(self.directory), f"damaged-step{step}")
        good = None
        for s in reversed([s for s in self.all_steps() if s < step]):
            try:
                self._read_meta(s)
                good = s
                break
            except Exception:  # noqa: BLE001 - any failure means "not readable"
                continue
        then = (f"resume from the previous good checkpoint (step {good})" if good is not None
                else "start this run over (no earlier checkpoint is readable)")
        return CheckpointError(
            f"checkpoint step {step} at {path} cannot be read ({_reason(e)}); it is damaged "
            f"(e.g. truncated by a full disk or an interrupted copy). Nothing was deleted. To "
            f"{then}, move it aside and re-run the same command:\n  mv {path} {aside}")

    def _read_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore_meta(self, step: int) -> dict:
        try:
            return self._read_meta(step)
        except Exception as e:  # noqa: BLE001 - TensorStore/JSON/OS errors alike
            raise self._unreadable(step, e) from e

    def restore(self, step: int, like: PyTree) -> tuple[PyTree, dict]:
        """Restores ``step`` into the structure, shapes and dtypes of ``like``.

        Raises:
          CheckpointError: the step's files cannot be read (naming it and the way out).
        """
        # Restored onto this run's devices, whatever topology wrote them: replicated over
        # every process's devices, or a local checkpoint onto this process's first device.
        where = (jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if self._local
                 else jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()),
                                                                   ("all",)),
                                                 jax.sharding.PartitionSpec()))
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), like)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e
        return out.state, dict(out.meta)

    def close(self) -> None:
        self._manager.close()
