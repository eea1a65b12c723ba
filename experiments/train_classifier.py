"""Train (or reload from the cache) the evaluation classifier of a dataset.

    python -m experiments.train_classifier --dataset mnist [--variant full|5k] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json

from vcl_jax.cli import command
from vcl_jax.eval.classifier import get_classifier


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "cifar10"])
    parser.add_argument("--variant", default="full",
                        help="training set: full, or 5k (MNIST's 500-per-digit subset)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    clf = get_classifier(args.dataset, data_dir=args.data_dir, variant=args.variant)
    print(json.dumps(clf.info, indent=2))
    return clf.info


if __name__ == "__main__":
    raise SystemExit(command(main))
