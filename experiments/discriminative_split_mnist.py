"""Discriminative split-MNIST VCL (Nguyen et al. 2018), the seed paper's Appendix A.

    python -m experiments.discriminative_split_mnist --preset cpu [--run-dir DIR] [key=value ...]

Runs MLE, VCL, and VCL with a random and a k-center coreset (``methods=...``, named as in
:mod:`vcl_jax.continual.methods`) on tasks 0/1, 2/3, 4/5, 6/7, 8/9 and writes the accuracy
matrix (``metrics.json``, ``accuracy_heatmap.png``, ``summary.md``). Overrides are config
fields, e.g. ``estimator=paper epochs=60``.
"""

from __future__ import annotations

from vcl_jax.cli import command, experiment_main
from vcl_jax.configs.split_mnist import PRESETS
from vcl_jax.protocols import split_mnist


def main(argv=None) -> dict:
    return experiment_main(argv, doc=__doc__, name="split_mnist", presets=PRESETS,
                           run=split_mnist.run)


if __name__ == "__main__":
    raise SystemExit(command(main))
