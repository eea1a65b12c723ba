"""Split-MNIST outputs: accuracy heat maps (the seed paper's Figure 3), curves, summary."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vcl_jax.configs.split_mnist import SplitMNISTConfig, parse_method  # noqa: E402
from vcl_jax.data import data_text
from vcl_jax.eval.plots import curves  # noqa: E402


def accuracy_matrix(rows: list[list[float]]) -> np.ndarray:
    """``[T, T+1]``: entry (t, i) = accuracy on task i after task t (NaN before it is seen);
    the last column is the average over seen tasks."""
    n = len(rows)
    mat = np.full((n, n + 1), np.nan)
    for t, row in enumerate(rows):
        mat[t, :len(row)] = row
        mat[t, n] = np.mean(row)
    return mat


def heatmaps(path: str, runs: dict[str, dict], task_names: list[str]) -> None:
    """One panel per run: rows = after task t, columns = tasks and their average."""
    names = list(runs)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mat = accuracy_matrix(runs[name]["accuracy"])
        ax.imshow(np.ma.masked_invalid(mat), vmin=0.5, vmax=1.0, cmap="viridis")
        for (t, i), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(i, t, f"{100 * v:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.8 else "black")
        ax.set_xticks(range(mat.shape[1]), [*task_names, "avg"], fontsize=7, rotation=45)
        ax.set_yticks(range(mat.shape[0]), [f"after {n}" for n in task_names], fontsize=7)
        ax.axvline(mat.shape[1] - 1.5, color="white", lw=2)
        ax.set_title(f"{name}: final avg {100 * mat[-1, -1]:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(cfg: SplitMNISTConfig, metrics: dict) -> str:
    task_names = ["/".join(map(str, g)) for g in cfg.data.groups]
    opt, v, ng = cfg.optim, cfg.vcl, cfg.vcl_ng
    lines = ["# Split-MNIST VCL", "",
             data_text(metrics["data"]) + f" Test images per task {metrics['test_sizes']}; "
             f"{opt.epochs} epochs per task, "
             f"batch {opt.batch_size or 'full'}, Adam {opt.learning_rate:g}; VCL: K = "
             f"{v.train_samples} ({v.estimator} estimator), {v.test_samples} test draws, "
             f"log-variance init {v.log_var_init:g}; coresets {cfg.coreset.coreset_size} per "
             f"task.", "",
             "Final per-task test accuracy (%) and average, after the last task:", "",
             "| run | " + " | ".join(task_names) + " | average | wall time (s) |",
             "|---|" + "---|" * (len(task_names) + 2)]
    for name, r in metrics["runs"].items():
        last = r["accuracy"][-1]
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in last) +
                     f" | **{100 * r['average'][-1]:.2f}** | {r['total_s']:.1f} |")
    lines += ["", "Average accuracy (%) over the tasks seen so far, after each task:", "",
              "| run | " + " | ".join(f"after {n}" for n in task_names) + " |",
              "|---|" + "---|" * len(task_names)]
    for name, r in metrics["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in r["average"]) + " |")
    spreads = {n: r["posterior_std"][-1] for n, r in metrics["runs"].items()
               if "posterior_std" in r}
    if spreads:
        lines += ["", "Posterior standard deviations after the last task, per layer "
                  "(5th / 50th / 95th percentile):", "", "| run | layer | 5% | 50% | 95% |",
                  "|---|---|---|---|---|"]
        for name, spread in spreads.items():
            for layer, (lo, mid, hi) in spread.items():
                lines.append(f"| {name} | {layer} | {lo:.2e} | {mid:.2e} | {hi:.2e} |")
    if any(parse_method(n).trainer == "vcl_ng" for n in metrics["runs"]):
        lines += ["", f"Natural-gradient VCL: step {ng.ng_learning_rate:g}, "
                  f"{ng.ng_train_samples} draw(s) per step ({ng.ng_estimator} estimator), "
                  f"KL weight {ng.ng_kl_scale:g}, h₀ {ng.ng_hess_init:g}, "
                  f"β₁ {ng.ng_b1:g}, β₂ {ng.ng_b2:g}, clip {ng.ng_clip}, curvature floor "
                  f"{ng.ng_floor}."]
    return "\n".join(lines) + "\n"


def write(run_dir: str, cfg: SplitMNISTConfig, metrics: dict) -> None:
    """``accuracy_heatmap.png``, ``average_accuracy.png`` and ``summary.md`` in ``run_dir``."""
    task_names = ["/".join(map(str, g)) for g in cfg.data.groups]
    runs = metrics["runs"]
    heatmaps(os.path.join(run_dir, "accuracy_heatmap.png"), runs, task_names)
    curves(os.path.join(run_dir, "average_accuracy.png"),
           {name: r["average"] for name, r in runs.items()}, xlabel="number of tasks",
           ylabel="average test accuracy over seen tasks", title="Split MNIST")
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(summary(cfg, metrics))
