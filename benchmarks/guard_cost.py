"""The cost of the per-epoch divergence check on the `cpu` preset's training.

    python -m benchmarks.guard_cost [--rounds 12]

An epoch of the `cpu` preset (U-Net n_feat 16, batch 64, 8 steps per jitted call; one
full-MNIST digit of ~5,900 images is 93 steps, here 96 steps on fixed random images) of
MLE and VCL, with and without `train_epochs`' check of the loss terms and every trainable
leaf for non-finite values, interleaved round by round. Both wait for the epoch's metrics
as floats, as `train_epochs` does; the difference is the check alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmarks.run import make_epoch
from benchmarks.timing import interleaved_times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "guard_cost_results.json"))
    args = parser.parse_args(argv)
    out = {}
    for method in ("mle", "vcl"):
        fns = {c: make_epoch(16, method, 64, args.steps, 8, check=c == "check")
               for c in ("plain", "check")}
        t = interleaved_times(fns, args.rounds)
        med = {k: statistics.median(v) for k, v in t.items()}
        out[method] = {"epoch_s": med, "overhead": med["check"] / med["plain"] - 1.0,
                       "rounds": args.rounds, "steps": args.steps}
        print(f"{method}: epoch {med['plain']:.3f} s plain, {med['check']:.3f} s with the check "
              f"(median of {args.rounds}): overhead {100 * out[method]['overhead']:+.2f}%",
              flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
