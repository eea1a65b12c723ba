"""Data parallel over several processes: two processes on this machine (JAX's distributed
runtime with a local coordinator, gloo collectives on the CPU) train as one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(tmp_path, name: str, processes: int, *extra: str) -> list[list[np.ndarray]]:
    """How far the steps moved each process's posterior means."""
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    outs = [str(tmp_path / f"{name}_{i}.npz") for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, WORKER, outs[i], "--port", port,
                               "--num-processes", str(processes), "--process-id", str(i),
                               *extra], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return [[z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]
            for z in map(np.load, outs)]


@pytest.mark.slow  # ~1 min: five processes each compile the smoke VCL step
def test_two_processes_train_as_one(tmp_path):
    (one,) = _run(tmp_path, "single", 1)
    a, b = _run(tmp_path, "two", 2)
    # identical copies on both processes, equal to one process on the same global batches
    scale = max(float(np.abs(z).max()) for z in one)
    for x, y, z in zip(a, b, one, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, z, rtol=1e-4, atol=1e-5 * scale)
    # process 1 alone changes its rows: both processes' parameters change, identically
    c, d = _run(tmp_path, "perturbed", 2, "--perturb")
    for x, y in zip(c, d, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(np.abs(x - y).max() > 0.01 * scale for x, y in zip(a, c, strict=True))
