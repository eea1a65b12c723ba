"""``load(name, split)``: real image datasets from local files first, tfds otherwise.

Search order for local files:

1. ``data_dir`` given by argument (a folder holding the files, or a root with a
   sub-folder per dataset such as ``mnist-5k/`` or ``fashion-mnist/``);
2. the folders listed in ``$VCL_JAX_DATA_DIR`` (``os.pathsep``-separated roots,
   each with a sub-folder per dataset);
3. system folders (Debian's ``/usr/share/datasets``).

If none holds the dataset, ``tfds.data_source`` is tried (it needs no TensorFlow,
but needs internet the first time). A folder that holds some of the files but
not all, or a malformed file, is an error — never silently skipped.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from vcl_jax.data import cifar, idx
from vcl_jax.data.errors import DataError

ENV_VAR = "VCL_JAX_DATA_DIR"
SYSTEM_ROOTS = ("/usr/share/datasets",)
SPLITS = ("train", "test")

# Sub-folder names under a data root that may hold each dataset, in search order.
SUBDIRS = {
    "mnist": ("mnist", "MNIST", "mnist-5k"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST"),
    "cifar10": ("cifar10", "cifar-10-batches-bin", "cifar-10"),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": cifar.TRAIN_FILES, "test": cifar.TEST_FILES}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held in host memory.

    Attributes:
      images: ``[N, H, W, C]`` uint8.
      labels: ``[N]`` int32.
      name: dataset name (``mnist``, ``fashion_mnist``, ``cifar10``).
      split: ``train`` or ``test``.
      source: where it was read from (a folder, or ``tfds``).
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    split: str
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _expected_files(name: str, split: str) -> tuple[str, ...]:
    return _CIFAR_FILES[split] if name == "cifar10" else _IDX_FILES[split]


def _present(folder: str, base: str) -> str | None:
    """Path of ``base`` or ``base.gz`` in folder, or None."""
    for candidate in (base, base + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _holds_dataset(folder: str, name: str) -> bool:
    files = _expected_files(name, "train") + _expected_files(name, "test")
    return any(_present(folder, f) for f in files)


def _roots(data_dir: str | os.PathLike | None) -> list[tuple[str, bool]]:
    """Candidate roots as (path, may_hold_files_directly)."""
    roots: list[tuple[str, bool]] = []
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir):
            raise DataError(f"data directory {data_dir!r} (given as data_dir) does not exist")
        roots.append((data_dir, True))
    for entry in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        if not os.path.isdir(entry):
            raise DataError(f"${ENV_VAR} names {entry!r}, which does not exist; "
                            f"set it to a folder holding dataset sub-folders such as mnist-5k/")
        roots.append((entry, False))
    roots.extend((r, False) for r in SYSTEM_ROOTS if os.path.isdir(r))
    return roots


def find_local(name: str,
               data_dir: str | os.PathLike | None = None) -> tuple[str | None, list[str]]:
    """Finds the local folder holding ``name``.

    Returns:
      (folder or None, the folders looked in).
    """
    looked = []
    for root, direct in _roots(data_dir):
        candidates = [os.path.join(root, sub) for sub in SUBDIRS[name]]
        if direct:
            candidates.append(root)
        for folder in candidates:
            looked.append(folder)
            if os.path.isdir(folder) and _holds_dataset(folder, name):
                return folder, looked
    return None, looked


def _read_local(folder: str, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    bases = _expected_files(name, split)
    paths = [_present(folder, b) for b in bases]
    missing = [b for b, p in zip(bases, paths, strict=True) if p is None]
    if missing:
        raise DataError(f"{folder} holds {name} files but not {', '.join(missing)} (or .gz) "
                        f"needed for split {split!r}")
    if name == "cifar10":
        return cifar.read_cifar10_bin(paths)
    images = idx.read_idx(paths[0], expected_ndim=3)
    labels = idx.read_idx(paths[1], expected_ndim=1).astype(np.int32)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {paths[0]} holds {images.shape[0]} images but {paths[1]} "
                        f"holds {labels.shape[0]} labels; the two files do not belong together")
    if labels.size and labels.max() >= NUM_CLASSES[name]:
        raise DataError(f"{paths[1]}: label {labels.max()} out of range 0..{NUM_CLASSES[name] - 1}")
    return images[..., None], labels


def _read_tfds(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex["image"], dtype=np.uint8) for ex in examples])
    labels = np.asarray([int(ex["label"]) for ex in examples], dtype=np.int32)
    return images, labels


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a dataset split.

    Args:
      name: ``mnist``, ``fashion_mnist`` or ``cifar10``.
      split: ``train`` or ``test``.
      data_dir: optional folder searched before ``$VCL_JAX_DATA_DIR``.

    Returns:
      A :class:`Dataset` with uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``.

    Raises:
      DataError: unknown name or split, missing or malformed files, or no local
        files and tfds could not provide the data.
    """
    if name not in SUBDIRS:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(SUBDIRS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    folder, looked = find_local(name, data_dir)
    if folder is not None:
        images, labels = _read_local(folder, name, split)
        return Dataset(images, labels, name, split, source=folder)
    try:
        images, labels = _read_tfds(name, split)
    except Exception as e:  # tfds raises many kinds; all mean "not available here".
        files = ", ".join(f + "[.gz]" for f in _expected_files(name, split))
        raise DataError(
            f"no local copy of {name!r} and tfds could not provide it ({type(e).__name__}: {e}).\n"
            f"Looked in: {', '.join(looked) or '(no data folders configured)'}.\n"
            f"Offline machines need local files: put {files} in a folder such as "
            f"<root>/{SUBDIRS[name][0]}/ and pass --data-dir <root> or set "
            f"{ENV_VAR}=<root>.") from e
    return Dataset(images, labels, name, split, source="tfds")
