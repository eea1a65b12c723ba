"""Figures and the summary table of a rank-1 EWC run directory."""

from __future__ import annotations

import os

from vcl_jax.configs.rank1_ewc import Rank1EWCConfig, parse_method
from vcl_jax.data import data_text
from vcl_jax.eval import plots
from vcl_jax.eval.classifier import classifier_text


def write(run_dir: str, cfg: Rank1EWCConfig, metrics: dict) -> None:
    """Writes sample grids, the average-FD curve (the paper's Figure 4) and ``summary.md``
    of a run's metrics."""
    results = metrics["runs"]
    for name, rec in results.items():
        # joint is evaluated once, after training on every task
        n_evals = 1 if name == "joint" else len(rec["history"])
        rows = plots.grid_rows(os.path.join(run_dir, parse_method(name).dir), n_evals)
        plots.sample_grid(os.path.join(run_dir, f"grid_{parse_method(name).dir}.png"), rows,
                          list(cfg.data.classes),
                          f"{name}: row i = after task i, column j = class j")
    avg = {name: [h["avg_fd"] for h in rec["history"]] for name, rec in results.items()}
    plots.curves(os.path.join(run_dir, "fd.png"), avg, xlabel="tasks seen",
                 ylabel="average FD-classifier over seen tasks",
                 title=f"{cfg.data.dataset}: average FD-classifier (lower is better)")
    n = len(cfg.data.classes) // 2
    ref = "validation" if cfg.eval.eval_split == "validation" else "test"
    lines = [f"# Rank-1 EWC — {cfg.data.dataset}", "",
             data_text(metrics["data"]) + " " + classifier_text(metrics["classifier"]), "",
             f"FD-classifier: Fréchet distance in the evaluation classifier's feature space "
             f"(not FID) between {cfg.eval.eval_per_class} DDIM-{cfg.replay.ddim_steps} samples "
             f"per class "
             f"(η = {cfg.eval.eval_eta:g}, guidance {cfg.eval.eval_guidance:g}) "
             f"and the task's {ref} images; averaged over the tasks seen so far. Forgetting of "
             "a task: its FD after the last task minus its FD right after it was learned, "
             "averaged over all tasks but the last. Lower is better for both.", "",
             "| method | " + " | ".join(f"avg FD after {i + 1}" for i in range(n))
             + " | avg forgetting | sample accuracy | train s | replay s | Fisher s | eval s |",
             "|---|" + "---|" * (n + 6)]
    for name, rec in results.items():
        vals = [f"{v:.2f}" for v in avg[name]]
        s = rec["seconds"]
        lines.append(f"| {name} | " + " | ".join(vals)
                     + f" | {rec['avg_forgetting']:.2f} | "
                     f"{rec['history'][-1]['avg_accuracy']:.3f} | {s['train']:.0f} | "
                     f"{s['prepare']:.0f} | {s['end']:.0f} | {s['eval']:.0f} |")
    lines += ["", "Per-task FD after the last task and forgetting per task:", "",
              "| method | " + " | ".join(f"FD task {k + 1}" for k in range(n))
              + " | " + " | ".join(f"forgetting {k + 1}" for k in range(n - 1)) + " |",
              "|---|" + "---|" * (2 * n - 1)]
    for name, rec in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in rec["history"][-1]["fd"])
                     + " | " + " | ".join(f"{v:.2f}" for v in rec["forgetting"][:-1]) + " |")
    lines += ["", "Figures: `fd.png`, `grid_<method>.png`; samples: "
              "`<method>/samples_task<i>.npz`."]
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
