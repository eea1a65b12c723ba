"""Several seeds of a VCL-diffusion or rank-1 EWC experiment side by side (reads their
metrics.json).

    python -m experiments.seeds results/vcl_diffusion/coreset_s0 results/vcl_diffusion/coreset_s1 \
        [--out seeds.json] [--figures DIR] [--markdown table.md]
    python -m experiments.seeds results/rank1_ewc/mnist_s0 results/rank1_ewc/mnist_s1 ...

Rank-1 EWC runs (recognised by their config) get their own table: per method the average FD
after each task, the samples' accuracy right after each task and at the end, forgetting in
FD and accuracy, and the paired differences of forgetting behind the paper's ordering.

Prints, per sub-run, the average uncertainty and the samples' accuracy after each task as the
mean over seeds ± its standard error over seeds, right-after quality and forgetting, each
sub-run's ratio to MLE (at coreset 0, and at its own coreset size), and whether VCL meets the
issue's targets on every seed; ``--out`` also writes them as JSON, ``--figures`` draws the
seed paper's Figure 2 (one panel per coreset size, linear and log) and the per-digit curves,
``--markdown`` writes the table the README shows. The committed runs under ``results/``
regenerate every table from the repository.
"""

from __future__ import annotations

import argparse
import json
import os

from vcl_jax.analysis.seeds import (
    fd_across_seeds,
    fd_seeds_markdown,
    seed_figures,
    split_name,
    uncertainty_across_seeds,
    uncertainty_seeds_markdown,
    vcl_targets,
)
from vcl_jax.cli import command


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of experiments.vcl_diffusion")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--figures", default=None, help="draw the coreset panels in this folder")
    parser.add_argument("--markdown", default=None, help="write the table to this .md file")
    args = parser.parse_args(argv)
    metrics = []
    for run in args.runs:
        path = os.path.join(run, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {run} has no metrics.json (not a finished run)")
        with open(path) as f:
            metrics.append(json.load(f))
    if "replay" in metrics[0]["config"]:  # a rank-1 EWC experiment
        out = fd_across_seeds(metrics)
        table = fd_seeds_markdown(out)
        print(table)
        for path, text in ((args.out, json.dumps(out, indent=2)), (args.markdown, table)):
            if path:
                with open(path, "w") as f:
                    f.write(text)
        return out
    names = [n for n in metrics[0]["runs"] if all(n in m["runs"] for m in metrics)]
    out = {"runs": {n: uncertainty_across_seeds(metrics, n) for n in names}}
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
    for n, r in out["runs"].items():
        method, size = split_name(n)
        ref = out["runs"].get(f"mle_coreset{size}")
        if size and method != "mle" and ref:
            ratios = [p[0] / q[0] for p, q in zip(r["after_task"], ref["after_task"],
                                                   strict=False)]
            print(f"{n} / mle_coreset{size}: " + ", ".join(f"{x:.3g}" for x in ratios))
    if {"mle_coreset0", "vcl_coreset0"} <= set(names):
        out["targets"] = vcl_targets(metrics)
        print(json.dumps(out["targets"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    if args.figures:
        print("wrote " + ", ".join(seed_figures(metrics, args.figures)))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(uncertainty_seeds_markdown(metrics, out))
        print(f"wrote {args.markdown}")
    return out


if __name__ == "__main__":
    raise SystemExit(command(main))
