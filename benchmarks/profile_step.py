"""Where the U-Net train step's time goes on this machine: a profile by operation kind.

    python -m benchmarks.profile_step [--n-feat 64] [--batch 128] [--conv-impl xla] [--forward]

Traces one gradient of the ε-prediction loss (forward + backward, no optimizer)
with the JAX profiler, maps every XLA kernel in the trace to the optimised HLO it
ran, and sums the time per kind: 3×3 convolutions (forward and input gradient),
weight-gradient convolutions (XLA writes ∂L/∂kernel as a convolution whose window
is the whole feature map), transposes, dots, other fusions. The FLOP rates use
the model's convolution FLOPs (``unet_flops``): a third of the step's FLOPs are the
weight gradients. ``--forward``: one forward pass instead (what a sampler step runs). The
trace itself costs a few percent; kernel times are summed over threads.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp

from vcl_jax.models.layers import resolve_impl
from vcl_jax.models.unet import ContextUNet, unet_flops


def _kind(body: str, name: str) -> str:
    if 'custom_call_target="vcl_conv3x3_forward"' in body:  # our kernels (conv_impl=ffi)
        return "conv, 3×3 window"
    if 'custom_call_target="vcl_conv3x3_weight_grad"' in body:
        return "conv, weight gradient (whole-map window)"
    if "convolution(" in body:
        window = re.search(r"window=\{size=(\d+)x", body)
        return "conv, 3×3 window" if window and int(window.group(1)) <= 3 else \
            "conv, weight gradient (whole-map window)"
    if " dot(" in body:
        return "dot"
    if "transpose" in name:
        return "transpose/copy"
    return "other fusions"


def _kernel_times(fn, *args) -> tuple[list[dict], float]:
    """Times every XLA kernel of one call of the jitted ``fn(*args)`` (after a warm-up) with
    the JAX profiler and sums them per kind (``_kind``). Returns (rows, total ms)."""
    hlo = fn.lower(*args).compile().as_text()
    jax.block_until_ready(fn(*args))  # warm up
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        path = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "perfetto_trace.json.gz"))
        with gzip.open(path[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    lines = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = (.*)$", hlo, re.M))
    calls = dict(re.findall(r"%(\S+) = .*?calls=%(fused_computation[.\d]*)", hlo))
    bodies = {m.group(1): m.group(2) for m in re.finditer(
        r"^%(fused_computation[.\d]*) .*?\{\n(.*?)\n\}", hlo, re.S | re.M)}
    time_ms: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for e in events:  # one event per XLA kernel, named after its HLO instruction
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in lines:
            continue
        kind = _kind(bodies.get(calls.get(name, ""), lines[name]), name)
        time_ms[kind] += e.get("dur", 0) / 1e3
        count[kind] += 1
    total = sum(time_ms.values())
    rows = [{"kind": k, "ms": v, "share": v / total, "kernels": count[k]}
            for k, v in sorted(time_ms.items(), key=lambda kv: -kv[1])]
    return rows, total


def _inputs(n_feat: int, batch: int, conv_impl: str):
    model = ContextUNet(n_feat=n_feat, n_tasks=10, embed_dim=32,
                        impl=resolve_impl(conv_impl, False))
    x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
    t, task, keep = jnp.full((batch,), 0.5), jnp.zeros((batch,), int), jnp.ones((batch,), bool)
    return model, model.init(jax.random.key(1), x, t, task, keep), (x, t, task, keep)


def profile(n_feat: int, batch: int, conv_impl: str = "xla") -> dict:
    """The gradient of the ε-prediction loss (forward + backward, no optimizer)."""
    model, params, (x, t, task, keep) = _inputs(n_feat, batch, conv_impl)

    def loss(p):
        return jnp.mean((model.apply(p, x, t, task, keep) - x) ** 2)

    rows, total = _kernel_times(jax.jit(jax.grad(loss)), params)
    step_flops = 3 * batch * unet_flops(n_feat)
    rates = {"conv, 3×3 window": 2 / 3, "conv, weight gradient (whole-map window)": 1 / 3}
    for r in rows:
        if r["kind"] in rates:
            r["gflop_per_s"] = rates[r["kind"]] * step_flops / (r["ms"] / 1e3) / 1e9
    return {"what": "gradient step", "n_feat": n_feat, "batch": batch, "conv_impl": model.impl,
            "total_ms": total, "rows": rows, "step_gflop": step_flops / 1e9}


def profile_forward(n_feat: int, batch: int, conv_impl: str = "xla") -> dict:
    """One forward pass of ``batch`` images: what a sampler step runs (at twice its images
    when guided)."""
    model, params, args = _inputs(n_feat, batch, conv_impl)
    rows, total = _kernel_times(jax.jit(lambda p, *a: model.apply(p, *a)), params, *args)
    flops = batch * unet_flops(n_feat)
    for r in rows:
        if r["kind"] == "conv, 3×3 window":
            r["gflop_per_s"] = flops / (r["ms"] / 1e3) / 1e9
    return {"what": "forward pass", "n_feat": n_feat, "batch": batch, "conv_impl": model.impl,
            "total_ms": total, "rows": rows, "step_gflop": flops / 1e9}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-feat", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--conv-impl", default="xla", help="xla, im2col, ffi or auto")
    parser.add_argument("--forward", action="store_true",
                        help="one forward pass (a sampler's work) instead of a gradient")
    args = parser.parse_args(argv)
    out = (profile_forward if args.forward else profile)(args.n_feat, args.batch, args.conv_impl)
    print(f"U-Net n_feat {out['n_feat']}, batch {out['batch']}, {out['conv_impl']} convs: "
          f"{out['what']} "
          f"{out['total_ms']:.0f} ms in XLA kernels, {out['step_gflop']:.0f} GFLOP of convolutions")
    print("| kind | ms | share | kernels | GFLOP/s |\n|---|---|---|---|---|")
    for r in out["rows"]:
        rate = f"{r['gflop_per_s']:.0f}" if "gflop_per_s" in r else "–"
        print(f"| {r['kind']} | {r['ms']:.0f} | {100 * r['share']:.0f}% | {r['kernels']} "
              f"| {rate} |")
    return out


if __name__ == "__main__":
    main()
