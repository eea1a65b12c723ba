"""One writer per run directory: a lock file holding the writer's host and PID.

A run takes the lock before it writes anything and releases it when it ends, however it
ends. A second run on the same directory is refused at once, naming the holder. A lock
left behind by a process that no longer exists on this host (a SIGKILL, a crash) is taken
over with a warning; a lock held from another host cannot be checked from here and is
refused, with the command that removes it. Read-only tools (sampling, re-scoring, Fisher
analysis) do not take the lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import warnings

from vcl_jax import distributed

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a lock whose writer died between creating and filling it


class RunLock:
    """``with RunLock(run_dir): ...`` holds ``run_dir/.lock`` for the block.

    Raises:
      RunLockedError: a live process (or one on another host) holds the lock.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.UTC).isoformat()}
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return True

    def acquire(self) -> RunLock:
        os.makedirs(self.run_dir, exist_ok=True)
        if not distributed.is_primary():  # one run of several processes: process 0 holds it
            return self
        for _ in range(3):  # a stale lock removed by a concurrent run: try again
            if self._create():
                self._held = True
                return self
            holder = _read(self.path)
            host, pid = holder.get("host"), holder.get("pid")
            who = f"PID {pid} on host {host}" if pid else "an unknown process"
            same_host = host in (None, socket.gethostname())
            if isinstance(pid, int) and same_host and _alive(pid):
                raise RunLockedError(
                    f"{self.run_dir} is being written by {who} (since {holder.get('since')}); "
                    f"wait for it to finish or use another --run-dir")
            if not same_host:
                raise RunLockedError(
                    f"{self.run_dir} is locked by {who}, which cannot be checked from this host; "
                    f"if that run is over, remove the lock (rm {self.path}) and re-run")
            warnings.warn(f"{self.run_dir}: taking over the lock of {who}, which no longer "
                          f"runs (it ended without releasing it)", stacklevel=2)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise RunLockedError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if _read(self.path).get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
