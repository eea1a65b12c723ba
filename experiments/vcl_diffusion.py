"""VCL for diffusion models: MLE vs VCL, with and without coresets.

    python -m experiments.vcl_diffusion --preset cpu [--run-dir DIR] [key=value ...]

Re-running the same command on the same run directory resumes after the last
finished task. Overrides are config fields, e.g. ``coreset_sizes=0,50``.
"""

from __future__ import annotations

import argparse
import os

from vcl_jax.config import override, preset
from vcl_jax.protocols import vcl_diffusion
from vcl_jax.protocols.vcl_diffusion_config import PRESETS


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--run-dir", default=None, help="default: runs/vcl_diffusion_<preset>")
    parser.add_argument("--data-dir", default=None, help="folder with local dataset files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    cfg = override(preset(PRESETS, args.preset), args.overrides)
    if args.data_dir:
        cfg = override(cfg, [f"data_dir={args.data_dir}"])
    run_dir = args.run_dir or os.path.join("runs", f"vcl_diffusion_{args.preset}")
    metrics = vcl_diffusion.run(cfg, run_dir, progress=not args.quiet)
    print(open(os.path.join(run_dir, "summary.md")).read())
    return metrics


if __name__ == "__main__":
    main()
