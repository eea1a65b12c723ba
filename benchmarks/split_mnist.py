"""Split-MNIST VCL timing: the whole 5-task protocol at paper size on this machine.

    python -m benchmarks.split_mnist [--estimators grouped,paper] [--out FILE]

The `paper` protocol is VCL without coreset, 10 weight samples per step, 120
full-batch epochs per task, 100 test draws. Offline there is no full MNIST, so
each task's `mnist-5k` training images are tiled up to 12,000 (the paper's
~12,000 per task) for this timing only; the official test digits are used as
they are. Wall time covers everything from the first task to the last
evaluation, compilation included (data loading excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax

from vcl_jax.config import override
from vcl_jax.protocols import split_mnist
from vcl_jax.protocols.split_mnist_config import PRESETS


def time_protocol(estimator: str, tile_to: int = 12_000) -> dict:
    cfg = override(PRESETS["cpu"], [f"estimator={estimator}", f"tile_to={tile_to}", "runs=vcl"])
    tasks = split_mnist.load_tasks(cfg)
    runner = split_mnist.Runner(cfg)
    t0 = time.perf_counter()
    result = split_mnist.run_one(runner, "vcl", tasks, progress=False)
    wall = time.perf_counter() - t0
    return {"estimator": estimator, "train_images_per_task": [len(t.y) for t in tasks],
            "wall_s": wall, "train_s": result["train_s"], "eval_s": result["eval_s"],
            "final_average_accuracy": result["average"][-1]}


def gradient_variance(estimators: list[str], draws: int = 64) -> dict:
    """Variance of each estimator's gradient (w.r.t. the posterior means and log-variances),
    summed over parameters, at the first VCL posterior of the `cpu` preset's task 0/1
    (MLE-fit means, log-variance −6), on the task's 1,000 training images, K = 10."""
    import jax.numpy as jnp

    from vcl_jax.models import bayes_mlp, mlp

    cfg = PRESETS["cpu"]
    task = split_mnist.load_tasks(cfg)[0]
    runner = split_mnist.Runner(cfg)
    data = split_mnist.task_batch(task.x, task.y, 0)
    params = mlp.init_mlp(jax.random.PRNGKey(0), task.x.shape[1], cfg.hidden,
                          len(cfg.groups), len(cfg.groups[0]))
    params, _ = runner.fit_mle(params, (), data, jax.random.PRNGKey(1))
    q, _ = runner.vcl.init(params)
    out = {}
    for est in estimators:
        def grad(key, est=est):
            return jax.grad(lambda q: bayes_mlp.expected_nll(
                q, data["x"], data["y"], 0, key, estimator=est, n_samples=10))(q)

        grads = jax.lax.map(grad, jax.random.split(jax.random.PRNGKey(2), draws))
        var = sum(float(jnp.sum(jnp.var(g, axis=0))) for g in jax.tree.leaves(grads))
        out[est] = var
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--estimators", default="grouped,paper")
    parser.add_argument("--tile-to", type=int, default=12_000)
    parser.add_argument("--grad-var", default="paper,grouped,local",
                        help="estimators whose gradient variance is measured ('' to skip)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "split_mnist_results.json"))
    args = parser.parse_args(argv)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
               "jax": jax.__version__, "runs": []}
    for est in filter(None, args.estimators.split(",")):
        r = time_protocol(est, args.tile_to)
        results["runs"].append(r)
        print(f"split-MNIST VCL, paper protocol ({r['train_images_per_task'][0]} images/task), "
              f"{est} estimator: {r['wall_s']:.1f} s total ({r['train_s']:.1f} s training), "
              f"final average accuracy {100 * r['final_average_accuracy']:.2f}%", flush=True)
    if args.grad_var:
        var = gradient_variance(args.grad_var.split(","))
        results["gradient_variance"] = var
        base = var.get("paper")
        for est, v in var.items():
            ratio = f" ({v / base:.2f}× paper)" if base else ""
            print(f"gradient variance, {est} estimator: {v:.4g}{ratio}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
