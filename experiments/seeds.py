"""Several seeds of a VCL-diffusion experiment side by side (reads their metrics.json).

    python -m experiments.seeds runs/cpu10_s0 runs/cpu10_s1 runs/cpu10_s2 [--out seeds.json]

Prints, per sub-run, the average uncertainty and the samples' accuracy after each task as the
mean over seeds ± its standard error over seeds, right-after quality and forgetting, each
sub-run's ratio to MLE, and whether VCL meets the issue's targets on every seed; ``--out``
also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

from vcl_jax.cli import command
from vcl_jax.protocols.vcl_diffusion_report import across_seeds, vcl_targets


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of experiments.vcl_diffusion")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    metrics = []
    for run in args.runs:
        path = os.path.join(run, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {run} has no metrics.json (not a finished run)")
        with open(path) as f:
            metrics.append(json.load(f))
    names = [n for n in metrics[0]["runs"] if all(n in m["runs"] for m in metrics)]
    out = {"runs": {n: across_seeds(metrics, n) for n in names}}
    fmt = lambda p: f"{p[0]:.3g} ± {p[1]:.2g}"  # noqa: E731
    print(f"seeds {out['runs'][names[0]]['seeds']}; mean over seeds ± SE over seeds\n")
    for n, r in out["runs"].items():
        extra = "".join(f", {k.replace('_', ' ')} {fmt(r[k])}"
                        for k in ("right_after", "forgetting") if k in r)
        print(f"{n}: " + ", ".join(fmt(p) for p in r["after_task"]) + extra)
        print(f"{n} sample accuracy: " + ", ".join(fmt(p) for p in r["accuracy_after_task"]))
    if "mle_coreset0" in out["runs"]:
        mle = [p[0] for p in out["runs"]["mle_coreset0"]["after_task"]]
        for n, r in out["runs"].items():
            if n != "mle_coreset0":
                ratios = [p[0] / m for p, m in zip(r["after_task"], mle, strict=False)]
                print(f"{n} / MLE: " + ", ".join(f"{x:.3g}" for x in ratios))
    if {"mle_coreset0", "vcl_coreset0"} <= set(names):
        out["targets"] = vcl_targets(metrics)
        print(json.dumps(out["targets"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    raise SystemExit(command(main))
