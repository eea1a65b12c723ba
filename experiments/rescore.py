"""Re-sample and re-score the checkpoints of a VCL-diffusion run (nothing is overwritten).

    python -m experiments.rescore --run DIR [--method vcl_coreset0] [--n 50] [--seed 1]
        [--tasks 0,3] [--weights draws|mean|average]
        [--sampler ddim --ddim-steps 100 --eta 1] [--guidance 0]

Writes ``rescore_<method>_<weights>_<sampler>[_a<guidance>]_n<n>_s<seed>.json`` in the run directory
(per task: average uncertainty ± its standard error, per digit) and prints the averages.
"""

from __future__ import annotations

import argparse
import json
import os

from vcl_jax.analysis.sampling import WEIGHTS, rescore
from vcl_jax.cli import command


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of experiments.vcl_diffusion")
    parser.add_argument("--method", default=None, help="sub-run, e.g. vcl_coreset0")
    parser.add_argument("--n", type=int, default=50, help="samples per seen digit")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", default=None, help="0-based checkpoints (default: all)")
    parser.add_argument("--weights", default="draws", choices=WEIGHTS)
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim"])
    parser.add_argument("--ddim-steps", type=int, default=None)
    parser.add_argument("--eta", type=float, default=None, help="DDIM's η (default: the run's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance weight α (default: the run's)")
    args = parser.parse_args(argv)
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else None
    out = rescore(args.run, method=args.method, n=args.n, seed=args.seed, tasks=tasks,
                  weights=args.weights, sampler=args.sampler, ddim_steps=args.ddim_steps,
                  eta=args.eta, guidance=args.guidance)
    a = out["args"]
    tag = f"{a['method']}_{a['weights']}_{a['sampler']}"
    tag += f"{a['ddim_steps']}_eta{a['eta']:g}" if a["sampler"] == "ddim" else ""
    tag += f"_a{a['guidance']:g}" if args.guidance is not None else ""
    path = os.path.join(args.run, f"rescore_{tag}_n{a['n']}_s{a['seed']}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    for h in out["history"]:
        digits = ", ".join(f"{k}: {v:.2f}" for k, v in h["per_class"].items())
        print(f"after task {h['task'] + 1}: {h['avg_uncertainty']:.3f} ± {h['avg_stderr']:.3f} "
              f"nats ({digits})")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    raise SystemExit(command(main))
