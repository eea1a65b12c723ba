"""Reload a VCL-diffusion checkpoint and sample chosen digits.

    python -m experiments.sample --run runs/vcl_diffusion_cpu --task 9 --digits 0,1,2 --n 16
        [--method vcl_coreset0] [--out samples.png | samples.npz] [--seed 0] [--average-draws]

``--task`` is the 0-based index of the finished task whose checkpoint to load
(as in ``samples_task<i>.npz``); the digits must have been seen by then.
``--average-draws`` (VCL): every image uses the noise prediction averaged over the
``eval_samples`` weight draws instead of one draw per image.
"""

from __future__ import annotations

import argparse
import os

from vcl_jax.analysis.sampling import sample_from_run
from vcl_jax.cli import command


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of experiments.vcl_diffusion")
    parser.add_argument("--task", type=int, default=None, help="0-based task; default: the last")
    parser.add_argument("--digits", default=None, help="comma-separated; default: all seen")
    parser.add_argument("--n", type=int, default=16, help="samples per digit")
    parser.add_argument("--method", default=None, help="e.g. vcl_coreset0; default: the first run")
    parser.add_argument("--out", default=None, help=".png grid or .npz; default: in the run dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--average-draws", action="store_true",
                        help="VCL: average ε over the weight draws (default: the run's setting)")
    args = parser.parse_args(argv)
    digits = [int(d) for d in args.digits.split(",")] if args.digits else None
    out = sample_from_run(args.run, task=args.task, digits=digits, n=args.n, method=args.method,
                          out=args.out, seed=args.seed,
                          average_draws=args.average_draws or None)
    print(f"wrote {os.path.abspath(out)}")
    return out


if __name__ == "__main__":
    raise SystemExit(command(main))
