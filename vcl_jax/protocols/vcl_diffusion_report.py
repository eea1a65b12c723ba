"""Figures and the summary table of a VCL-diffusion run directory."""

from __future__ import annotations

import os

import numpy as np

from vcl_jax.data import data_text
from vcl_jax.eval import plots
from vcl_jax.eval.classifier import classifier_text
from vcl_jax.eval.metrics import mean_se, mean_stderr
from vcl_jax.protocols.vcl_diffusion_config import VCLDiffusionConfig
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


def across_seeds(metrics: list[dict], run: str) -> dict:
    """Sub-run ``run`` of several seeds' ``metrics.json``: per task the mean over seeds of the
    average uncertainty with its standard error over seeds (the spread of the seeds, which
    holds the samples' noise too), the same of the samples' accuracy, and of right-after
    quality and forgetting."""
    hists = [m["runs"][run]["history"] for m in metrics]
    n = min(len(h) for h in hists)
    out = {"seeds": [m["config"]["run"]["seed"] for m in metrics],
           "after_task": [mean_se([h[d]["avg_uncertainty"] for h in hists]) for d in range(n)],
           # the fraction of samples the classifier recognises as their digit: uncertainty
           # also falls when wrong samples are merely ambiguous rather than another digit
           "accuracy_after_task": [mean_se([h[d]["sample_accuracy"] for h in hists])
                                   for d in range(n)]}
    for key in ("right_after", "forgetting"):
        if all(key in m["continual"].get(run, {}) for m in metrics):
            out[key] = mean_se([m["continual"][run][key] for m in metrics])
    return out


def split_name(run: str) -> tuple[str, int]:
    """``(method, coreset size)`` of a sub-run's name (``vcl_ng_coreset200``; ``joint``: 0)."""
    method, _, size = run.rpartition("_coreset")
    return (method, int(size)) if method else (run, 0)


def seed_figures(metrics: list[dict], out_dir: str) -> list[str]:
    """The seed paper's Figure 2 (and its appendix's per-digit figures) from several seeds'
    ``metrics.json``: one panel per coreset size with each method's average uncertainty
    after each task (mean over seeds ± SE over seeds), linear and log, and one panel per
    sub-run with each digit's uncertainty (mean over seeds) from the task it was learned in.

    Returns:
      The paths written.
    """
    names = [n for n in metrics[0]["runs"] if n != "joint"
             and all(n in m["runs"] for m in metrics)]
    by_size: dict[str, dict] = {}
    for n in names:
        method, size = split_name(n)
        r = across_seeds(metrics, n)
        by_size.setdefault(f"coreset {size} per task", {})[method] = (
            [p[0] for p in r["after_task"]], [p[1] for p in r["after_task"]])
    seeds = ", ".join(str(m["config"]["run"]["seed"]) for m in metrics)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for log in (False, True):
        paths.append(os.path.join(out_dir, f"coreset_panels{'_log' if log else ''}.png"))
        plots.panels(paths[-1], by_size, xlabel="tasks seen",
                     ylabel="avg classifier uncertainty (nats)", log=log,
                     title=f"Average uncertainty over seen digits, mean ± SE over seeds {seeds}")
    classes = metrics[0]["config"]["data"]["classes"]
    per_class = {}
    names = sorted(names, key=lambda n: (split_name(n)[0], split_name(n)[1]))  # method rows
    for n in names:
        hists = [m["runs"][n]["history"] for m in metrics]
        length = min(len(h) for h in hists)
        per_class[n] = {c: (i, [float(np.mean([h[d]["per_class"][str(c)] for h in hists]))
                                for d in range(i, length)])
                        for i, c in enumerate(classes[:length])}
    paths.append(os.path.join(out_dir, "coreset_per_digit.png"))
    plots.per_class_curves(paths[-1], per_class, ylabel="classifier uncertainty (nats)",
                           title=f"Per-digit uncertainty after each task, mean over seeds {seeds}",
                           ncols=len(by_size))
    return paths


def vcl_targets(metrics: list[dict], first_task: int = 4) -> dict:
    """The VCL-diffusion issue's targets over seeds: VCL's average uncertainty below MLE's
    after every task from ``first_task`` (1-based) on each seed; VCL's forgetting ≤ 1/3 of
    MLE's and its right-after quality within 1.5× MLE's (each per seed and on the seed mean)."""
    out = {"below_mle_from_task": first_task, "per_seed": []}
    for m in metrics:
        mle, vcl = m["runs"]["mle_coreset0"]["history"], m["runs"]["vcl_coreset0"]["history"]
        cm, cv = m["continual"]["mle_coreset0"], m["continual"]["vcl_coreset0"]
        below = [v["avg_uncertainty"] < u["avg_uncertainty"]
                 for u, v in zip(mle[first_task - 1:], vcl[first_task - 1:], strict=False)]
        out["per_seed"].append({
            "seed": m["config"]["run"]["seed"], "below_mle": all(below), "tasks_below": below,
            "forgetting_ratio": cv["forgetting"] / cm["forgetting"],
            "right_after_ratio": cv["right_after"] / cm["right_after"]})
    seeds = out["per_seed"]
    out["met"] = {"below_mle_every_seed": all(s["below_mle"] for s in seeds),
                  "forgetting_le_third": all(s["forgetting_ratio"] <= 1 / 3 for s in seeds),
                  "right_after_within_1.5x": all(s["right_after_ratio"] <= 1.5 for s in seeds)}
    return out


def write(run_dir: str, cfg: VCLDiffusionConfig, results: dict, data: dict,
          classifier_info: dict, scores: dict, over_mle: dict) -> None:
    """Writes grids, uncertainty plots (linear, log, per class) and ``summary.md``;
    ``scores`` and ``over_mle`` are the runs' :func:`continual_scores` and :func:`ratios`."""
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
             data_text(data) + " " + classifier_text(classifier_info), "",
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
