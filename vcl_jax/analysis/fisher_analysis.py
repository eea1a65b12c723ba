"""The rank-1 paper's Fisher-geometry analysis of a trained diffusion model.

For a checkpoint of a ``rank1_ewc`` run and a grid of timesteps t, with N real images of
one task, each noised at t:

* Figure 1: MSE between x_t and the scaled prediction x̂_t = √(1−ᾱ_t) ε̂(x_t, t) (small at
  low SNR, where the score is ≈ −x_t / (1−ᾱ_t));
* Figure 2: |cos(g_n, μ_t)| of every per-sample gradient with the mean gradient (heat map);
* Figure 3a: pairwise cos(μ_t, μ_t′); 3b: top-5 eigenvalues of F_t; 3c: λ₂/λ₁;
  3d: relative Frobenius error of the diagonal and rank-1 approximations of F_t.

Everything but 3a comes from the N×N Gram matrix of per-sample gradients
(:mod:`vcl_jax.continual.fisher`), so no P×P matrix is ever formed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.config import ConfigError, checks
from vcl_jax.configs.rank1_ewc import Rank1EWCConfig, parse_method
from vcl_jax.continual.fisher import gram_analysis, gram_matrix
from vcl_jax.diffusion.loss import q_sample, timestep_examples
from vcl_jax.protocols import experiment, rank1_ewc, rank1_ewc_setup
from vcl_jax.training.state import TrainState, adam


@dataclasses.dataclass(frozen=True)
class FisherAnalysisConfig:
    """Attributes: which checkpoint (method, task; None = the last finished), timesteps
    (empty: ``n_timesteps`` evenly spaced over 1..T), examples per timestep, chunk, seed."""

    method: str | None = None
    task: int | None = None
    timesteps: tuple[int, ...] = ()
    n_timesteps: int = 12
    n_samples: int = 128
    chunk: int = 64
    seed: int = 0

    def validate(self) -> FisherAnalysisConfig:
        checks([(self.n_samples >= 2, f"n_samples must be ≥ 2, got {self.n_samples}"),
                (self.chunk >= 1, f"chunk must be ≥ 1, got {self.chunk}"),
                (self.n_timesteps >= 2 or len(self.timesteps) >= 2,
                 "the analysis needs at least two timesteps")])
        return self


def load_run(run_dir: str, method: str | None = None, task: int | None = None,
             data_dir: str | None = None):
    """A ``rank1_ewc`` run's setup, tasks and the params of ``method`` after ``task``
    (``data_dir`` replaces the run's, e.g. on another machine).

    Returns:
      (setup, tasks, params, method, task).
    """
    cfg = experiment.read_config(run_dir, Rank1EWCConfig, "rank1_ewc")
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    cfg.validate()
    method = method or cfg.methods[0]
    if method not in cfg.methods:
        raise ConfigError(f"method {method!r} is not in this run: {', '.join(cfg.methods)}")
    tasks, data_shape = rank1_ewc_setup.load_tasks(cfg)
    setup = rank1_ewc_setup.build(cfg, data_shape)
    folder = os.path.join(run_dir, parse_method(method).dir, "checkpoints")
    params = setup.init_params(jax.random.key(0))
    like = {"train": TrainState.create(setup.method(method), adam(cfg.optim.learning_rate),
                                       params)}
    task, restored = experiment.restore_task(
        folder, lambda f: rank1_ewc.method_checkpoints(f, cfg, method), task, like)
    return setup, tasks, restored["train"].trainable, method, task


def analyse(setup, params, task: rank1_ewc_setup.TaskData, cfg: FisherAnalysisConfig,
            *, progress: bool = True) -> dict:
    """Runs the analysis on ``n_samples`` of ``task``'s training images."""
    cfg.validate()
    T = setup.sched.T  # noqa: N806
    ts = cfg.timesteps or tuple(int(t) for t in np.unique(
        np.round(np.linspace(1, T, cfg.n_timesteps)).astype(int)))
    if min(ts) < 1 or max(ts) > T:
        raise ConfigError(f"timesteps must lie in 1..T={T}, got {ts}")
    key = jax.random.key(cfg.seed)
    k_pick, k_noise = jax.random.split(key)
    n = min(cfg.n_samples, len(task.x))
    pick = np.asarray(jax.random.choice(k_pick, len(task.x), (n,), replace=False))
    x0, c = jnp.asarray(task.x[pick]), jnp.asarray(task.c[pick])
    eps = jax.jit(lambda p, x, t, d: setup.eps_fn(p)(x, t, d, jnp.ones(x.shape[:1], bool)))
    per_t, means = [], []
    for t in ts:
        ex = timestep_examples(jax.random.fold_in(k_noise, t), x0, c, T=T, t_min=t, t_max=t)
        xt = jax.vmap(lambda x, tt, z: q_sample(setup.sched, x, tt, z))(ex["x"], ex["t"],
                                                                         ex["noise"])
        pred = eps(params, xt, ex["t"] / T, ex["task"])
        scale = jnp.sqrt(1.0 - setup.sched.alpha_bar[t - 1])
        mse = float(jnp.mean((xt - scale * pred) ** 2))
        res = gram_matrix(setup.example_loss, params, ex, chunk=cfg.chunk)
        out = gram_analysis(res.gram, res.diag_sq_sum)
        ab = float(setup.sched.alpha_bar[t - 1])
        out.update(t=t, snr=ab / (1.0 - ab), mse_xt=mse)
        per_t.append(out)
        means.append(res.mean)
        if progress:
            print(f"t={t:4d}: λ2/λ1 {out['ratio21']:.4f}, mean |cos(g, μ)| "
                  f"{out['mean_abs_cos']:.3f}, rel. error rank-1 {out['rel_err_rank1']:.3f}, "
                  f"diag {out['rel_err_diag']:.3f}, MSE(x_t, x̂_t) {mse:.4f}", flush=True)
    mu = np.stack(means)
    norms = np.linalg.norm(mu, axis=1)
    pairwise = (mu @ mu.T) / np.maximum(np.outer(norms, norms), 1e-300)
    return {"timesteps": list(ts), "n_samples": n, "per_t": per_t,
            "mu_cosine": pairwise.tolist(), "n_params": int(mu.shape[1])}


def write(out_dir: str, result: dict, title: str) -> None:
    """``analysis.json``, ``fisher_analysis.png`` (Figures 1–3) and ``summary.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "analysis.json"), "w") as f:
        json.dump(result, f, indent=2)
    ts = np.asarray(result["timesteps"])
    rows = result["per_t"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    ax[0, 0].plot(ts, [r["mse_xt"] for r in rows], marker="o")
    ax[0, 0].set(title="Fig. 1: MSE(x_t, √(1−ᾱ_t) ε̂)", xlabel="t", yscale="log")
    cos = np.stack([np.sort(r["cos"])[::-1] for r in rows])
    im = ax[0, 1].imshow(cos.T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                         extent=(0, len(ts), cos.shape[1], 0))
    ax[0, 1].set_xticks(np.arange(len(ts)) + 0.5, [str(t) for t in ts], rotation=90, fontsize=7)
    ax[0, 1].set(title="Fig. 2: |cos(g_n, μ_t)| per sample (sorted)", xlabel="t",
                 ylabel="sample")
    fig.colorbar(im, ax=ax[0, 1])
    im = ax[0, 2].imshow(np.asarray(result["mu_cosine"]), cmap="coolwarm", vmin=-1, vmax=1)
    ax[0, 2].set_xticks(range(len(ts)), [str(t) for t in ts], rotation=90, fontsize=7)
    ax[0, 2].set_yticks(range(len(ts)), [str(t) for t in ts], fontsize=7)
    ax[0, 2].set(title="Fig. 3a: cos(μ_t, μ_t′)")
    fig.colorbar(im, ax=ax[0, 2])
    eig = np.asarray([r["eigenvalues"] for r in rows])
    for i in range(eig.shape[1]):
        ax[1, 0].plot(ts, eig[:, i], marker=".", label=f"λ{i + 1}")
    ax[1, 0].set(title="Fig. 3b: top eigenvalues of F_t", xlabel="t", yscale="log")
    ax[1, 0].legend(fontsize=7)
    ax[1, 1].plot(ts, [r["ratio21"] for r in rows], marker="o")
    ax[1, 1].set(title="Fig. 3c: λ₂/λ₁", xlabel="t", yscale="log")
    for k, label in (("rel_err_diag", "diagonal"), ("rel_err_rank1", "rank-1 c·μμᵀ"),
                     ("rel_err_rank1_unit", "rank-1 μμᵀ (c = 1)"),
                     ("rel_err_best_rank1", "best rank-1 (λ₁v₁v₁ᵀ)")):
        ax[1, 2].plot(ts, [r[k] for r in rows], marker=".", label=label)
    ax[1, 2].set(title="Fig. 3d: ‖F − F̂‖_F / ‖F‖_F", xlabel="t", yscale="log")
    ax[1, 2].legend(fontsize=7)
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fisher_analysis.png"), dpi=90)
    plt.close(fig)
    lines = [f"# Fisher analysis — {title}", "",
             f"{result['n_samples']} per-sample gradients per timestep, "
             f"{result['n_params']:,} parameters.", "",
             "| t | SNR | MSE(x_t, x̂_t) | λ₂/λ₁ | mean abs cos(g, μ) | rel. err. diag | "
             "rel. err. rank-1 | rel. err. rank-1 (c=1) | best rank-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['t']} | {r['snr']:.3g} | {r['mse_xt']:.4f} | {r['ratio21']:.4f} | "
                     f"{r['mean_abs_cos']:.3f} | {r['rel_err_diag']:.3f} | "
                     f"{r['rel_err_rank1']:.3f} | {r['rel_err_rank1_unit']:.3f} | "
                     f"{r['rel_err_best_rank1']:.3f} |")
    lines += ["", "Figure: `fisher_analysis.png`; numbers: `analysis.json`."]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
