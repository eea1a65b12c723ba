"""Benchmarks: train-step throughput (MLE, VCL), rolled vs unrolled epochs, sampling.

    make bench            # or: python -m benchmarks.run [--quick]

Prints a markdown table and writes ``benchmarks/results.json``. Ratios are
measured in the same run, since these machines are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.timing import interleaved_times
from vcl_jax.config import override
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.diffusion.generate import generate
from vcl_jax.models.layers import resolve_impl
from vcl_jax.models.unet import unet_flops
from vcl_jax.protocols import vcl_diffusion_setup
from vcl_jax.training.epoch import EpochRunner, scan_steps
from vcl_jax.training.guard import check_finite
from vcl_jax.training.state import TrainState, adam, make_train_step


def _best(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_epoch(n_feat: int, method: str, batch: int, steps: int, unroll: int,
               train_samples: int = 1, conv_impl: str = "auto", preset: str = "cpu",
               overrides: tuple[str, ...] = (), check: bool = False):
    """A no-argument callable that runs ``steps`` train steps of ``preset``'s U-Net at
    width ``n_feat`` (one epoch of the `EpochRunner`, ``unroll`` steps per jitted call; 0:
    one scan) on fixed random images, and waits for its metrics as ``train_epochs`` does.
    ``overrides``: further ``key=value`` settings (e.g. ``estimator=grouped``). ``check``:
    also run ``train_epochs``' per-epoch divergence check."""
    cfg = override(PRESETS[preset], [f"n_feat={n_feat}", f"train_samples={train_samples}",
                                     f"conv_impl={conv_impl}", f"batch_size={batch}",
                                     *overrides])
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    m = setup.method(method, params)
    opt = adam(1e-3)
    tr, ms = m.init(params)
    tr, ms = m.begin_task(tr, ms, 0, 500)
    state = [TrainState(tr, opt.init(tr), ms)]
    data = {"x": jax.random.uniform(jax.random.key(1), (batch * steps, 28, 28, 1)),
            "task": jnp.zeros(batch * steps, jnp.int32)}
    runner = EpochRunner(make_train_step(m, opt), batch, unroll)

    def epoch():
        state[0], metrics = runner(state[0], data, jax.random.key(2))
        metrics = {k: float(v) for k, v in metrics.items()}
        if check:
            check_finite(metrics, state[0].trainable, "benchmark")

    return epoch


def train_throughput(n_feat: int, method: str, batch: int, steps: int, unroll: int,
                     train_samples: int = 1, repeats: int = 2) -> dict:
    dt = _best(make_epoch(n_feat, method, batch, steps, unroll, train_samples), repeats) / steps
    return {"n_feat": n_feat, "method": method, "K": train_samples, "batch": batch,
            "unroll": unroll, "step_ms": 1e3 * dt, "images_per_s": batch / dt,
            "gflops": 3 * batch * unet_flops(n_feat) * train_samples / dt / 1e9}


def sampling_throughput(n_feat: int, n: int, repeats: int = 1) -> dict:
    cfg = override(PRESETS["cpu"], [f"n_feat={n_feat}"])
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    draws = jax.tree.map(lambda p: p[None], params)
    tasks = jnp.arange(n) % 10

    def run():
        generate(setup.model, draws, setup.sched, jax.random.key(1), tasks, (28, 28, 1),
                 sampler="ddpm", guidance=2.0)

    dt = _best(run, repeats)
    return {"n_feat": n_feat, "samples": n, "steps": cfg.diffusion.T, "seconds": dt,
            "images_per_s": n / dt}


def compile_times(n_feat: int = 16) -> dict:
    """Seconds to compile one posterior draw of the `cpu` U-Net (n_feat 16,
    ``mean_field.sample``: one threefry computation per power-of-two size class) and the
    `cpu` preset's jitted call of 8 unrolled MLE and VCL (K = 1) train steps."""
    from vcl_jax.vi import mean_field as mf

    cfg = override(PRESETS["cpu"], [f"n_feat={n_feat}"])
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    mask = setup.mask(params)
    q = mf.init_from_params(params, cfg.vcl.log_var_init)

    def seconds(fn, *args):
        t = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        return time.perf_counter() - t

    key = jax.random.key(1)
    out = {"n_feat": n_feat, "random_leaves": sum(jax.tree.leaves(mask)),
           "draw_grouped_s": seconds(lambda k, q: mf.sample(k, q, mask), key, q)}
    for method in ("mle", "vcl"):
        out[f"{method}_{cfg.optim.unroll}_steps_s"] = seconds(*unrolled_steps(setup, method))
    return out


def unrolled_steps(setup, method: str) -> tuple:
    """``(call, *args)``: one jitted call of ``setup.cfg.optim.unroll`` unrolled train steps of
    ``method`` (Adam, K = 1 as configured) on zero images, for compile times and XLA's cost
    analysis."""
    cfg = setup.cfg
    params = setup.init_params(jax.random.key(0))
    m = setup.method(method, params)
    opt = adam(cfg.optim.learning_rate)
    tr, ms = m.init(params)
    state = TrainState(tr, opt.init(tr), m.begin_task(tr, ms, 0, 500)[1])
    batch, steps = cfg.optim.batch_size, cfg.optim.unroll
    data = {"x": jnp.zeros((batch * steps, 28, 28, 1)), "task": jnp.zeros(batch * steps, jnp.int32)}
    idx = jnp.arange(batch * steps).reshape(steps, batch)
    call = functools.partial(scan_steps, make_train_step(m, opt), unroll=True)
    return call, state, data, idx, jax.random.key(1)


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """XLA's float32 ``n × n`` matmul rate on this backend (GFLOP/s, best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / _best(lambda: jax.block_until_ready(mm(a)), repeats) / 1e9


def compare_torch(widths: list[int], batch: int = 128, rounds: int = 5,
                  conv_impls: tuple[str, ...] = ("auto", "xla")) -> list[dict]:
    """JAX vs the PyTorch reference (``benchmarks/torch_reference.py``), MLE and VCL (K = 1),
    same architecture, batch and machine, for each of ``conv_impls`` (``auto``: our CPU
    kernels where they build; ``xla``: XLA's own convolutions). After a warm-up the steps
    alternate for ``rounds`` rounds (per JAX impl a call of 2 unrolled steps, then 2 PyTorch
    steps), so that slow spells of a noisy machine hit all; ratios are of the medians
    (min-of-rounds also kept). Step-time ratio JAX/PyTorch (< 1: JAX faster)."""
    if not widths:
        return []
    try:
        from benchmarks import torch_reference
    except ImportError:
        print("PyTorch not installed (pip install -e '.[bench]'): no JAX/PyTorch comparison")
        return []
    out = []
    # The floor under every convolution rewrite: the two libraries' plain matmul rates.
    g_jax, g_torch = gemm_gflops(), torch_reference.gemm_gflops()
    out.append({"gemm_jax_gflops": g_jax, "gemm_torch_gflops": g_torch,
                "jax_over_torch": g_torch / g_jax})
    print(f"2048² float32 matmul: JAX {g_jax:.0f} GFLOP/s, PyTorch {g_torch:.0f} GFLOP/s "
          f"(time ratio JAX/PyTorch {g_torch / g_jax:.2f})", flush=True)
    steps = 2
    for n in widths:
        for method in ("mle", "vcl"):
            fns = {f"jax_{impl}": make_epoch(n, method, batch=batch, steps=steps, unroll=steps,
                                             conv_impl=impl) for impl in conv_impls}
            fns["torch"] = _repeat(torch_reference.make_step(n, method, batch=batch), steps)
            times = interleaved_times(fns, rounds)
            med = {k: 1e3 * statistics.median(v) / steps for k, v in times.items()}
            best = {k: 1e3 * min(v) / steps for k, v in times.items()}
            r = {"n_feat": n, "method": method, "batch": batch, "rounds": rounds,
                 "torch_step_ms": med["torch"], "torch_best_ms": best["torch"],
                 "torch_threads": torch_reference.torch.get_num_threads()}
            line = f"n_feat={n} {method} batch {batch}, median of {rounds} interleaved rounds:"
            for impl in conv_impls:
                j = f"jax_{impl}"
                r[impl] = {"conv_impl": resolve_impl(impl, False), "jax_step_ms": med[j],
                           "jax_best_ms": best[j], "jax_over_torch": med[j] / med["torch"],
                           "jax_over_torch_best": best[j] / best["torch"]}
                line += (f" JAX ({impl} → {r[impl]['conv_impl']}) {med[j]:.0f} ms,")
            line += f" PyTorch {med['torch']:.0f} ms; JAX/PyTorch " + ", ".join(
                f"{impl} {r[impl]['jax_over_torch']:.2f} "
                f"(best {r[impl]['jax_over_torch_best']:.2f})"
                for impl in conv_impls)
            out.append(r)
            print(line, flush=True)
    return out


def _repeat(fn, n: int):
    def run():
        for _ in range(n):
            fn()
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--k10", action="store_true",
                        help="also VCL with K = 10 vmapped weight draws over the whole batch "
                             "(the paper's estimator: ~20× an MLE step on this CPU; see "
                             "benchmarks.vcl_estimators)")
    parser.add_argument("--torch", default="32,64",
                        help="U-Net widths for the JAX vs PyTorch train-step comparison at batch "
                             "128 ('' to skip; needs the bench extra: pip install torch)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.json"))
    args = parser.parse_args(argv)
    widths = (16,) if args.quick else (16, 32)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
               "jax": jax.__version__, "train": [], "scan": [], "sampling": []}
    for n in widths:
        for method, k in (("mle", 1), ("vcl", 1)) + ((("vcl", 10),) if args.k10 else ()):
            r = train_throughput(n, method, batch=64, steps=8, unroll=8, train_samples=k)
            results["train"].append(r)
            print(f"train n_feat={n} {method} K={k}: {r['images_per_s']:.0f} img/s "
                  f"({r['step_ms']:.0f} ms/step, {r['gflops']:.0f} GFLOP/s)", flush=True)
    # The XLA:CPU while-loop effect: one rolled scan per epoch vs unrolled chunks.
    for unroll in (8, 0):
        r = train_throughput(16, "mle", batch=64, steps=8, unroll=unroll, repeats=1)
        results["scan"].append(r)
        print(f"epoch as {'rolled scan' if unroll == 0 else f'unrolled chunks of {unroll}'}: "
              f"{r['step_ms']:.0f} ms/step", flush=True)
    for n in widths[:1]:
        r = sampling_throughput(n, 64)
        results["sampling"].append(r)
        print(f"sampling n_feat={n}: {r['images_per_s']:.2f} img/s (400-step guided DDPM, "
              f"{r['samples']} samples in {r['seconds']:.1f} s)", flush=True)
    results["compile"] = compile_times()
    c = results["compile"]
    print(f"compile, cpu U-Net: posterior draw {c['draw_grouped_s']:.1f} s; 8 unrolled steps: "
          f"MLE {c['mle_8_steps_s']:.0f} s, VCL {c['vcl_8_steps_s']:.0f} s", flush=True)
    results["vs_torch"] = compare_torch([int(w) for w in args.torch.split(",") if w])
    mle = {r["n_feat"]: r for r in results["train"] if r["method"] == "mle"}
    results["ratios"] = {
        f"vcl_K{r['K']}_over_mle_n{r['n_feat']}": r["step_ms"] / mle[r["n_feat"]]["step_ms"]
        for r in results["train"] if r["method"] == "vcl"}
    rolled, unrolled = results["scan"][1]["step_ms"], results["scan"][0]["step_ms"]
    results["ratios"]["rolled_over_unrolled_n16"] = rolled / unrolled
    for r in results["vs_torch"]:
        if "method" not in r:
            results["ratios"]["jax_over_torch_gemm_2048"] = r["jax_over_torch"]
            continue
        for impl in ("auto", "xla"):
            if impl in r:
                results["ratios"][f"jax_{impl}_over_torch_{r['method']}_n{r['n_feat']}"] = (
                    r[impl]["jax_over_torch"])
    print("\n| ratio | value |\n|---|---|")
    for k, v in results["ratios"].items():
        print(f"| {k} | {v:.2f} |")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
