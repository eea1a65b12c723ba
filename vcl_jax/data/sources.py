"""``load(name, split)``: real image datasets from local files first, tfds otherwise.

Search order for local files:

1. ``data_dir`` given by argument (a folder holding the files, or a root with a
   sub-folder per dataset such as ``mnist-full/`` or ``fashion-mnist/``);
2. the folders listed in ``$VCL_JAX_DATA_DIR`` (``os.pathsep``-separated roots,
   each with a sub-folder per dataset);
3. ``shared/data`` beside the repository checkout (this project's offline data);
4. system folders (Debian's ``/usr/share/datasets``).

A dataset comes in named *variants* (``full``; for MNIST also ``5k``, the balanced
500-per-digit subset), each with its own sub-folder names and training-set size.
Asking for a variant searches only its sub-folders and checks the size, so a run
never silently trains on another training set than its preset names.

If no root holds the dataset, ``tfds.data_source`` is tried for the ``full``
variant (it needs no TensorFlow, but needs internet the first time). A folder that
holds some of the files but not all, or a malformed file, is an error — never
silently skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from vcl_jax.data.cifar import TEST_FILES, TRAIN_FILES, read_cifar10_bin
from vcl_jax.data.errors import DataError
from vcl_jax.data.idx import read_idx

ENV_VAR = "VCL_JAX_DATA_DIR"
SYSTEM_ROOTS = ("/usr/share/datasets",)
# The project's offline data: ``shared/data`` beside the checkout holding this package.
CHECKOUT_ROOTS = (os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "..", "shared", "data"),)
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One named training set of a dataset.

    Attributes:
      subdirs: sub-folder names under a data root that hold it, in search order.
      n_train: the number of training images that identifies it.
      about: a few words for messages.
    """

    subdirs: tuple[str, ...]
    n_train: int
    about: str


VARIANTS = {
    "mnist": {
        "full": Variant(("mnist", "MNIST", "mnist-full"), 60_000, "the complete MNIST"),
        "5k": Variant(("mnist-5k",), 5_000, "the balanced 500-per-digit MNIST subset"),
    },
    "fashion_mnist": {
        "full": Variant(("fashion_mnist", "fashion-mnist", "FashionMNIST"), 60_000,
                        "the complete Fashion-MNIST"),
    },
    "cifar10": {
        "full": Variant(("cifar10", "cifar-10-batches-bin", "cifar-10"), 50_000,
                        "the complete CIFAR-10"),
    },
}
# Every sub-folder that may hold a dataset, whatever the variant (full first).
SUBDIRS = {name: tuple(d for v in variants.values() for d in v.subdirs)
           for name, variants in VARIANTS.items()}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": TRAIN_FILES, "test": TEST_FILES}
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
      variant: the variant asked for (``full``, ``5k``), or None if any was accepted.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    split: str
    source: str
    variant: str | None = None

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
    roots.extend((os.path.normpath(r), False) for r in CHECKOUT_ROOTS if os.path.isdir(r))
    roots.extend((r, False) for r in SYSTEM_ROOTS if os.path.isdir(r))
    return roots


def variants(name: str) -> tuple[str, ...]:
    """The variant names of a dataset (``("full",)`` for an unknown one: its error comes later)."""
    return tuple(VARIANTS.get(name, {"full": None}))


def check_variant(name: str, variant: str | None) -> None:
    """Raises a DataError unless ``variant`` is None or one of ``name``'s variants."""
    if variant is not None and variant not in VARIANTS[name]:
        raise DataError(f"unknown variant {variant!r} of {name}; accepted: "
                        f"{', '.join(VARIANTS[name])}")


def find_local(name: str, data_dir: str | os.PathLike | None = None,
               variant: str | None = None) -> tuple[str | None, list[str]]:
    """Finds the local folder holding ``name`` (of ``variant``'s sub-folders, if given).

    Returns:
      (folder or None, the folders looked in).
    """
    check_variant(name, variant)
    subdirs = VARIANTS[name][variant].subdirs if variant else SUBDIRS[name]
    looked = []
    for root, direct in _roots(data_dir):
        candidates = [os.path.join(root, sub) for sub in subdirs]
        if direct:
            candidates.append(root)
        for folder in candidates:
            looked.append(folder)
            if os.path.isdir(folder) and _holds_dataset(folder, name):
                return folder, looked
    return None, looked


def source_of(name: str, data_dir: str | os.PathLike | None = None,
              variant: str | None = None) -> str:
    """Where :func:`load` reads ``name`` from: a folder, or ``tfds`` when none holds it."""
    folder, _ = find_local(name, data_dir, variant)
    return folder or "tfds"


def fingerprint(arrays: list[np.ndarray]) -> str:
    """A checksum of a run's training arrays (dtype, shape and bytes of each, in order)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def data_record(name: str, data_dir: str | os.PathLike | None, variant: str | None,
           train_per_task: list[int], arrays: list[np.ndarray] | None = None) -> dict:
    """What a run trained on, for its ``metrics.json``: dataset, variant, folder, sizes, and
    with ``arrays`` (the tasks' training images) their :func:`fingerprint`."""
    out = {"dataset": name, "variant": variant, "source": source_of(name, data_dir, variant),
           "train_per_task": [int(n) for n in train_per_task]}
    return out if arrays is None else dict(out, sha256=fingerprint(arrays))


def identity(rec: dict) -> dict:
    """What the data of a :func:`record` is, without where it was read from: a resumed run
    may read the same data from another folder, but not other data under the same name."""
    return {k: v for k, v in rec.items() if k != "source"}


def data_text(rec: dict) -> str:
    """One sentence of ``summary.md`` for a :func:`record`."""
    return (f"Data: `{rec['dataset']}` (variant `{rec['variant']}`) read from "
            f"`{rec['source']}`; training images per task {rec['train_per_task']}.")


def _read_local(folder: str, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    bases = _expected_files(name, split)
    paths = [_present(folder, b) for b in bases]
    missing = [b for b, p in zip(bases, paths, strict=True) if p is None]
    if missing:
        raise DataError(f"{folder} holds {name} files but not {', '.join(missing)} (or .gz) "
                        f"needed for split {split!r}")
    if name == "cifar10":
        return read_cifar10_bin(paths)
    images = read_idx(paths[0], expected_ndim=3)
    labels = read_idx(paths[1], expected_ndim=1).astype(np.int32)
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


def _size_mismatch(name: str, variant: str, folder: str, n: int, looked: list[str]) -> DataError:
    """The error for a folder found for ``variant`` whose training split has another size."""
    want = VARIANTS[name][variant]
    other = next((k for k, v in VARIANTS[name].items() if v.n_train == n), None)
    held = f" ({VARIANTS[name][other].about}, variant {other!r})" if other else ""
    fix = f", or choose data_variant={other}" if other else ""
    return DataError(
        f"{folder} holds {n:,} {name} training images{held}, but this run needs "
        f"{want.about} (variant {variant!r}, {want.n_train:,}); its folders looked in: "
        f"{', '.join(looked)}. Put the {variant} files in <root>/{want.subdirs[-1]}/ and "
        f"pass --data-dir <root>{fix}.")


def _wrong_variant(name: str, variant: str, looked: list[str], data_dir) -> DataError | None:
    """The error for a missing ``variant`` when another variant of ``name`` is here, else None."""
    for other in VARIANTS[name]:
        if other == variant:
            continue
        folder, _ = find_local(name, data_dir, other)
        if folder is not None:
            want = VARIANTS[name][variant]
            return DataError(
                f"this run needs {want.about} ({name} variant {variant!r}, "
                f"{want.n_train:,} training images), but no folder holds it; looked in: "
                f"{', '.join(looked)}. Found only {VARIANTS[name][other].about} in {folder} "
                f"(variant {other!r}). Put the {variant} files in <root>/{want.subdirs[-1]}/ "
                f"beside {folder}, or choose data_variant={other}.")
    return None


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
         variant: str | None = None) -> Dataset:
    """Loads a dataset split.

    Args:
      name: ``mnist``, ``fashion_mnist`` or ``cifar10``.
      split: ``train`` or ``test``.
      data_dir: optional folder searched before ``$VCL_JAX_DATA_DIR``.
      variant: the training set wanted (``full``; ``5k`` for MNIST): only its sub-folders
        are searched, and a training split of another size is refused. None accepts any
        variant, the full one first.

    Returns:
      A :class:`Dataset` with uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``.

    Raises:
      DataError: unknown name, split or variant, missing or malformed files, a training
        split of another size than the variant's, or no local files and tfds could not
        provide the data.
    """
    if name not in SUBDIRS:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(SUBDIRS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    folder, looked = find_local(name, data_dir, variant)
    if folder is not None:
        images, labels = _read_local(folder, name, split)
        want = VARIANTS[name][variant] if variant else None
        if want and split == "train" and len(labels) != want.n_train:
            raise _size_mismatch(name, variant, folder, len(labels), looked)
        return Dataset(images, labels, name, split, source=folder, variant=variant)
    if variant not in (None, "full"):
        raise DataError(f"no folder holds {VARIANTS[name][variant].about} ({name} variant "
                        f"{variant!r}); looked in: {', '.join(looked) or '(none configured)'}")
    if variant == "full":
        wrong = _wrong_variant(name, variant, looked, data_dir)
        if wrong is not None:
            raise wrong
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
    return Dataset(images, labels, name, split, source="tfds", variant=variant)
