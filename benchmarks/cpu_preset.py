"""The `cpu` preset of VCL-diffusion against this machine's matmul bound.

    python -m benchmarks.cpu_preset [--batches 8,16,…,512] [--rounds 3] [--skip-train]

Prints, for the preset's train step (MLE and VCL, batch 64; as calls of 8 unrolled steps
and as one rolled scan per epoch, the experiments' choice with our kernels) and its sampler
(guided DDIM, one step = two U-Net passes per image), the FLOPs per image, images per
second, the 2048² float32 matmul rate measured in the same run, and the ratio of the
measured time to the bound (the FLOPs at that matmul rate). Then the evaluation of the
whole 10-digit run: how many image passes the sampler makes after every task, as
``generate`` batched them before (one call per weight draw, padded to a power of two) and
with the preset's ``eval_batch``, and the time the measured rates predict for each. Writes
``benchmarks/cpu_preset_results.json``. About 8 minutes on 2 cores.

FLOPs per image: the U-Net's convolutions and transposes counted from its shapes
(``unet_flops``; forward, ×3 for a train step), and XLA's own cost analysis of the compiled
call next to it. XLA counts no FLOPs inside custom calls (our CPU convolution kernels), so
its figure is what runs *outside* the convolutions: the normalisations, activations,
embeddings and the update, with the bytes they move.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.run import gemm_gflops, make_epoch, unrolled_steps
from benchmarks.timing import interleaved_times
from vcl_jax.config import override
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.diffusion import generate as gen
from vcl_jax.models.unet import unet_flops
from vcl_jax.protocols import vcl_diffusion_setup


def _cost(compiled) -> dict:
    """XLA's cost analysis of a compiled call: FLOPs and bytes accessed (custom calls count
    for neither)."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"xla_flops": float(c.get("flops", 0.0)),
            "xla_bytes": float(c.get("bytes accessed", 0.0))}


def train_rows(cfg, gemm: float, rounds: int) -> list[dict]:
    """The preset's train step, MLE and VCL (K = 1), each as calls of ``unroll`` unrolled
    steps (the experiments before) and as one rolled scan per epoch (what they run now with
    our convolution kernels, ``Setup.steps_per_call``), interleaved; per image: analytic
    FLOPs (forward ×3) and XLA's count of the rest from the compiled unrolled call."""
    batch, steps = cfg.optim.batch_size, cfg.optim.unroll * 2
    fns, first_s = {}, {}
    for m in ("mle", "vcl"):
        for unroll in (cfg.optim.unroll, 0):
            fn = make_epoch(cfg.model.n_feat, m, batch, steps, unroll)
            t0 = time.perf_counter()
            fn()  # compiles
            first_s[m, unroll] = time.perf_counter() - t0
            fns[m, unroll] = fn
    times = interleaved_times(fns, rounds)
    flops = 3 * unet_flops(cfg.model.n_feat)
    cost = {m: _train_cost(cfg, m, batch) for m in ("mle", "vcl")}
    out = []
    for (m, unroll), ts in times.items():
        dt = statistics.median(ts) / steps  # seconds per step
        ips = batch / dt
        how = f"{unroll} unrolled steps per call" if unroll else "rolled scan"
        out.append({"what": f"train step, {m}, {how}", "batch": batch, "step_ms": 1e3 * dt,
                    "images_per_s": ips, "flops_per_image": flops,
                    "gflops": flops * ips / 1e9, "over_bound": gemm / (flops * ips / 1e9),
                    "compile_s": first_s[m, unroll] - dt * steps,
                    **cost[m]})
    return out


def _train_cost(cfg, method: str, batch: int) -> dict:
    """XLA's cost analysis of one compiled call of the preset's unrolled steps, per image."""
    call, *args = unrolled_steps(vcl_diffusion_setup.build(cfg), method)
    c = _cost(jax.jit(call).lower(*args).compile())
    images = batch * cfg.optim.unroll
    return {"xla_flops_per_image": c["xla_flops"] / images,
            "xla_bytes_per_image": c["xla_bytes"] / images}


def sampler_rows(cfg, gemm: float, batches: list[int], steps: int, rounds: int) -> list[dict]:
    """The preset's guided DDIM sampler (η as the preset, ``steps`` steps) at each batch of
    ``batches`` images, one weight set; per image step two U-Net passes (guidance)."""
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    draws = jax.tree.map(lambda p: p[None], params)
    flops = 2 * unet_flops(cfg.model.n_feat)  # one sampler step of one image
    fns, compile_s, cost = {}, {}, {}
    for b in batches:
        tasks = np.arange(b) % 10
        run = gen._sampler(setup.model, "ddim", (28, 28, 1), float(cfg.eval.guidance), steps,
                           float(cfg.eval.eval_eta), None, False, None)
        args = (draws, 0, setup.sched, jax.random.key(1), jnp.asarray(tasks, jnp.int32))
        t0 = time.perf_counter()
        compiled = run.lower(*args).compile()
        compile_s[b] = time.perf_counter() - t0
        cost[b] = _cost(compiled)
        fns[b] = (lambda c, a: lambda: jax.block_until_ready(c(*a)))(compiled, args)
    times = interleaved_times(fns, rounds)
    out = []
    for b, ts in times.items():
        dt = statistics.median(ts) / steps  # seconds per sampler step of the batch
        ips = b / dt
        out.append({"what": "sampler step (guided DDIM)", "batch": b, "step_ms": 1e3 * dt,
                    "images_per_s": ips, "flops_per_image": flops, "gflops": flops * ips / 1e9,
                    "over_bound": gemm / (flops * ips / 1e9), "compile_s": compile_s[b],
                    "xla_flops_per_image": cost[b]["xla_flops"] / b,  # the scan body, counted once
                    "xla_bytes_per_image": cost[b]["xla_bytes"] / b})
    return out


def evaluation_plan(cfg, draws: int, max_batch: int | None) -> list[int]:
    """The batch of every sampler call the preset's 10-digit evaluation makes, with ``draws``
    weight sets (1: MLE; ``eval_samples``: VCL), as ``generate`` batches them; ``max_batch``
    0: as it did before ``eval_batch`` (one call per draw, padded to a power of two)."""
    calls = []
    for d in range(len(cfg.data.classes)):
        n = cfg.eval.eval_per_class * (d + 1)
        for j in range(min(draws, n)):
            m = len(range(j, n, draws))
            calls.extend([1 << (m - 1).bit_length()] if max_batch == 0
                         else gen.call_batches(m, max_batch))
    return calls


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="8,16,32,64,128,256,512",
                        help="sampler batches to time (images per call)")
    parser.add_argument("--sampler-steps", type=int, default=10,
                        help="DDIM steps per timed sampler call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "cpu_preset_results.json"))
    args = parser.parse_args(argv)
    cfg = override(PRESETS["cpu"], [])
    gemm = gemm_gflops()
    print(f"2048² float32 matmul: {gemm:.0f} GFLOP/s (the bound below)", flush=True)
    rows = [] if args.skip_train else train_rows(cfg, gemm, args.rounds)
    rows += sampler_rows(cfg, gemm, [int(b) for b in args.batches.split(",")],
                         args.sampler_steps, args.rounds)
    print("\n| what | batch | ms per step | images/s | FLOPs/image (convs) | XLA FLOPs/image "
          "(rest) | XLA bytes/image | GFLOP/s | × bound | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['flops_per_image'] / 1e6:.0f} M | {r['xla_flops_per_image'] / 1e6:.1f} M | "
              f"{r['xla_bytes_per_image'] / 1e6:.1f} MB | {r['gflops']:.0f} | "
              f"{r['over_bound']:.2f} | {r['compile_s']:.1f} |")
    # The whole evaluation of a 10-digit run at the measured sampler rates (per image: the
    # nearest timed batch at or above the call's), before and with the preset's eval_batch.
    rate = sorted((r["batch"], r["step_ms"] / 1e3 / r["batch"]) for r in rows
                  if r["what"].startswith("sampler"))
    per_image = lambda b: next((s for bb, s in rate if bb >= b), rate[-1][1])
    plans = {}
    for name, draws in (("mle", 1), ("vcl", cfg.vcl.eval_samples)):
        mb_eval = cfg.eval.eval_batch
        for label, mb in (("power of two", 0), (f"eval_batch {mb_eval}", mb_eval)):
            calls = evaluation_plan(cfg, draws, mb)
            images = sum(calls)
            seconds = sum(b * per_image(b) for b in calls) * cfg.eval.ddim_steps
            real = cfg.eval.eval_per_class * sum(range(1, len(cfg.data.classes) + 1))
            bound = real * cfg.eval.ddim_steps * 2 * unet_flops(cfg.model.n_feat) / (gemm * 1e9)
            plans[f"{name}, {label}"] = {"calls": len(calls), "images": images, "real": real,
                                         "batches": sorted(set(calls)),
                                         "predicted_s": seconds, "bound_s": bound}
            print(f"evaluation of 10 digits, {name}, {label}: {len(calls)} sampler calls of "
                  f"batches {sorted(set(calls))}, {images} images × {cfg.eval.ddim_steps} steps; "
                  f"predicted {seconds:.0f} s, matmul bound of its {real} images "
                  f"{bound:.0f} s", flush=True)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "processor": platform.processor(), "cpus": os.cpu_count(),
               "jax": jax.__version__, "gemm_gflops": gemm, "rows": rows,
               "evaluation": plans}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
