"""Train (or reload from the cache) the evaluation classifier of a dataset.

    python -m experiments.train_classifier --dataset mnist [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json

from vcl_jax.eval.classifier import get_classifier


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "cifar10"])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    clf = get_classifier(args.dataset, data_dir=args.data_dir)
    print(json.dumps(clf.info, indent=2))
    return clf.info


if __name__ == "__main__":
    main()
