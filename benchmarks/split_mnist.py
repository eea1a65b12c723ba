"""Split-MNIST VCL timing: the 5-task `paper` protocol on full MNIST on this machine.

    python -m benchmarks.split_mnist [--estimators grouped,paper] [--all-runs] [--out FILE]

The `paper` protocol: the five real tasks of the complete MNIST (~12,000 training
images each, offline from `shared/data/mnist-full/`), VCL without coreset, 10 weight
samples per step, 120 full-batch epochs per task, 100 test draws. `--all-runs`
also times the whole five-run comparison (MLE, VCL, both 40-point coresets, EWC).
Wall time covers everything from the first task to the last evaluation, compilation
included (data loading excluded). Next to it: the physical bound, the protocol's
training FLOPs divided by this machine's float32 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from benchmarks.run import gemm_gflops
from benchmarks.timing import interleaved_times
from vcl_jax.config import override
from vcl_jax.configs.split_mnist import PRESETS, PUBLISHED
from vcl_jax.protocols import split_mnist, split_mnist_setup


def training_flops(cfg, tasks, run: str) -> float:
    """Matmul FLOPs of one run's training (forward 2·N·W, backward twice that, per epoch).

    W counts the weights a forward pass multiplies by: the shared layers and one head. The
    grouped estimator runs each image under one weight draw, so a VCL step costs one
    forward + backward pass like MLE; ``estimator=paper`` runs every draw over the whole
    batch (``train_samples``×). VCL's first task adds the MLE fit of its means; coreset
    fine-tuning and EWC's Fisher are left out (< 1% here).
    """
    dims = (tasks[0].x.shape[1], *cfg.model.hidden, len(cfg.data.groups[0]))
    w = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    per_image_epoch = 6.0 * w * cfg.optim.epochs
    n = [len(t.y) for t in tasks]
    if not run.startswith("vcl"):
        return per_image_epoch * sum(n)
    draws = cfg.vcl.train_samples if cfg.vcl.estimator == "paper" else 1
    return per_image_epoch * (n[0] + draws * sum(n))


def time_protocol(estimator: str, runs: tuple[str, ...] = ("vcl",)) -> dict:
    """Times the ``paper`` preset's ``runs`` one after another (one Setup: shared compiles)."""
    cfg = override(PRESETS["paper"], [f"estimator={estimator}", "methods=" + ",".join(runs)])
    tasks = split_mnist_setup.load_tasks(cfg)
    setup = split_mnist_setup.Setup(cfg)
    out = {"estimator": estimator, "train_images_per_task": [len(t.y) for t in tasks],
           "runs": {}}
    for run in runs:
        t0 = time.perf_counter()
        result = split_mnist.run_one(setup, run, tasks, progress=False)
        out["runs"][run] = {"wall_s": time.perf_counter() - t0, "train_s": result["train_s"],
                            "coreset_s": result["coreset_s"], "eval_s": result["eval_s"],
                            "final_average_accuracy": result["average"][-1],
                            "training_gflop": training_flops(cfg, tasks, run) / 1e9}
    out["wall_s"] = sum(r["wall_s"] for r in out["runs"].values())
    return out


def gradient_variance(estimators: list[str], draws: int = 64) -> dict:
    """Variance of each estimator's gradient (w.r.t. the posterior means and log-variances),
    summed over parameters, at the first VCL posterior of the `cpu` preset's task 0/1
    (MLE-fit means, log-variance −6), on the task's 1,000 training images, K = 10."""
    import jax.numpy as jnp

    from vcl_jax.models import bayes_mlp, mlp

    cfg = PRESETS["cpu"]
    task = split_mnist_setup.load_tasks(cfg)[0]
    setup = split_mnist_setup.Setup(cfg)
    data = split_mnist_setup.task_batch(task.x, task.y, 0)
    params = mlp.init_mlp(jax.random.PRNGKey(0), task.x.shape[1], cfg.model.hidden,
                          len(cfg.data.groups), len(cfg.data.groups[0]))
    params, _ = setup.fit_mle(params, (), data, jax.random.PRNGKey(1))
    q, _ = setup.vcl.init(params)
    out = {}
    for est in estimators:
        def grad(key, est=est):
            return jax.grad(lambda q: bayes_mlp.expected_nll(
                q, data["x"], data["y"], 0, key, estimator=est, n_samples=10))(q)

        grads = jax.lax.map(grad, jax.random.split(jax.random.PRNGKey(2), draws))
        var = sum(float(jnp.sum(jnp.var(g, axis=0))) for g in jax.tree.leaves(grads))
        out[est] = var
    return out


def step_comparison(n_images: int = 12_000, repeats: int = 11) -> dict:
    """Gradient of the grouped VCL loss (K = 10, full batch of ``n_images``) with the
    library's draws (:func:`vcl_jax.vi.mean_field.sample_many`, ``standard_normal``) and an
    MLE gradient, timed interleaved (best and median of ``repeats``), so that their ratio
    comes from the same run."""
    from vcl_jax.models import mlp
    from vcl_jax.vi import mean_field as mf

    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(key, (n_images, 784))
    y = jnp.zeros((n_images,), jnp.int32)
    params = mlp.init_mlp(key, 784, (256, 256), 5, 2, 0.1)
    q = mf.init_from_params(params, -6.0)

    def vcl_grad(draw):  # the grouped estimator (bayes_mlp._grouped_nll) with these draws
        def loss(q, k):
            ws = draw(jax.random.split(k, 10), q)
            out = jax.vmap(lambda w, xg: mlp.forward(mlp.layers_of(w), xg))(
                ws, x.reshape(10, -1, x.shape[1]))
            return jnp.mean(mlp.nll(mlp.select_head(out, 0, 5), y.reshape(10, -1)))
        return jax.jit(jax.grad(loss))

    fns = {"mle": (jax.jit(jax.grad(lambda p: jnp.mean(mlp.nll(mlp.apply(p, x, 0), y)))),
                   (params,)),
           "vcl": (vcl_grad(mf.sample_many), (q, key))}
    return _best_and_median(interleaved_times(
        {name: functools.partial(_blocking, fn, args) for name, (fn, args) in fns.items()},
        repeats))


def train_step_comparison(n_images: int = 12_000, repeats: int = 11) -> dict:
    """One full-batch train step (gradient and update) of each method as the ``paper`` preset
    builds it, on ``n_images`` images, timed interleaved (best and median of ``repeats``):
    MLE and VCL with Adam, natural-gradient VCL with its own update under its default
    estimator (``local``: noise per example) and under one shared weight draw (``grouped``,
    K = 1, the cost floor of a variational step)."""
    from vcl_jax.continual import vcl_ng
    from vcl_jax.models import bayes_mlp, mlp
    from vcl_jax.training.state import TrainState, make_train_step, optimizer_for

    cfg = PRESETS["paper"]
    setup = split_mnist_setup.Setup(cfg)
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(key, (n_images, 784))
    batch = split_mnist_setup.task_batch(x, jnp.zeros((n_images,), jnp.int32), 0)
    params = mlp.init_mlp(key, 784, cfg.model.hidden, len(cfg.data.groups), 2,
                          cfg.model.head_init_std)

    def one_draw(q, b, k):
        return bayes_mlp.expected_nll(q, b["x"], b["y"], b["head"], k, estimator="grouped",
                                      n_samples=1, weight=b["w"])

    methods = {"mle": setup.mle, "vcl (grouped, K=10)": setup.vcl,
               f"vcl_ng ({cfg.vcl_ng.ng_estimator}, K={cfg.vcl_ng.ng_train_samples})": setup.vcl_ng,
               "vcl_ng (grouped, K=1)": vcl_ng(None, expected_loss=one_draw, log_var_init=-6.0)}
    fns = {}
    for name, method in methods.items():
        opt = optimizer_for(method, setup.learning_rate(method))
        state = TrainState.create(method, opt, params)
        q, ms = method.begin_task(state.trainable, state.method_state, 0, n_images)
        state = state._replace(trainable=q, method_state=ms)
        step = jax.jit(make_train_step(method, opt))
        fns[name] = functools.partial(_blocking, step, (state, batch, key))
    return _best_and_median(interleaved_times(fns, repeats))


def _best_and_median(times: dict[str, list[float]]) -> dict:
    return {name: {"best_ms": 1e3 * min(t), "median_ms": 1e3 * sorted(t)[len(t) // 2]}
            for name, t in times.items()}


def _print_steps(what: str, steps: dict) -> None:
    """One line per timed step: best and median, and the median over MLE's."""
    mle_ms = steps["mle"]["median_ms"]
    for name, r in steps.items():
        print(f"{what.format(name=name)}, 12,000 images: best {r['best_ms']:.0f} ms, median "
              f"{r['median_ms']:.0f} ms ({r['median_ms'] / mle_ms:.2f}× MLE)", flush=True)


def _blocking(fn, args):
    jax.block_until_ready(fn(*args))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--estimators", default="grouped,paper")
    parser.add_argument("--all-runs", action="store_true",
                        help="time the whole five-run comparison, not VCL alone")
    parser.add_argument("--grad-var", default="paper,grouped,local",
                        help="estimators whose gradient variance is measured ('' to skip)")
    parser.add_argument("--step-comparison", action="store_true",
                        help="also time the grouped VCL gradient vs MLE")
    parser.add_argument("--train-steps", action="store_true",
                        help="also time one train step of MLE, VCL and natural-gradient VCL")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "split_mnist_results.json"))
    args = parser.parse_args(argv)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
               "jax": jax.__version__, "protocols": []}
    runs = PUBLISHED if args.all_runs else ("vcl",)
    for est in filter(None, args.estimators.split(",")):
        r = time_protocol(est, runs)
        gflops = gemm_gflops()  # the machine's matmul rate, measured right after the runs
        r["matmul_gflops"] = gflops
        results["protocols"].append(r)
        for run, t in r["runs"].items():
            bound = t["training_gflop"] / gflops
            print(f"split-MNIST paper protocol ({r['train_images_per_task']} images/task), "
                  f"{run}, {est} estimator: {t['wall_s']:.1f} s total ({t['train_s']:.1f} s "
                  f"training, {t['coreset_s']:.1f} s coreset tuning, {t['eval_s']:.1f} s "
                  f"evaluation); final average accuracy {100 * t['final_average_accuracy']:.2f}%; "
                  f"training {t['training_gflop']:.0f} GFLOP = {bound:.1f} s at the matmul "
                  f"rate ({gflops:.0f} GFLOP/s): training took {t['train_s'] / bound:.1f}× "
                  f"that bound", flush=True)
        print(f"all {len(runs)} run(s), {est} estimator: {r['wall_s']:.1f} s", flush=True)
    if args.grad_var:
        var = gradient_variance(args.grad_var.split(","))
        results["gradient_variance"] = var
        base = var.get("paper")
        for est, v in var.items():
            ratio = f" ({v / base:.2f}× paper)" if base else ""
            print(f"gradient variance, {est} estimator: {v:.4g}{ratio}", flush=True)
    if args.step_comparison:
        results["step_comparison"] = step_comparison()
        _print_steps("{name} gradient", results["step_comparison"])
    if args.train_steps:
        results["train_step_comparison"] = train_step_comparison()
        _print_steps("train step, {name}", results["train_step_comparison"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
