"""VCL for diffusion models: MLE vs VCL, with and without coresets.

    python -m experiments.vcl_diffusion --preset cpu [--run-dir DIR] [key=value ...]

Re-running the same command on the same run directory resumes after the last
finished task. Overrides are config fields, e.g. ``coreset_sizes=0,50``.
"""

from __future__ import annotations

from vcl_jax.cli import command, experiment_main
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.protocols import vcl_diffusion


def main(argv=None) -> dict:
    return experiment_main(argv, doc=__doc__, name="vcl_diffusion", presets=PRESETS,
                           run=vcl_diffusion.run)


if __name__ == "__main__":
    raise SystemExit(command(main))
