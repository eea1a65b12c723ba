"""Time and peak memory of the Fisher estimates from 1,000 per-sample gradients.

    python -m benchmarks.fisher [--n-feat 16] [--n 1000] [--chunk 128] [--out FILE]

For the rank-1 EWC U-Net (32×32×1, T = 400, random timestep per sample), estimates μ,
c and diag F with :func:`vcl_jax.continual.fisher_stats` (streamed over chunks, two
passes), and — the baseline, measured in the same run — by materialising all N per-sample
gradients and reducing them. Each measurement runs in its own subprocess so that its
peak resident memory (``ru_maxrss``) is its own; the figure reported is the peak minus
the resident memory just before the estimate (params, data and compiled code included in
neither). Compile time is excluded (one warm-up call on the same shapes first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(mode: str, n_feat: int, n: int, chunk: int) -> dict:
    """In this process: one warm-up, then the timed estimate."""
    import jax
    import jax.numpy as jnp

    from vcl_jax.continual.fisher import fisher_stats, per_example_grads, tree_dot
    from vcl_jax.diffusion.loss import example_loss_at, timestep_examples
    from vcl_jax.diffusion.schedule import linear_schedule
    from vcl_jax.models.unet import ContextUNet

    model = ContextUNet(n_feat=n_feat, n_tasks=10, channels=1)
    sched = linear_schedule(400)
    x = jax.random.uniform(jax.random.key(0), (n, 32, 32, 1), minval=-1, maxval=1)
    params = model.init(jax.random.key(1), x[:2], jnp.ones(2), jnp.zeros(2, jnp.int32),
                        jnp.ones(2, bool))["params"]
    data = timestep_examples(jax.random.key(2), x, jnp.arange(n) % 10, T=400)
    eps = lambda p: (lambda xx, t, d, k: model.apply({"params": p}, xx, t, d, k))
    loss = lambda p, ex: example_loss_at(eps(p), sched, ex)

    def streamed(d):
        s = fisher_stats(loss, params, d, chunk=chunk)
        return s.mean, s.diag, s.rank1_scale()

    def materialised(d):
        g = per_example_grads(loss, params, d, chunk=chunk)  # [N, ...params] held at once
        mean = jax.tree.map(lambda a: a.mean(0), g)
        diag = jax.tree.map(lambda a: (a * a).mean(0), g)
        proj = sum(jax.tree.leaves(jax.tree.map(
            lambda a, m: (a * m[None]).reshape(a.shape[0], -1).sum(1), g, mean)))
        return mean, diag, jnp.mean(proj**2) / tree_dot(mean, mean) ** 2

    fn = streamed if mode == "streamed" else materialised
    jax.block_until_ready(fn(jax.tree.map(lambda a: a[: min(n, chunk)], data)))  # compile
    if mode == "materialised" and n > chunk:  # the last, shorter chunk shape compiles too
        jax.block_until_ready(fn(jax.tree.map(lambda a: a[: n % chunk or chunk], data)))
    before = _rss_mb()
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(data))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(a.size for a in jax.tree.leaves(params))
    return {"mode": mode, "seconds": seconds, "peak_extra_mb": peak - before,
            "n_params": int(n_params), "c": float(out[2]),
            "per_sample_grads_mb": n * n_params * 4 / 2**20}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-feat", type=int, default=16)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                 "fisher_results.json"))
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args.n_feat, args.n, args.chunk)))
        return {}
    rows = []
    for mode in ("streamed", "materialised"):
        cmd = [sys.executable, "-m", "benchmarks.fisher", "--mode", mode, "--n-feat",
               str(args.n_feat), "--n", str(args.n), "--chunk", str(args.chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{mode:13s} n_feat {args.n_feat}: {r['seconds']:.1f} s, "
              f"peak +{r['peak_extra_mb']:.0f} MiB (P = {r['n_params']:,}; "
              f"N·P·4 B = {r['per_sample_grads_mb']:.0f} MiB), "
              f"c = {r['c']:.4g}", flush=True)
    s, m = rows
    print(f"streamed/materialised: time {s['seconds'] / m['seconds']:.2f}×, "
          f"peak memory {s['peak_extra_mb'] / max(m['peak_extra_mb'], 1e-9):.3f}×")
    import jax

    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "devices": [str(d) for d in jax.devices()], "n": args.n, "chunk": args.chunk,
              "n_feat": args.n_feat, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
