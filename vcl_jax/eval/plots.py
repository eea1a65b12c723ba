"""Figures: sample grids and metric curves (matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def grid_rows(folder: str, n_evals: int) -> list[dict[int, np.ndarray]]:
    """One row per evaluation ``samples_task{i}.npz`` in ``folder``: the first sample of
    each class it holds (``images [N, H, W(, 3)]`` in [0, 1], ``labels [N]``)."""
    import os

    rows = []
    for d in range(n_evals):
        with np.load(os.path.join(folder, f"samples_task{d}.npz")) as z:
            images, labels = z["images"], z["labels"]
        rows.append({int(c): images[np.argmax(labels == c)] for c in np.unique(labels)})
    return rows


def sample_grid(path: str, rows: list[dict[int, np.ndarray]], columns: list[int], title: str,
                row_labels: list[str] | None = None) -> None:
    """Row i = after task i, column j = class j; blank where class j is not yet seen.

    Args:
      path: PNG to write.
      rows: per row, a dict class -> image ``[H, W]`` or ``[H, W, 3]`` in [0, 1].
      columns: class order.
      title: figure title.
      row_labels: one label per row (default: "after task i").
    """
    n_r, n_c = len(rows), len(columns)
    fig, axes = plt.subplots(n_r, n_c, figsize=(1.0 * n_c + 0.8, 1.0 * n_r + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j, c in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if c in row:
                img = row[c]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            else:
                ax.set_facecolor("white")
                for s in ax.spines.values():
                    s.set_visible(False)
            if i == 0:
                ax.set_title(str(c), fontsize=9)
            if j == 0:
                label = row_labels[i] if row_labels else f"after task {i + 1}"
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def curves(path: str, series: dict[str, list[float]], *, xlabel: str, ylabel: str, title: str,
           log: bool = False, errors: dict[str, list[float]] | None = None) -> None:
    """One line per series against 1..len(series), with ±1 standard-error bars where
    ``errors`` gives them; whole-number ticks on the x axis."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        x = np.arange(1, len(ys) + 1)
        err = (errors or {}).get(name)
        if err is not None:
            ax.errorbar(x, ys, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(x, ys, marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def panels(path: str, panels: dict[str, dict[str, tuple[list[float], list[float]]]], *,
           xlabel: str, ylabel: str, title: str, log: bool = False) -> None:
    """One panel per key of ``panels`` (side by side, a shared y axis), each with one line
    per series ``name: (values, standard errors)`` against 1..len(values)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False,
                             sharey=True)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        for name, (ys, err) in series.items():
            ax.errorbar(np.arange(1, len(ys) + 1), ys, yerr=err, marker="o", capsize=3,
                        label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_class_curves(path: str, per_class: dict[str, dict[int, list[float]]], *, ylabel: str,
                     title: str, ncols: int | None = None) -> None:
    """One panel per run (``ncols`` to a row; default all in one): each class's metric after
    each task from the one it was learned in."""
    from matplotlib.ticker import MaxNLocator

    names = list(per_class)
    ncols = ncols or len(names)
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        for c, (first, ys) in per_class[name].items():
            ax.plot(np.arange(first + 1, first + 1 + len(ys)), ys, marker=".", label=str(c))
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tasks seen")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
