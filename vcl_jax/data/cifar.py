"""Reader for the binary version of CIFAR-10 (``cifar-10-batches-bin``).

The python-pickle batches are deliberately not supported: unpickling runs
arbitrary code. Each binary record is one label byte then 3,072 pixel bytes
(the red, green and blue 32×32 planes).
"""

from __future__ import annotations

import os

import numpy as np

from vcl_jax.data.errors import DataError

RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)


def read_cifar10_bin(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reads CIFAR-10 binary batches.

    Args:
      paths: the ``.bin`` files to concatenate.

    Returns:
      images ``[N, 32, 32, 3]`` uint8 and labels ``[N]`` int32.
    """
    images, labels = [], []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"CIFAR-10 binary file not found: {path}")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD:
            raise DataError(f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte "
                            f"CIFAR-10 records; the file is truncated or not the binary version")
        rec = raw.reshape(-1, RECORD)
        lab = rec[:, 0].astype(np.int32)
        if lab.max() > 9:
            raise DataError(f"{path}: label {lab.max()} out of range 0..9; "
                            "not a CIFAR-10 binary file")
        labels.append(lab)
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(images), np.concatenate(labels)
