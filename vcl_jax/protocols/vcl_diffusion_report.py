"""Figures and the summary table of a VCL-diffusion run directory."""

from __future__ import annotations

import os

from vcl_jax.configs.vcl_diffusion import VCLDiffusionConfig
from vcl_jax.data import data_text
from vcl_jax.eval import plots
from vcl_jax.eval.classifier import classifier_text
from vcl_jax.eval.metrics import mean_stderr
from vcl_jax.training.sequence import train_seconds


def _own_task(history: list[dict], classes, key: str = "per_class") -> list[float]:
    """Each learned digit's ``history`` entry ``key`` right after its own task."""
    return [history[j][key][str(c)] for j, c in enumerate(classes[:len(history)])]


def _over(a: list[float], b: list[float]) -> list[float]:
    """Elementwise a / b over the common length (NaN where b is not positive)."""
    return [x / y if y > 0 else float("nan") for x, y in zip(a, b, strict=False)]


def no_forgetting_bound(history: list[dict], classes) -> list[float]:
    """After each task d, the mean over digits j ≤ d of digit j's uncertainty right after
    task j: what a run would score if it kept every digit as well as it had just learned it.

    For MLE this bounds what any method with MLE's per-task sample quality can reach: a
    VCL/MLE ratio below ``bound / MLE`` needs better per-task quality, not only less
    forgetting.
    """
    fresh = _own_task(history, classes)
    return [sum(fresh[:d + 1]) / (d + 1) for d in range(len(fresh))]


def continual_scores(history: list[dict], classes) -> dict:
    """Right-after quality and forgetting of a continual run, each with its standard error.

    ``right_after``: the mean over learned digits of each digit's uncertainty right after its
    own task. ``forgetting``: the mean over every digit but the last learned of (uncertainty
    after the last task − right after its own task). The samples of different evaluations are
    independent, so the standard errors add in quadrature.
    """
    n = len(history)
    fresh, fresh_se = _own_task(history, classes), _own_task(history, classes, "per_class_stderr")
    last = history[-1]
    drops = [last["per_class"][str(c)] - fresh[j] for j, c in enumerate(classes[:n - 1])]
    drops_se = [(last["per_class_stderr"][str(c)] ** 2 + fresh_se[j] ** 2) ** 0.5
                for j, c in enumerate(classes[:n - 1])]
    out = {"right_after": sum(fresh) / n, "right_after_stderr": mean_stderr(fresh_se)}
    if drops:
        out.update(forgetting=sum(drops) / len(drops), forgetting_stderr=mean_stderr(drops_se))
    return out


def ratios(results: dict) -> dict:
    """After each task, every run's average uncertainty over MLE's (coreset 0)."""
    if "mle_coreset0" not in results:
        return {}
    mle = [h["avg_uncertainty"] for h in results["mle_coreset0"]["history"]]
    return {name: _over([h["avg_uncertainty"] for h in rec["history"]], mle)
            for name, rec in results.items() if name != "mle_coreset0"}


def write(run_dir: str, cfg: VCLDiffusionConfig, metrics: dict) -> None:
    """Writes grids, uncertainty plots (linear, log, per class) and ``summary.md`` of a run's
    metrics (its ``continual`` and ``over_mle`` are :func:`continual_scores` and
    :func:`ratios` of its runs)."""
    results, scores, over_mle = metrics["runs"], metrics["continual"], metrics["over_mle"]
    n_tasks = len(cfg.data.classes)
    for name, rec in results.items():
        rows = plots.grid_rows(os.path.join(run_dir, name), len(rec["history"]))
        plots.sample_grid(os.path.join(run_dir, f"grid_{name}.png"), rows, list(cfg.data.classes),
                          f"{name}: row i = after task i, column j = digit j")
    avg = {name: [h["avg_uncertainty"] for h in rec["history"]] for name, rec in results.items()}
    se = {name: [h.get("avg_stderr", 0.0) for h in rec["history"]]
          for name, rec in results.items()}
    for log in (False, True):
        plots.curves(os.path.join(run_dir, f"uncertainty{'_log' if log else ''}.png"), avg,
                     xlabel="tasks seen", ylabel="avg classifier uncertainty (nats, ± SE)",
                     title="Average classifier uncertainty over seen digits (lower is better)",
                     log=log, errors=se)
    per_class = {}
    for name, rec in results.items():
        series: dict[int, tuple[int, list[float]]] = {}
        for i, c in enumerate(cfg.data.classes):
            ys = [h["per_class"][str(c)] for h in rec["history"][i:]]
            if ys:
                series[c] = (i, ys)
        per_class[name] = series
    plots.per_class_curves(os.path.join(run_dir, "uncertainty_per_digit.png"), per_class,
                           ylabel="classifier uncertainty (nats)",
                           title="Per-digit classifier uncertainty after each task")
    lines = ["# VCL for diffusion models — summary", "",
             data_text(metrics["data"]) + " " + classifier_text(metrics["classifier"]), "",
             "Average classifier uncertainty (nats, lower is better) over the digits seen so far, "
             "after each task, ± its standard error (over the samples of each digit).", "",
             "| run | " + " | ".join(str(i + 1) for i in range(n_tasks)) + " | train s | eval s |",
             "|---|" + "---|" * (n_tasks + 2)]
    for name, rec in results.items():
        vals = [f"{v:.3g} ± {e:.2g}" for v, e in zip(avg[name], se[name], strict=True)]
        vals += ["–"] * (n_tasks - len(avg[name]))
        lines.append(f"| {name} | " + " | ".join(vals)
                     + f" | {train_seconds(rec):.0f} | {rec['seconds']['eval']:.0f} |")
    lines += ["", "No-forgetting bound (mean over seen digits of each digit's uncertainty right "
              "after it was learned; `no_forgetting_bound`):", "",
              "| run | " + " | ".join(str(i + 1) for i in range(n_tasks)) + " |",
              "|---|" + "---|" * n_tasks]
    for name, rec in results.items():
        bound = no_forgetting_bound(rec["history"], cfg.data.classes)
        lines.append(f"| {name} | " + " | ".join(
            [f"{v:.3g}" for v in bound] + ["–"] * (n_tasks - len(bound))) + " |")
    for name, rs in over_mle.items():
        lines += ["", f"{name} / MLE (coreset 0), per task: " + ", ".join(f"{r:.3g}" for r in rs)]
    lines += ["", "Right after (mean over digits of each digit's uncertainty right after its own "
              "task) and forgetting (after the last task minus right after, mean over every digit "
              "but the last), nats ± SE:", "",
              "| run | right after | forgetting |", "|---|---|---|"]
    for name, c in scores.items():
        forget = (f"{c['forgetting']:.3g} ± {c['forgetting_stderr']:.2g}"
                  if "forgetting" in c else "–")
        lines.append(f"| {name} | {c['right_after']:.3g} ± {c['right_after_stderr']:.2g} "
                     f"| {forget} |")
    if "mle_coreset0" in results:
        bound = no_forgetting_bound(results["mle_coreset0"]["history"], cfg.data.classes)
        lines += ["", "MLE's no-forgetting bound / MLE (coreset 0), per task — the VCL / MLE "
                  "ratio a method with MLE's per-task quality and no forgetting would reach: "
                  + ", ".join(f"{r:.3g}" for r in _over(bound, avg["mle_coreset0"]))]
    if "joint" in results:
        lines += ["", "`joint` is the reference of the paper's Figure 7, not a continual learner: "
                  "one MLE model trained on every task's data at once (as many steps as MLE over "
                  "the stream); its column d is its one evaluation restricted to the digits of "
                  "tasks 1..d."]
    lines += ["", "Figures: `grid_<run>.png`, `uncertainty.png`, `uncertainty_log.png`, "
              "`uncertainty_per_digit.png`; samples: `<run>/samples_task<i>.npz`."]
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
