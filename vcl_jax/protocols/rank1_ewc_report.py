"""Figures and the summary table of a rank-1 EWC run directory."""

from __future__ import annotations

import os

from vcl_jax.data import describe
from vcl_jax.eval import plots
from vcl_jax.eval.classifier import describe as describe_classifier
from vcl_jax.protocols.rank1_ewc_config import Rank1EWCConfig, method_dir


def write(run_dir: str, cfg: Rank1EWCConfig, results: dict, data: dict,
          classifier_info: dict) -> None:
    """Writes sample grids, the average-FD curve (the paper's Figure 4) and ``summary.md``."""
    for name, rec in results.items():
        # joint is evaluated once, after training on every task
        n_evals = 1 if name == "joint" else len(rec["history"])
        rows = plots.grid_rows(os.path.join(run_dir, method_dir(name)), n_evals)
        plots.sample_grid(os.path.join(run_dir, f"grid_{method_dir(name)}.png"), rows,
                          list(cfg.classes), f"{name}: row i = after task i, column j = class j")
    avg = {name: [h["avg_fd"] for h in rec["history"]] for name, rec in results.items()}
    plots.curves(os.path.join(run_dir, "fd.png"), avg, xlabel="tasks seen",
                 ylabel="average FD-classifier over seen tasks",
                 title=f"{cfg.dataset}: average FD-classifier (lower is better)")
    n = len(cfg.classes) // 2
    ref = "validation" if cfg.eval_split == "validation" else "test"
    lines = [f"# Rank-1 EWC — {cfg.dataset}", "",
             describe(data) + " " + describe_classifier(classifier_info), "",
             f"FD-classifier: Fréchet distance in the evaluation classifier's feature space "
             f"(not FID) between {cfg.eval_per_class} DDIM-{cfg.ddim_steps} samples per class "
             f"(η = {cfg.eval_eta:g}, guidance {cfg.eval_guidance:g}) "
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
