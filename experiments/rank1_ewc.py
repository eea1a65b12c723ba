"""Rank-1 Fisher EWC, diagonal EWC and generative distillation for diffusion models.

    python -m experiments.rank1_ewc --preset cpu [--run-dir DIR] [key=value ...]

e.g. ``dataset=mnist``, ``methods=distill,ewc_rank1+distill``, ``ewc_lambda=2e4``,
``fisher_t_min=300``. Re-running the same command on the same run directory resumes
after the last finished task of each method.
"""

from __future__ import annotations

from vcl_jax.cli import command, experiment_main
from vcl_jax.configs.rank1_ewc import PRESETS
from vcl_jax.protocols import rank1_ewc


def main(argv=None) -> dict:
    return experiment_main(argv, doc=__doc__, name="rank1_ewc", presets=PRESETS,
                           run=rank1_ewc.run)


if __name__ == "__main__":
    raise SystemExit(command(main))
