"""Diagnostics of a VCL-diffusion run (see ``vcl_jax.analysis.vcl_diagnostics``).

    python -m experiments.vcl_diagnostics drift --run DIR --task 1 [--method vcl_coreset0]
    python -m experiments.vcl_diagnostics spread --run DIR --task 3 [--method vcl_coreset0]
    python -m experiments.vcl_diagnostics noise --run DIR --task 0 --digit 0
        [--log-vars=-10,-14] [--n 60] [--average] [--method mle_coreset0]
    python -m experiments.vcl_diagnostics swap --run DIR --task 3 --digit 0
        --swaps ",null,norms,null+norms,all" [--source 0] [--n 60]

Prints a table and writes it as JSON next to the run (``diag_<kind>_<method>_task<d>.json``).
"""

from __future__ import annotations

import argparse
import json
import os

from vcl_jax.analysis import vcl_diagnostics
from vcl_jax.cli import command


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["drift", "spread", "noise", "swap"])
    parser.add_argument("--run", required=True, help="run directory of experiments.vcl_diffusion")
    parser.add_argument("--task", type=int, required=True, help="0-based task of the checkpoint")
    parser.add_argument("--method", default=None, help="sub-run, e.g. vcl_coreset0")
    parser.add_argument("--digit", type=int, default=0, help="noise, swap: the digit to sample")
    parser.add_argument("--log-vars", default="-10,-14",
                        help="noise: comma-separated ('' scores the point estimate alone)")
    parser.add_argument("--n", type=int, default=60, help="noise, swap: samples per row")
    parser.add_argument("--average", action="store_true", help="noise: add ε-averaged rows")
    parser.add_argument("--swaps", default=",null,norms,null+norms,deterministic,all",
                        help="swap: comma-separated sets of '+'-joined groups to put back "
                             f"({', '.join(vcl_diagnostics.GROUPS)}, all; '' = none)")
    parser.add_argument("--source", type=int, default=None,
                        help="swap: the earlier checkpoint (default: the first prior's means)")
    args = parser.parse_args(argv)
    if args.kind == "drift":
        rows = vcl_diagnostics.drift(args.run, args.task, args.method)
        for r in rows:
            print(f"{'random' if r['random'] else 'determ.'}  {r['group']:<16} size "
                  f"{r['size']:.3g}  change {r['change']:.3g}  relative {r['relative']:.2e}")
    elif args.kind == "spread":
        rows = vcl_diagnostics.spread(args.run, args.task, args.method)
        for r in rows:
            print(f"{r['group']:<16} mean RMS {r['size']:.3g}  log σ² {r['log_var_mean']:.2f} "
                  f"[{r['log_var_min']:.2f}, {r['log_var_max']:.2f}]  σ/RMS "
                  f"{r['sigma_over_rms']:.3f}")
    else:
        if args.kind == "swap":
            swaps = [tuple(g for g in sw.split("+") if g) for sw in args.swaps.split(",")]
            rows = vcl_diagnostics.swap_effect(args.run, args.task, args.digit, swaps,
                                               source=args.source, n=args.n,
                                               method=args.method)
        else:
            rows = vcl_diagnostics.noise_effect(
                args.run, args.task, args.digit,
                [float(v) for v in args.log_vars.split(",") if v.strip()],
                n=args.n, average=args.average, method=args.method)
        for r in rows:
            print(f"{r['weights']:<48} {r['uncertainty']:.2f} ± {r['stderr']:.2f} nats, "
                  f"{100 * r['accuracy']:.0f}% recognised (n = {r['n']})")
    name = f"diag_{args.kind}_{args.method or 'first'}_task{args.task}.json"
    with open(os.path.join(args.run, name), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    raise SystemExit(command(main))
