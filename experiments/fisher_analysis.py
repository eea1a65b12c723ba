"""Fisher geometry of a trained diffusion model (the rank-1 paper's Figures 1–3).

    python -m experiments.fisher_analysis --run runs/rank1_ewc_cpu [--method mle]
        [--task 4] [--timesteps 1,100,200,300,400] [--n-samples 128] [--out DIR]

Reads a ``rank1_ewc`` run directory, restores the method's checkpoint after the task
(default: the last finished one) and analyses that task's training images. Writes
``analysis.json``, ``fisher_analysis.png`` and ``summary.md`` to ``--out`` (default:
``<run>/fisher_analysis/<method>_task<k>``).
"""

from __future__ import annotations

import argparse
import os

from vcl_jax.analysis import fisher_analysis as fa
from vcl_jax.cli import command
from vcl_jax.configs.rank1_ewc import parse_method


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a rank1_ewc run directory")
    p.add_argument("--method", default=None, help="default: the run's first method")
    p.add_argument("--task", type=int, default=None, help="default: the last finished task")
    p.add_argument("--timesteps", default="", help="comma-separated; default: evenly spaced")
    p.add_argument("--n-timesteps", type=int, default=12)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--data-dir", default=None, help="folder with local dataset files")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg = fa.FisherAnalysisConfig(
        timesteps=tuple(int(t) for t in args.timesteps.split(",") if t.strip()),
        n_timesteps=args.n_timesteps, n_samples=args.n_samples, chunk=args.chunk,
        seed=args.seed).validate()
    setup, tasks, params, method, task = fa.load_run(args.run, args.method, args.task,
                                                         args.data_dir)
    result = fa.analyse(setup, params, tasks[task], cfg, progress=not args.quiet)
    result.update(run=os.path.abspath(args.run), method=method, task=task)
    out = args.out or os.path.join(args.run, "fisher_analysis",
                                   f"{parse_method(method).dir}_task{task}")
    fa.write(out, result, f"{setup.cfg.data.dataset}, {method} after task {task + 1}")
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read())
    return result


if __name__ == "__main__":
    raise SystemExit(command(main))
