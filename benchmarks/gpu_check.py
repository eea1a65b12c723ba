"""The prepared GPU check: both papers' protocols measured on one accelerator in one command.

    python -m benchmarks.gpu_check --data DIR [--out FILE] [--budget-s 510] [--smoke]
    make gpu-check DATA=DIR

``DIR`` holds the offline MNIST (a folder with ``mnist-full/``, or the IDX files
themselves). Sections, in this order, each written to the JSON file as soon as it ends
(a run cut short keeps what it measured):

* ``device``: backend, device kind, library versions.
* ``steps``: the U-Net of the ``paper`` preset (n_feat 128, batch 128): train-step time and
  images/s of MLE, VCL with the paper's estimator (K = 10 draws, vmapped) and VCL with the
  grouped estimator; model FLOP utilisation against the chip's peak (table below).
* ``split_mnist``: the split-MNIST ``paper`` protocol end to end (VCL, 5 tasks).
* ``sampling``: guided DDPM-400 sampling throughput at a large batch.
* ``paper_two_tasks``: the ``paper`` preset's first two digit tasks end to end, MLE and VCL
  (MLE pre-training included, the paper's epochs; evaluation at ``eval_per_class`` 10), and
  the projected 10-task training time of each.
* ``precision``: 100 MLE steps from one start with float32, TF32 and bfloat16 matmuls,
  losses side by side and step times.
* ``torch``: the PyTorch reference (``benchmarks/torch_reference.py``) eager and
  ``torch.compile``-d, interleaved with JAX's step: the ratio JAX/PyTorch, MLE and VCL (K = 1).

Before each section the remaining budget is compared with the section's expected time
(for the two-task run: its step count times the step times just measured); a section that
does not fit is skipped and says so. ``--smoke`` runs every section at toy size on any
backend (the default test suite runs it on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks.run import _repeat, make_epoch
from benchmarks.timing import interleaved_times
from vcl_jax.config import override
from vcl_jax.models.unet import unet_flops
from vcl_jax.training.sequence import task_train_seconds

# Dense peak TFLOP/s per precision (NVIDIA's datasheets, SXM parts; H200 has H100's cores).
PEAKS = {"H100 PCIe": {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.0},
         "H100": {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.0},
         "H200": {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.0}}
PRECISIONS = {"float32": "highest", "tf32": "tensorfloat32", "bfloat16": "bfloat16"}


def peak_tflops(kind: str) -> dict | None:
    """The peak table entry for a device kind string (e.g. ``NVIDIA H200``), or None."""
    for name in sorted(PEAKS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in kind for part in name.split()):
            return PEAKS[name]
    return None


def default_precision() -> str:
    """The precision float32 matmuls run at under JAX's default setting on this backend."""
    if jax.config.jax_default_matmul_precision not in (None, "default"):
        return str(jax.config.jax_default_matmul_precision)
    return "tf32" if jax.default_backend() == "gpu" else "float32"


class Sizes:
    """What each section runs: the real protocols, or toy sizes for ``--smoke``."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.n_feat, self.batch = (8, 8) if smoke else (128, 128)
        self.steps = 1 if smoke else 20  # timed steps per call
        self.draws = 2 if smoke else 10  # VCL's K
        # one rolled lax.scan per call on a GPU; unrolled on CPU, where XLA's convolutions
        # inside a rolled loop are many times slower (README, "Notes on speed")
        self.unroll = self.steps if smoke else 0
        self.rounds = 1 if smoke else 5
        self.samples = 2 if smoke else 512
        self.precision_steps = 2 if smoke else 100
        self.diffusion_preset = "smoke" if smoke else "paper"
        self.split_preset = "smoke" if smoke else "paper"


def section_device() -> dict:
    import flax
    import optax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind,
            "devices": [str(x) for x in jax.devices()], "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "default_matmul_precision": default_precision(),
            "peak_tflops": peak_tflops(d.device_kind)}


STEP_VARIANTS = {  # name: (method, K draws?, overrides); K is Sizes.draws (10; smoke: 2)
    "mle": ("mle", False, ()),
    "vcl_paper_K10": ("vcl", True, ("estimator=paper", "weight_draws=vmap")),
    "vcl_grouped_K10": ("vcl", True, ("estimator=grouped", "weight_draws=vmap")),
}


def section_steps(s: Sizes, device: dict) -> dict:
    """Train-step time of MLE and both VCL estimators, interleaved; FLOP utilisation."""
    fns = {}
    for name, (method, draws, extra) in STEP_VARIANTS.items():
        k = s.draws if draws else 1
        t0 = time.perf_counter()
        fn = make_epoch(s.n_feat, method, s.batch, s.steps, unroll=s.unroll, train_samples=k,
                        preset="paper", overrides=("conv_impl=xla", *extra))
        fn()  # compile
        fns[name] = (fn, time.perf_counter() - t0)
    times = interleaved_times({k: f for k, (f, _) in fns.items()}, s.rounds)
    flops_image = 3 * unet_flops(s.n_feat)  # forward + backward
    peak = (device["peak_tflops"] or {}).get(device["default_matmul_precision"])
    out = {"n_feat": s.n_feat, "batch": s.batch, "precision": device["default_matmul_precision"],
           "peak_tflops": peak}
    for name, (_, draws, extra) in STEP_VARIANTS.items():
        k = s.draws if draws else 1
        step = statistics.median(times[name]) / s.steps
        passes = k if "estimator=paper" in extra else 1  # the grouped draws share one pass
        tflops = passes * s.batch * flops_image / step / 1e12
        out[name] = {"step_ms": 1e3 * step, "images_per_s": s.batch / step,
                     "compile_and_first_call_s": fns[name][1], "model_tflops": tflops,
                     "mfu": tflops / peak if peak else None}
    return out


def section_sampling(s: Sizes) -> dict:
    """Guided DDPM sampling (the paper preset's T and guidance) of one MLE model."""
    from vcl_jax.configs.vcl_diffusion import PRESETS
    from vcl_jax.diffusion.generate import generate
    from vcl_jax.protocols import vcl_diffusion_setup

    cfg = override(PRESETS[s.diffusion_preset], [f"n_feat={s.n_feat}", "conv_impl=xla"])
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    draws = jax.tree.map(lambda p: p[None], params)
    tasks = jnp.arange(s.samples) % 10

    def sample(key):
        return jax.block_until_ready(generate(setup.model, draws, setup.sched, key, tasks,
                                              (28, 28, 1), sampler="ddpm",
                                              guidance=cfg.eval.guidance))

    t0 = time.perf_counter()
    sample(jax.random.key(1))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample(jax.random.key(2))
    dt = time.perf_counter() - t0
    return {"n_feat": s.n_feat, "samples": s.samples, "steps": cfg.diffusion.T,
            "guidance": cfg.eval.guidance,
            "seconds": dt, "first_call_s": first, "images_per_s": s.samples / dt}


def section_split_mnist(s: Sizes, data: str) -> dict:
    """Split-MNIST VCL (no coreset) over the 5 tasks, compilation included."""
    from vcl_jax.configs.split_mnist import PRESETS
    from vcl_jax.protocols import split_mnist, split_mnist_setup

    cfg = override(PRESETS[s.split_preset], [f"data_dir={data}", "methods=vcl"]).validate()
    tasks = split_mnist_setup.load_tasks(cfg)
    t0 = time.perf_counter()
    r = split_mnist.run_one(split_mnist_setup.Setup(cfg), "vcl", tasks, progress=False)
    return {"wall_s": time.perf_counter() - t0, "train_s": r["train_s"], "eval_s": r["eval_s"],
            "final_average_accuracy": r["average"][-1], "tasks": len(tasks),
            "train_images_per_task": [len(t.y) for t in tasks]}


def paper_two_task_config(s: Sizes, data: str):
    from vcl_jax.configs.vcl_diffusion import PRESETS

    # On a GPU: XLA's convolutions and the K draws vmapped; at smoke size the preset's own.
    backend = [] if s.smoke else ["conv_impl=xla", "weight_draws=vmap"]
    return override(PRESETS[s.diffusion_preset], [
        f"data_dir={data}", "classes=0,1", "methods=mle,vcl", "coreset_sizes=0",
        *(["eval_per_class=1", "epochs=1"] if s.smoke else ["eval_per_class=10"]),
        *backend]).validate()


def expected_two_task_s(s: Sizes, data: str, steps: dict) -> float:
    """Training steps of the two-task run times the step times measured in ``steps``."""
    cfg = paper_two_task_config(s, data)
    per_epoch = -(-6000 // cfg.optim.batch_size)  # ~6,000 images per digit
    mle_ms = steps["mle"]["step_ms"] * (cfg.optim.batch_size / steps["batch"])
    vcl_ms = steps["vcl_paper_K10"]["step_ms"] * (cfg.optim.batch_size / steps["batch"])
    train = per_epoch * (cfg.optim.epochs * 2 * (mle_ms + vcl_ms)
                         + cfg.vcl.vcl_pretrain_epochs * mle_ms)
    return train / 1e3 * 1.3 + 60  # + compilation, evaluation and checkpoints


def section_paper_two_tasks(s: Sizes, data: str, n_tasks: int = 10) -> dict:
    """The paper preset on digits 0 and 1 end to end; 10-task training time projected as
    pre-training + first task (with its compilations) + 9 × the second (steady state)."""
    from vcl_jax.protocols import vcl_diffusion

    cfg = paper_two_task_config(s, data)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        metrics = vcl_diffusion.run(cfg, run_dir, progress=False)
        wall = time.perf_counter() - t0
    out = {"wall_s": wall, "epochs": cfg.optim.epochs,
           "vcl_pretrain_epochs": cfg.vcl.vcl_pretrain_epochs,
           "train_samples": cfg.vcl.train_samples, "estimator": cfg.vcl.estimator,
           "eval_per_class": cfg.eval.eval_per_class}
    for name, rec in metrics["runs"].items():
        first, second = task_train_seconds(rec)
        pretrain = rec["seconds"].get("pretrain", 0.0)
        out[name] = {"pretrain_s": pretrain, "task_train_s": [first, second],
                     "eval_s": rec["seconds"]["eval"],
                     "avg_uncertainty": [h["avg_uncertainty"] for h in rec["history"]],
                     f"projected_{n_tasks}_task_train_s": pretrain + first + (n_tasks - 1) * second}
    return out


def section_precision(s: Sizes) -> dict:
    """``precision_steps`` MLE steps from the same start and keys under each matmul
    precision: per-step losses side by side, the largest gap to float32, step time."""
    from vcl_jax.configs.vcl_diffusion import PRESETS
    from vcl_jax.protocols import vcl_diffusion_setup
    from vcl_jax.training.epoch import scan_steps
    from vcl_jax.training.state import TrainState, adam, make_train_step

    cfg = override(PRESETS["paper"], [f"n_feat={s.n_feat}", f"batch_size={s.batch}",
                                      "conv_impl=xla"])
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    m = setup.method("mle", params)
    opt = adam(1e-4)
    n = s.precision_steps
    images = jax.random.uniform(jax.random.key(1), (s.batch * n, 28, 28, 1))
    data = {"x": images, "task": jnp.arange(s.batch * n, dtype=jnp.int32) % 10}
    idx = jnp.arange(s.batch * n).reshape(n, s.batch)
    step = make_train_step(m, opt)
    out = {"steps": n, "n_feat": s.n_feat, "batch": s.batch}
    losses = {}
    for name, prec in PRECISIONS.items():
        with jax.default_matmul_precision(prec):
            tr, ms = m.init(params)
            state = TrainState(tr, opt.init(tr), ms)
            run = jax.jit(functools.partial(scan_steps, step, unroll=s.smoke))
            jax.block_until_ready(run(state, data, idx, jax.random.key(2)))  # compile
            t0 = time.perf_counter()
            _, metrics = jax.block_until_ready(run(state, data, idx, jax.random.key(2)))
            dt = time.perf_counter() - t0
        losses[name] = [float(v) for v in metrics["loss"]]
        out[name] = {"step_ms": 1e3 * dt / n, "losses": losses[name],
                     "mean_last_10": statistics.mean(losses[name][-10:])}
    for name in ("tf32", "bfloat16"):
        gap = max(abs(a - b) for a, b in zip(losses[name], losses["float32"], strict=True))
        out[name]["max_abs_loss_gap_to_float32"] = gap
        out[name]["speedup_over_float32"] = out["float32"]["step_ms"] / out[name]["step_ms"]
    return out


def section_torch(s: Sizes) -> dict:
    """JAX's train step against the PyTorch reference (eager and compiled), interleaved."""
    try:
        from benchmarks import torch_reference
    except ImportError:
        return {"skipped": "PyTorch is not installed"}
    torch = torch_reference.torch
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    out = {"device": device, "torch": torch.__version__, "n_feat": s.n_feat, "batch": s.batch}
    for method in ("mle", "vcl"):
        fns = {"jax": make_epoch(s.n_feat, method, s.batch, s.steps, unroll=s.unroll,
                                 preset="paper",
                                 overrides=("conv_impl=xla",))}
        for mode in ("eager", "compiled"):
            step = torch_reference.make_step(s.n_feat, method, s.batch, device=device,
                                             compile=mode == "compiled")
            for _ in range(3):  # torch.compile traces on the first calls
                step()
            fns[f"torch_{mode}"] = _repeat(step, s.steps)
        times = interleaved_times(fns, s.rounds)
        med = {k: 1e3 * statistics.median(v) / s.steps for k, v in times.items()}
        out[method] = {f"{k}_step_ms": v for k, v in med.items()}
        out[method]["jax_over_torch_eager"] = med["jax"] / med["torch_eager"]
        out[method]["jax_over_torch_compiled"] = med["jax"] / med["torch_compiled"]
    return out


def table(results: dict) -> str:
    """The check's figures as a markdown table."""
    rows = []
    sec = results["sections"]
    st = sec.get("steps", {})
    for name in STEP_VARIANTS:
        if name in st:
            r = st[name]
            mfu = f", MFU {100 * r['mfu']:.1f}% of {st['precision']}" if r["mfu"] else ""
            rows.append((f"train step {name} (n_feat {st['n_feat']}, batch {st['batch']})",
                         f"{r['step_ms']:.1f} ms, {r['images_per_s']:.0f} img/s, "
                         f"{r['model_tflops']:.1f} TFLOP/s{mfu}"))
    if "images_per_s" in sec.get("sampling", {}):
        r = sec["sampling"]
        rows.append((f"guided DDPM-{r['steps']} sampling, batch {r['samples']}",
                     f"{r['images_per_s']:.1f} img/s"))
    if "wall_s" in sec.get("split_mnist", {}):
        r = sec["split_mnist"]
        acc = 100 * r["final_average_accuracy"]
        rows.append((f"split-MNIST VCL, {r['tasks']} tasks end to end",
                     f"{r['wall_s']:.1f} s, final accuracy {acc:.2f}%"))
    two = sec.get("paper_two_tasks", {})
    for name in ("mle_coreset0", "vcl_coreset0"):
        if name in two:
            r = two[name]
            rows.append((f"paper preset {name}, tasks 1-2 training",
                         f"{r['task_train_s'][0]:.0f} + {r['task_train_s'][1]:.0f} s "
                         f"(pre-training {r['pretrain_s']:.0f} s); projected 10 tasks "
                         f"{r['projected_10_task_train_s'] / 60:.1f} min"))
    pr = sec.get("precision", {})
    for name in ("tf32", "bfloat16"):
        if name in pr:
            rows.append((f"{pr['steps']} MLE steps, {name} vs float32",
                         f"{pr[name]['speedup_over_float32']:.2f}× faster, largest loss gap "
                         f"{pr[name]['max_abs_loss_gap_to_float32']:.2e}"))
    to = sec.get("torch", {})
    for method in ("mle", "vcl"):
        if method in to:
            r = to[method]
            rows.append((f"JAX / PyTorch step, {method} (n_feat {to['n_feat']})",
                         f"{r['jax_over_torch_eager']:.2f} eager, "
                         f"{r['jax_over_torch_compiled']:.2f} compiled"))
    for name, r in sec.items():
        if "skipped" in r or "error" in r:
            rows.append((name, r.get("skipped") or r["error"].splitlines()[-1]))
    return "\n".join(["| measure | figure |", "|---|---|"] +
                     [f"| {a} | {b} |" for a, b in rows])


# Seconds each section is expected to need on an H100/H200 (the two-task run is estimated
# from the measured step times instead); a section that does not fit is skipped.
EXPECTED_S = {"device": 5, "steps": 120, "split_mnist": 60, "sampling": 60,
              "paper_two_tasks": None, "precision": 90, "torch": 150}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="folder with the offline MNIST (mnist-full/ or the IDX files)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "gpu_check_results.json"))
    parser.add_argument("--budget-s", type=float, default=510.0,
                        help="skip a section that would end after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (seconds, any backend)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data}: no such folder (it must hold the offline MNIST, "
                         f"e.g. a copy of shared/data/mnist-full/)")
    data = os.path.abspath(args.data)
    s = Sizes(args.smoke)
    start = time.perf_counter()
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "smoke": args.smoke, "budget_s": args.budget_s, "sections": {}}
    sec = results["sections"]
    sections = {
        "device": section_device,
        "steps": lambda: section_steps(s, sec["device"]),
        "split_mnist": lambda: section_split_mnist(s, data),
        "sampling": lambda: section_sampling(s),
        "paper_two_tasks": lambda: section_paper_two_tasks(s, data),
        "precision": lambda: section_precision(s),
        "torch": lambda: section_torch(s),
    }
    only = set(args.only.split(",")) if args.only else None
    for name, fn in sections.items():
        if only and name not in only and name != "device":
            continue
        left = args.budget_s - (time.perf_counter() - start)
        need = EXPECTED_S[name]
        if name == "paper_two_tasks":
            need = (expected_two_task_s(s, data, sec["steps"])
                    if "mle" in sec.get("steps", {}) else None)
        if not args.smoke and need is not None and need > left:
            sec[name] = {"skipped": f"expected {need:.0f} s, {left:.0f} s of the budget left"}
        elif not args.smoke and need is None and name == "paper_two_tasks":
            sec[name] = {"skipped": "needs the step times of the `steps` section"}
        else:
            t0 = time.perf_counter()
            try:
                sec[name] = fn()
            except Exception:  # one failing section must not lose the others' figures
                sec[name] = {"error": traceback.format_exc()}
            sec[name]["section_s"] = time.perf_counter() - t0
        results["elapsed_s"] = time.perf_counter() - start
        print(f"[gpu_check] {name}: {sec[name].get('section_s', 0):.1f} s "
              f"({results['elapsed_s']:.0f} s elapsed)", flush=True)
        with contextlib.suppress(OSError), open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(table(results))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
