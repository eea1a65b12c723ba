"""Figures and the summary table of a rank-1 EWC run directory."""

from __future__ import annotations

import os

import numpy as np

from vcl_jax.data import data_text
from vcl_jax.eval import plots
from vcl_jax.eval.classifier import classifier_text
from vcl_jax.eval.metrics import mean_se
from vcl_jax.protocols.rank1_ewc_config import Rank1EWCConfig, parse_method


def write(run_dir: str, cfg: Rank1EWCConfig, results: dict, data: dict,
          classifier_info: dict) -> None:
    """Writes sample grids, the average-FD curve (the paper's Figure 4) and ``summary.md``."""
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
             data_text(data) + " " + classifier_text(classifier_info), "",
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


def scores(rec: dict) -> dict:
    """One method's summary numbers of one seed: the mean and the lowest accuracy right
    after each task; over the old tasks (all but the last) the accuracy right after and
    after the last task, their difference (forgetting in accuracy) and the FD forgetting;
    the final average FD."""
    hist = rec["history"]
    n = len(hist)
    right = [hist[k]["accuracy"][k] for k in range(n)]
    final = hist[-1]["accuracy"]
    return {"right_after_accuracy": float(np.mean(right)),
            "min_right_after_accuracy": float(np.min(right)),
            "old_right_after_accuracy": float(np.mean(right[:-1])),
            "old_final_accuracy": float(np.mean(final[:-1])),
            "accuracy_forgetting": float(np.mean([right[k] - final[k] for k in range(n - 1)])),
            "fd_forgetting": float(np.mean(rec["forgetting"][:-1])),
            "final_avg_fd": float(hist[-1]["avg_fd"])}


def across_seeds(metrics: list[dict]) -> dict:
    """Per method found in every seed's run: the average FD and accuracy after each task and
    :func:`scores`, each as (mean, SE) over seeds; and the paired differences of forgetting
    (FD and accuracy) between the paper's method and the two it claims to beat."""
    names = [n for n in metrics[0]["runs"] if all(n in m["runs"] for m in metrics)]
    out = {"seeds": [m["config"]["run"]["seed"] for m in metrics], "runs": {}, "differences": {},
           "reference_accuracy": metrics[0].get("reference_accuracy")}
    per_seed = {name: [scores(m["runs"][name]) for m in metrics] for name in names}
    for name in names:
        recs = [m["runs"][name] for m in metrics]
        n = len(recs[0]["history"])
        out["runs"][name] = {
            "avg_fd_after_task": [mean_se([r["history"][d]["avg_fd"] for r in recs])
                                  for d in range(n)],
            "avg_accuracy_after_task": [mean_se([r["history"][d]["avg_accuracy"] for r in recs])
                                        for d in range(n)],
            **{k: mean_se([s[k] for s in per_seed[name]]) for k in per_seed[name][0]},
            "minutes": mean_se([sum(r["seconds"].values()) / 60 for r in recs]),
        }
    for a, b in (("ewc_rank1+distill", "ewc_diag+distill"), ("ewc_rank1+distill", "distill")):
        if a in names and b in names:
            out["differences"][f"{a} - {b}"] = {
                k: mean_se([sa[k] - sb[k] for sa, sb in zip(per_seed[a], per_seed[b],
                                                           strict=True)])
                for k in ("fd_forgetting", "accuracy_forgetting")}
    return out


def seeds_markdown(out: dict) -> str:
    """The per-method table of :func:`across_seeds` (mean ± SE over seeds) and the paired
    differences behind the paper's ordering."""
    fmt = lambda p, f=".1f": f"{p[0]:{f}}" + ("" if np.isnan(p[1]) else f" ± {p[1]:{f}}")  # noqa: E731
    pct = lambda p: fmt((100 * p[0], 100 * p[1]), ".0f")  # noqa: E731
    runs = out["runs"]
    n = len(next(iter(runs.values()))["avg_fd_after_task"])
    seeds = ", ".join(map(str, out["seeds"]))
    what = ("mean over seeds ± SE over seeds" if len(out["seeds"]) > 1
            else "one seed, so no standard errors")
    lines = [f"Seed{'s' if len(out['seeds']) > 1 else ''} {seeds}; {what}. Accuracy: the "
             "evaluation classifier's on the samples; forgetting of a task: right after it "
             "minus after the last task (FD: after minus right after), averaged over the old "
             "tasks; minutes: the method's wall time.", "",
             "| method | " + " | ".join(f"avg FD after {d + 1}" for d in range(n))
             + " | right-after accuracy (min) | old tasks: right after → final accuracy "
             "| accuracy forgetting | FD forgetting | minutes |",
             "|---|" + "---|" * (n + 5)]
    for name, r in runs.items():
        lines.append(
            f"| {name} | " + " | ".join(fmt(p, ".0f") for p in r["avg_fd_after_task"])
            + f" | {pct(r['right_after_accuracy'])}%"
            + f" ({100 * r['min_right_after_accuracy'][0]:.0f}%)"
            + f" | {pct(r['old_right_after_accuracy'])}% → {pct(r['old_final_accuracy'])}%"
            + f" | {pct(r['accuracy_forgetting'])} | {fmt(r['fd_forgetting'])}"
            + f" | {fmt(r['minutes'])} |")
    if out.get("reference_accuracy"):
        ceiling = ", ".join(f"{100 * a:.1f}%" for a in out["reference_accuracy"])
        lines += ["", "The classifier's accuracy on each task's real reference images (the "
                  f"ceiling of sample accuracy): {ceiling}."]
    if out["differences"]:
        lines += ["", "| paired difference (per seed, then mean ± SE) | FD forgetting "
                  "| accuracy forgetting (points) |", "|---|---|---|"]
        for pair, d in out["differences"].items():
            lines.append(f"| {pair} | {fmt(d['fd_forgetting'])} "
                         f"| {pct(d['accuracy_forgetting'])} |")
    return "\n".join(lines) + "\n"
