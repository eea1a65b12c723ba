"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time


def interleaved_times(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each no-argument callable in ``fns``, called in turn for ``rounds``
    rounds after one warm-up call each (so that a slow spell of the machine hits all)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times
