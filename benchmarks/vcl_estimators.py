"""VCL-diffusion estimators: step cost and gradient variance.

    python -m benchmarks.vcl_estimators [--n-feat 16] [--batch 64] [--k 8] [--draws 32]

At the `cpu` preset's U-Net, batch and learning rate:

* **step time** (ms, best of 2 after warm-up, steps run as the preset runs them: unrolled
  chunks) of MLE and of VCL with K weight draws per step under each estimator: ``paper``
  (every draw over the whole batch) and ``grouped`` (draw k over the k-th slice), and K = 1
  (where both are the same);
* **gradient variance** of each estimator at the first VCL task's starting point (means =
  an MLE fit of digit 0, log-variance −10, as the preset starts VCL): the gradient of the
  expected loss w.r.t. the posterior's means and log-variances, over ``--draws`` random keys
  on one fixed batch of digit-0 images; reported as the sum over parameters of the
  per-coordinate variance, for the means and for the log-variances. The KL is deterministic,
  so it adds no variance and is left out.

Prints a table and writes ``benchmarks/vcl_estimators_results.json``; ratios are to MLE
(time) and to the ``paper`` estimator (variance), measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from vcl_jax.config import override
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.protocols import vcl_diffusion_mle, vcl_diffusion_setup
from vcl_jax.training.state import TrainState, make_train_step


def _setup(n_feat: int, batch: int, k: int, estimator: str, extra=()):
    cfg = override(PRESETS["cpu"], [f"n_feat={n_feat}", f"batch_size={batch}",
                                    f"train_samples={k}", f"estimator={estimator}", *extra])
    return vcl_diffusion_setup.build(cfg)


def step_ms(setup, method: str, data: dict, steps: int, repeats: int = 2) -> float:
    params = setup.init_params(jax.random.key(0))
    m = setup.method(method, params)
    opt = setup.optimizer(m)  # Adam, or natural-gradient VCL's own update
    state = TrainState.create(m, opt, params)
    tr, ms = m.begin_task(state.trainable, state.method_state, 0, 500)
    state = [state._replace(trainable=tr, method_state=ms)]
    runner = setup.runner(make_train_step(m, opt), method)

    def epoch():
        state[0], metrics = runner(state[0], data, jax.random.key(2))
        jax.block_until_ready(metrics)

    epoch()  # compile
    best = min(_timed(epoch) for _ in range(repeats))
    return 1e3 * best / steps


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gradient_variance(n_feat: int, batch: int, k: int, estimators: list[str], draws: int,
                      pretrain_epochs: int) -> dict:
    """Sum of per-coordinate gradient variances (means, log-variances) per estimator
    (``K=1``: one draw over the whole batch)."""
    setup = _setup(n_feat, batch, k, "paper", ["classes=0",
                                               f"vcl_pretrain_epochs={pretrain_epochs}"])
    x_all = vcl_diffusion_setup.load_tasks(setup.cfg)[0]
    params = vcl_diffusion_mle.pretrain_mle(setup, setup.init_params(jax.random.key(0)), x_all,
                                        jax.random.key(1), progress=False)
    data = {"x": jnp.asarray(x_all[:batch]), "task": jnp.zeros(batch, jnp.int32)}
    out = {}
    for est in estimators:
        s = (_setup(n_feat, batch, 1, "paper", ["classes=0"]) if est == "K=1"
             else _setup(n_feat, batch, k, est, ["classes=0"]))
        m = s.method("vcl", params)
        q, ms = m.init(params)
        q, ms = m.begin_task(q, ms, 0, len(x_all))

        @jax.jit
        def grad(key, m=m, ms=ms, q=q):
            return jax.grad(lambda q: m.loss(q, ms, data, key)[1]["loss"])(q)

        grads = [grad(key) for key in jax.random.split(jax.random.key(3), draws)]
        grads = jax.tree.map(lambda *g: jnp.stack(g), *grads)
        var = {part: float(sum(jnp.sum(jnp.var(g, axis=0)) for g in jax.tree.leaves(tree)))
               for part, tree in (("mean", grads.mean), ("log_var", grads.log_var))}
        out[est] = var
        print(f"gradient variance, {est}: means {var['mean']:.4g}, log-variances "
              f"{var['log_var']:.4g}", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-feat", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=8, help="weight draws (grouped: divides --batch)")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed call")
    parser.add_argument("--draws", type=int, default=32, help="keys for the gradient variance")
    parser.add_argument("--pretrain-epochs", type=int, default=40,
                        help="MLE epochs on digit 0 before the variance is measured")
    parser.add_argument("--conv-impls", default="auto",
                        help="comma-separated conv_impl values to time (auto, xla, im2col)")
    parser.add_argument("--weight-draws", default="loop",
                        help="comma-separated layouts of the K draws to time (loop: the CPU "
                             "default; vmap needed > 18 GiB at 8 steps per call here once)")
    parser.add_argument("--k1-only", action="store_true",
                        help="time MLE, VCL and natural-gradient VCL at K = 1 only (each VCL "
                             "with deterministic and with sampled GroupNorm parameters)")
    parser.add_argument("--skip-variance", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "vcl_estimators_results.json"))
    args = parser.parse_args(argv)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
               "jax": jax.__version__, "n_feat": args.n_feat, "batch": args.batch, "K": args.k,
               "step_ms": {}}
    b, steps = args.batch, args.steps
    data = {"x": jax.random.uniform(jax.random.key(1), (b * steps, 28, 28, 1)),
            "task": jnp.zeros(b * steps, jnp.int32)}
    # K = 1: VCL and natural-gradient VCL with the GroupNorm parameters deterministic
    # (the preset) and drawn from the posterior (``norms``, as the vcl_ng runs train)
    runs = [("mle", 1, "paper", "-", False)] + [
        (m, 1, "paper", "-", norms) for m in ("vcl", "vcl_ng") for norms in (False, True)] + [
        ("vcl", args.k, est, layout, False) for layout in args.weight_draws.split(",")
        for est in ("grouped", "paper") if not args.k1_only]
    for impl in [] if args.skip_timing else filter(None, args.conv_impls.split(",")):
        for method, k, est, layout, norms in runs:
            name = "mle" if method == "mle" else f"{method}_K{k}" + (
                f"_{est}_{layout}" if k > 1 else "") + ("_norms" if norms else "")
            extra = [f"conv_impl={impl}", f"unroll={steps}"]
            extra += ["variational_norms=true"] if norms else []
            extra += [f"weight_draws={layout}"] if k > 1 else []
            setup = _setup(args.n_feat, b, k, est, extra)
            t = time.perf_counter()
            ms = step_ms(setup, method, data, steps)
            results["step_ms"][f"{impl}/{name}"] = ms
            mle = results["step_ms"][f"{impl}/mle"]
            print(f"{impl} conv, {name}: {ms:.0f} ms/step ({ms / mle:.2f}× MLE; "
                  f"{time.perf_counter() - t:.0f} s with compile)", flush=True)
    if not args.skip_variance:
        var = gradient_variance(args.n_feat, b, args.k, ["paper", "grouped", "K=1"],
                                args.draws, args.pretrain_epochs)
        results["gradient_variance"] = var
        base = var["paper"]
        print("\n| estimator | variance, means (vs paper) | variance, log-variances (vs paper) |"
              "\n|---|---|---|")
        for est, v in var.items():
            print(f"| {est} | {v['mean']:.4g} ({v['mean'] / base['mean']:.2f}×) | "
                  f"{v['log_var']:.4g} ({v['log_var'] / base['log_var']:.2f}×) |")
    if args.skip_timing or args.skip_variance:  # keep the other half of an earlier run
        old = json.load(open(args.out)) if os.path.exists(args.out) else {}
        results = {**old, **{k: v for k, v in results.items() if v != {}}}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
