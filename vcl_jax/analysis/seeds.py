"""Several seeds of one experiment side by side, from their runs' ``metrics.json``:
VCL diffusion's average uncertainty per sub-run (mean and standard error over seeds), the
seed paper's Figure 2 over seeds and the VCL issue's targets; rank-1 EWC's FD-classifier,
sample accuracy and forgetting per method, and the paired differences behind the paper's
ordering."""

from __future__ import annotations

import os

import numpy as np

from vcl_jax.eval import plots
from vcl_jax.eval.metrics import mean_se


def uncertainty_across_seeds(metrics: list[dict], run: str) -> dict:
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
        r = uncertainty_across_seeds(metrics, n)
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


def uncertainty_seeds_markdown(metrics: list[dict], out: dict) -> str:
    """The README's table of several seeds' VCL-diffusion runs (``out["runs"]``: each
    sub-run's :func:`uncertainty_across_seeds`). Per sub-run (grouped by coreset size):
    average uncertainty after each task (mean over seeds ± SE), its ratio to MLE at the same
    coreset size, the samples' accuracy after the last task, right-after quality, forgetting
    and the mean wall time per seed."""
    seeds = out["runs"][next(iter(out["runs"]))]["seeds"]
    n = len(next(iter(out["runs"].values()))["after_task"])
    fmt = lambda p: f"{p[0]:.2f}" + ("" if np.isnan(p[1]) else f" ± {p[1]:.2f}")  # noqa: E731
    what = ("mean over seeds ± SE over seeds" if len(seeds) > 1
            else "one seed (its standard errors are in the run's summary.md)")
    lines = [f"Seeds {', '.join(map(str, seeds))}; nats, {what}.", "",
             "| run | " + " | ".join(f"after {d + 1}" for d in range(n))
             + " | ÷ MLE after 10 | accuracy after 10 | right after | forgetting | min/seed |",
             "|---|" + "---|" * (n + 5)]
    for name, r in sorted(out["runs"].items(), key=lambda kv: split_name(kv[0])[::-1]):
        method, size = split_name(name)
        ref = out["runs"].get(f"mle_coreset{size}")
        ratio = f"{r['after_task'][-1][0] / ref['after_task'][-1][0]:.2f}" if ref else "–"
        minutes = np.mean([sum(m["runs"][name]["seconds"].values()) for m in metrics]) / 60
        lines.append(f"| {name} | " + " | ".join(fmt(p) for p in r["after_task"])
                     + f" | {ratio} | {100 * r['accuracy_after_task'][-1][0]:.0f}%"
                     + f" | {fmt(r['right_after'])} | {fmt(r['forgetting'])} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


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



def fd_scores(rec: dict) -> dict:
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


def fd_across_seeds(metrics: list[dict]) -> dict:
    """Per method found in every seed's run: the average FD and accuracy after each task and
    :func:`fd_scores`, each as (mean, SE) over seeds; and the paired differences of forgetting
    (FD and accuracy) between the paper's method and the two it claims to beat."""
    names = [n for n in metrics[0]["runs"] if all(n in m["runs"] for m in metrics)]
    out = {"seeds": [m["config"]["run"]["seed"] for m in metrics], "runs": {}, "differences": {},
           "reference_accuracy": metrics[0].get("reference_accuracy")}
    per_seed = {name: [fd_scores(m["runs"][name]) for m in metrics] for name in names}
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


def fd_seeds_markdown(out: dict) -> str:
    """The per-method table of :func:`fd_across_seeds` (mean ± SE over seeds) and the paired
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
