"""Task streams as data: which classes each task of a continual-learning run holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from vcl_jax.data.sources import Dataset


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's examples.

    Attributes:
      index: position in the stream (0-based).
      classes: the dataset classes the task holds.
      images: ``[N, H, W, C]`` uint8.
      labels: ``[N]`` int32 dataset labels.
      local_labels: ``[N]`` int32 position of each label in ``classes`` (multi-head targets).
    """

    index: int
    classes: tuple[int, ...]
    images: np.ndarray
    labels: np.ndarray
    local_labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class TaskStream:
    """An ordered grouping of classes into tasks (class-incremental by default).

    Attributes:
      groups: one tuple of class labels per task.
    """

    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not self.groups:
            raise ValueError("a task stream needs at least one task")
        seen: set[int] = set()
        for i, g in enumerate(self.groups):
            if not g:
                raise ValueError(f"task {i} holds no class; every task needs at least one")
            dup = seen.intersection(g)
            if dup or len(set(g)) != len(g):
                raise ValueError(f"task {i} repeats class(es) {sorted(dup or g)}; "
                                 f"each class belongs to one task")
            seen.update(g)

    @classmethod
    def one_class_per_task(cls, classes: Iterable[int] = range(10)) -> TaskStream:
        """Digits 0..9, one per task (the VCL-diffusion protocol)."""
        return cls(tuple((int(c),) for c in classes))

    @classmethod
    def pairs(cls, classes: Iterable[int] = range(10)) -> TaskStream:
        """Consecutive pairs: (0,1), (2,3), … (split MNIST, the rank-1 EWC protocol)."""
        classes = [int(c) for c in classes]
        if len(classes) % 2:
            raise ValueError(f"pairs need an even number of classes, got {len(classes)}")
        return cls(tuple(zip(classes[::2], classes[1::2], strict=True)))

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]]) -> TaskStream:
        """Any explicit grouping, e.g. ``[[0, 1, 2], [3, 4]]``."""
        return cls(tuple(tuple(int(c) for c in g) for g in groups))

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(c for g in self.groups for c in g)

    def task_of_class(self, label: int) -> int:
        for i, g in enumerate(self.groups):
            if label in g:
                return i
        raise ValueError(f"class {label} is in no task of {self.groups}")

    def task(self, i: int, data: Dataset) -> Task:
        """Task ``i``'s subset of a dataset split."""
        if not 0 <= i < len(self):
            raise IndexError(f"task {i} out of range: the stream has {len(self)} tasks")
        classes = self.groups[i]
        mask = np.isin(data.labels, classes)
        if not mask.any():
            raise ValueError(f"task {i} (classes {classes}) has no examples in "
                             f"{data.name}/{data.split}")
        labels = data.labels[mask]
        lookup = {c: j for j, c in enumerate(classes)}
        local = np.asarray([lookup[int(y)] for y in labels], dtype=np.int32)
        return Task(i, classes, data.images[mask], labels, local)

    def split(self, data: Dataset) -> list[Task]:
        """All tasks' subsets of a dataset split, in order."""
        return [self.task(i, data) for i in range(len(self))]
