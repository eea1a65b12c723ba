"""Golden metrics: the `smoke` runs' numbers recorded once, so a restructuring of the code
can show that the same seed still gives the same results.

``check(name, values)`` compares ``values`` (a JSON tree of numbers) with
``tests/golden/<name>.json``. On the host that recorded the file, training losses (and KLs, EWC
penalties) must match to rtol 1e-4 and scores of samples to rtol 1e-2; on another host (another
CPU, flags or JAX version, where XLA may pick other kernels) to 1e-3 and 2e-2. Not bit for bit,
because the numbers are not bit-reproducible across processes even on one host (measured: an
MLE loss 1 ulp apart between two sessions and 1.5e-5 apart from a clean clone, whose programs
are compiled afresh; a VCL loss 1.7e-6 apart under `make test`'s two workers; scores, which
pass through a sampler and a freshly trained classifier, 1.1e-3 apart from a clean clone). A
change of the algorithm or of its random numbers moves them by tens of percent.
``VCL_JAX_UPDATE_GOLDEN=1`` rewrites the file instead (only on purpose).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import jax
import numpy as np

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def host() -> str:
    """CPU model, a hash of its feature flags (XLA picks kernels by them) and JAX version."""
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines
                      if ln.startswith("model name")), model)
        flags = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("flags")), "")
    except OSError:
        pass
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]
    return f"{model} | flags {digest} | {os.cpu_count()} cpus | jax {jax.__version__}"


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{prefix}/{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, float(tree)


def check(name: str, values: dict, other_host_rtol: float | None = None) -> None:
    """Asserts that ``values`` equal the golden file ``name`` (see the module doc);
    ``other_host_rtol`` replaces the tolerances on another host than the recording one, for
    values known to round differently there (stated by the caller)."""
    path = os.path.join(FOLDER, f"{name}.json")
    if os.environ.get("VCL_JAX_UPDATE_GOLDEN") == "1":
        os.makedirs(FOLDER, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"host": host(), "values": values}, f, indent=1, sort_keys=True)
        return
    with open(path) as f:
        golden = json.load(f)
    same_host = golden["host"] == host()
    want, got = dict(_leaves(golden["values"])), dict(_leaves(values))
    assert sorted(got) == sorted(want), f"{name}: other entries than the golden file"
    for key, w in want.items():
        loss = key.rsplit("/", 1)[-1] in ("loss", "kl", "penalty")
        tol = (1e-4 if loss else 1e-2) if same_host else (
            other_host_rtol or (1e-3 if loss else 2e-2))
        # relative tolerances only: an absolute floor would swallow small values (an EWC
        # penalty of 1e-6 would pass anywhere in 0..2e-6); a golden 0 must stay 0
        np.testing.assert_allclose(got[key], w, rtol=tol, atol=1e-12,
                                   err_msg=f"{name}{key} (golden host: {golden['host']})")
