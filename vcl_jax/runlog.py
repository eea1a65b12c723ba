"""A run's live log and its provenance.

:func:`open_log` (entered by each experiment's ``run``) appends one JSON line per epoch and
per task to ``<run_dir>/log.jsonl`` as the run goes (``tail -f`` it), writes the same scalars
as TensorBoard event files under ``<run_dir>/tb/`` when the optional ``tensorboardX`` is
installed (``pip install -e '.[tensorboard]'``; no TensorFlow), and prints after each task a
progress line with the whole run's ETA. The library's loops
(:func:`~vcl_jax.training.state.train_epochs`,
:func:`~vcl_jax.training.sequence.run_sequence`) report to the log that is open, if any; run
outside an experiment they log nothing.

A line is ``{"kind": "start" | "epoch" | "task" | "end", "time": unix seconds, ...}``:
``start`` carries the :func:`provenance`; ``epoch`` the sub-run (``run``), ``phase`` (``train``,
or ``tune``: a coreset's fine-tuning of a copy), its ``label`` (``mle_coreset0 task 3/10``),
``epoch``/``epochs``, the sub-run's optimizer ``step`` so far in that phase, ``lr``, the
epoch's mean losses (``loss``, ``kl``, …), ``seconds`` and ``samples_per_s``; ``task`` the
task's scalar metrics (``avg_uncertainty``, ``sample_accuracy``, …) and the seconds of each
phase. TensorBoard gets the epochs' scalars as ``<run>/<phase>/<name>`` against the step and
the tasks' as ``<run>/task/<name>`` against the task.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata

from vcl_jax import distributed

_CURRENT: contextvars.ContextVar[RunLog | None] = contextvars.ContextVar("run_log",
                                                                         default=None)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """What produced a run: the code's git commit (and whether its tree had uncommitted
    changes; None outside a git checkout), the versions of python and the numerical
    packages, the devices, the CPU model and the command line."""
    import jax

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "versions": versions,
            "devices": [str(d) for d in jax.devices()],
            "cpu": f"{cpu_model()} ({os.cpu_count()} cpus)",
            "host": platform.node(),
            "command": list(sys.orig_argv)}


def _tensorboard(folder: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(folder, flush_secs=10)


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _duration(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


class RunLog:
    """The open log of one run (see the module doc); ``units``: tasks in the whole run (every
    sub-run's), for the ETA."""

    def __init__(self, run_dir: str, units: int, progress: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "log.jsonl")
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 — closed by close()
        self._tb = _tensorboard(os.path.join(run_dir, "tb"))
        self.units, self.progress = units, progress
        self.done = self.skipped = 0
        self.t0 = time.time()
        self._steps: dict[str, int] = {}

    def write(self, kind: str, **fields) -> None:
        self._file.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields})
                         + "\n")

    def epoch(self, label: str, epoch: int, epochs: int, steps: int, examples: int,
              seconds: float, lr: float, metrics: dict) -> None:
        # The sub-run is the label's first word; a coreset's fine-tuning trains a copy that
        # the next task does not continue from, so its steps are counted apart.
        run = label.split(" ")[0]
        phase = "tune" if "fine-tuning" in label else "train"
        count = f"{run}/{phase}"
        step = self._steps[count] = self._steps.get(count, 0) + steps
        scalars = {"lr": lr, **_scalars(metrics),
                   "samples_per_s": examples / seconds if seconds > 0 else 0.0}
        self.write("epoch", run=run, phase=phase, label=label, epoch=epoch, epochs=epochs,
                   step=step, seconds=round(seconds, 3), **scalars)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{count}/{k}", v, step)

    def skip(self, tasks: int) -> None:
        """``tasks`` finished before this process (a resumed run): left out of the ETA."""
        self.skipped += tasks

    def task(self, run: str, task: int, tasks: int, metrics: dict, seconds: dict) -> None:
        scalars = _scalars(metrics)
        scalars.pop("task", None)  # the metrics' own 0-based index
        self.write("task", run=run, task=task, tasks=tasks,
                   seconds={k: round(v, 3) for k, v in seconds.items()}, **scalars)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{run}/task/{k}", v, task)
            self._tb.flush()
        self.done += 1
        if self.progress:
            elapsed = time.time() - self.t0
            left = max(self.units - self.skipped - self.done, 0)
            print(f"[progress] {self.skipped + self.done}/{self.units} tasks, "
                  f"{_duration(elapsed)} elapsed, ETA {_duration(elapsed / self.done * left)}",
                  flush=True)

    def close(self) -> None:
        self.write("end", seconds=round(time.time() - self.t0, 3))
        self._file.close()
        if self._tb is not None:
            self._tb.close()


@contextlib.contextmanager
def open_log(run_dir: str, units: int, *, progress: bool = True,
             meta: dict | None = None) -> Iterator[RunLog | None]:
    """Opens ``run_dir``'s log for the duration of the block (appending: a resumed run adds
    to its log), its first line the :func:`provenance` and ``meta``. In a multi-process run
    only process 0 logs (the others' block gets None)."""
    if not distributed.is_primary():
        yield None
        return
    log = RunLog(run_dir, units, progress)
    log.write("start", provenance=provenance(), **(meta or {}))
    token = _CURRENT.set(log)
    try:
        yield log
    finally:
        _CURRENT.reset(token)
        log.close()


def current() -> RunLog | None:
    """The log open in this context, or None."""
    return _CURRENT.get()
