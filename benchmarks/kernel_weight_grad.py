"""The CPU kernels' weight gradient: its time on the `cpu` preset's conv shapes, and whether
repeated calls give the same bits.

    PYTHONPATH=. python -m benchmarks.kernel_weight_grad [--calls 40] [--repeats 30]

To compare with another version of the kernel, run this file by its path with the other
checkout on the path (``cd OTHER && PYTHONPATH=OTHER python /this/checkout/benchmarks/
kernel_weight_grad.py``), alternating with this checkout's runs, and compare the medians.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.kernels import conv3x3

# (batch, size, in channels, out channels): the U-Net's convs at 64 real + 32 replayed images
SHAPES = ((96, 28, 16, 16), (96, 14, 16, 32), (96, 14, 32, 32), (96, 28, 32, 16))


def _inputs(b, h, ci, co):
    keys = jax.random.split(jax.random.key(2), 3)
    return (jax.random.normal(keys[0], (b, h, h, ci)), jax.random.normal(keys[1], (3, 3, ci, co)),
            jax.random.normal(keys[2], (b, h, h, co)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40, help="timed calls per shape")
    ap.add_argument("--repeats", type=int, default=30, help="calls compared bit for bit")
    args = ap.parse_args(argv)
    ok, why = conv3x3.available()
    if not ok:
        raise SystemExit(f"the CPU kernels are not available here: {why}")
    out = {"kernel_source": str(conv3x3.SOURCE), "median_ms": {}}
    for b, h, ci, co in SHAPES:
        x, k, ct = _inputs(b, h, ci, co)
        f = jax.jit(lambda x, k, ct: jax.vjp(lambda k: conv3x3.conv3x3(x, k), k)[1](ct)[0])
        f(x, k, ct).block_until_ready()
        times = []
        for _ in range(args.calls):
            t = time.perf_counter()
            f(x, k, ct).block_until_ready()
            times.append(time.perf_counter() - t)
        out["median_ms"][f"{b}x{h}x{h}x{ci}->{co}"] = 1e3 * float(np.median(times))
    x, k, ct = _inputs(64, 28, 16, 16)
    grad = jax.jit(jax.grad(lambda k: jnp.vdot(conv3x3.conv3x3(x, k), ct)))
    first = np.asarray(grad(k))
    diffs = [np.asarray(grad(k)) - first for _ in range(args.repeats)]
    out["calls_differing"] = sum(bool(np.any(d)) for d in diffs)
    out["max_relative_difference"] = max(float(np.abs(d).max()) for d in diffs) / float(
        np.abs(first).max())
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
