"""Stopping a run on SIGTERM / Ctrl-C at a point where nothing is half written.

The signal handler (:func:`on_signal`, installed by :func:`vcl_jax.cli.command`) records
the request and raises at once, except where an exception would do harm or be lost:
inside a checkpoint write (:func:`deferred`: the write completes, then the run stops) and
inside a garbage-collector callback (Python prints and swallows exceptions there). A
deferred request is raised at the end of the write or at the next epoch boundary
(:func:`stop_if_requested`).
"""

from __future__ import annotations

import contextlib
import gc
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that ``finally`` blocks (the run
    lock, open checkpoint managers) run before the process exits."""


_state: dict = {"raise": None, "deferred": 0}


def stop_if_requested() -> None:
    """Raises the pending :class:`Terminated` / ``KeyboardInterrupt``, if any."""
    if _state["raise"] is not None and not _state["deferred"]:
        raise _state["raise"]()


@contextlib.contextmanager
def deferred():
    """A block a signal does not interrupt: a pending stop is raised when it ends."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    stop_if_requested()


def _in_gc_callback(frame) -> bool:
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def on_signal(signum, frame) -> None:
    _state["raise"] = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    if not _in_gc_callback(frame):
        stop_if_requested()
