"""Config and presets of the VCL-diffusion experiment (PAPERS.md §1)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vcl_jax.checkpoint import Checkpoints
from vcl_jax.config import (
    check_choice,
    checks,
    class_checks,
    diffusion_checks,
    natural_gradient_checks,
    sections_dict,
)
from vcl_jax.continual import methods
from vcl_jax.continual.variational import DRAWS, ESTIMATORS
from vcl_jax.data import variants
from vcl_jax.data.coreset import METHODS as CORESET_METHODS
from vcl_jax.data.preprocess import RANGES
from vcl_jax.data.sources import NUM_CLASSES
from vcl_jax.diffusion.generate import SAMPLERS
from vcl_jax.models.layers import CONV_IMPLS, INITS
from vcl_jax.models.unet import CONTEXTS

# A method is "joint" (the paper's Figure 7 reference: one MLE model trained on every
# task's data at once; opt-in) or a name of the grammar of vcl_jax.continual.methods: a
# trainer ("mle", "vcl", or "vcl_ng": VCL trained by natural gradients) and optionally an EWC
# penalty on its params ("ewc_diag", "ewc_rank1", "ewc_rank1_unit"), e.g. "vcl+ewc_rank1"
# (EWC on VCL's posterior means); an EWC penalty alone trains the params by MLE. Coresets
# are not named: every method runs once per size in coreset_sizes (0: none).
MEMBERS = (*methods.TRAINERS, *methods.PENALTIES, methods.JOINT)


def parse_method(name: str) -> methods.Spec:
    """A method name's :class:`~vcl_jax.continual.methods.Spec`; a clear error for one
    outside the grammar or naming a member this experiment cannot build."""
    return methods.parse(name, MEMBERS)


# How VCL weighs the likelihood against the KL: "mean" — the per-example loss is the squared
# error averaged over pixels, as the authors' code trains it; "sum" — summed over pixels, as
# the paper's equations 2–3 write it (the KL per example 784× lighter on MNIST).
LIKELIHOODS = ("mean", "sum")
CORESET_MODES = ("finetune", "replay")


@dataclasses.dataclass(frozen=True)
class VCLDiffusionConfig:
    """Every hyperparameter of one VCL-diffusion run.

    Defaults are the paper's (Table 2) where it gives them.
    """

    # data and tasks
    dataset: str = "mnist"
    data_dir: str | None = None
    # which training set: "full" (the complete dataset) or, for MNIST, "5k" (the balanced
    # 500-per-digit subset); a folder holding another one is refused (vcl_jax.data.sources)
    data_variant: str = "full"
    classes: tuple[int, ...] = tuple(range(10))  # one class (digit) per task, in this order
    max_per_task: int | None = None  # cap on training images per task (None: all)
    pixel_range: str = "unit"  # "unit" [0, 1] as in the paper's code, or "symmetric" [−1, 1]
    # model
    n_feat: int = 128
    embed_dim: int = 32
    # "shared": one pair of context MLPs for every task's embedding vector (inside the KL
    # under VCL); "film": the author's code, free per-task decoder scales (deterministic)
    # and a null pair inside the KL (vcl_jax.models.unet)
    context: str = "shared"
    # "paper": weights ~ U(±√(15/fan_in)) (the paper's table); "pytorch": U(±1/√fan_in)
    # (PyTorch's default, the author's code)
    weight_init: str = "paper"
    # "auto": XLA's convolution, except the patches form (a batched matmul) for VCL's
    # vmapped weight draws on CPU, where XLA's grouped convolution is ~40× slower;
    # "xla" / "im2col" force one form everywhere. Same math: checkpoints ignore it.
    conv_impl: str = "auto"
    # diffusion
    T: int = 400  # noqa: N815
    beta_1: float = 1e-4
    beta_T: float = 0.02  # noqa: N815
    p_uncond: float = 0.1
    # optimisation
    epochs: int = 25
    batch_size: int = 128
    learning_rate: float = 1e-4
    lr_decay: bool = True  # linear decay to 0 within each task (the authors' code)
    unroll: int = 0  # steps per jitted call; 0 = one lax.scan per epoch (see training/epoch.py)
    # methods and coresets
    methods: tuple[str, ...] = ("mle", "vcl")
    coreset_sizes: tuple[int, ...] = (0,)
    coreset_method: str = "random"
    coreset_mode: str = "finetune"
    coreset_epochs: int = 10
    # VCL
    train_samples: int = 10  # K weight draws per training step
    # "paper": each of the K draws over the whole batch (K× an MLE step's cost); "grouped":
    # draw k over the k-th slice of the batch (≈ one MLE step; batch_size divisible by K).
    estimator: str = "paper"
    # How the K draws are compiled (same numbers): "vmap" (batched kernels), "loop" (K
    # copies of the U-Net with plain kernels: faster on CPU, longer compile) or "auto"
    # (loop on a CPU backend when K > 1, else vmap).
    weight_draws: str = "auto"
    eval_samples: int = 10
    # True: every image uses ε averaged over all eval_samples draws, fresh at every step
    # (the author's code; eval_samples× the sampling cost); False: the samples are spread
    # over the draws, one draw per image
    eval_average_draws: bool = True
    log_var_init: float = -10.0
    prior_sigma: float = 1.0
    kl_scale: float = 1.0
    likelihood: str = "mean"  # "mean" over pixels (the authors' code) or "sum" (the paper's)
    # γ: each task's prior is the previous posterior with its precisions × γ (1: VCL)
    prior_decay: float = 1.0
    # GroupNorm scales/offsets inside the posterior and the KL (True) or deterministic
    # and unregularised like the per-task embeddings (False, the paper's code).
    variational_norms: bool = False
    # MLE epochs on the first task before VCL starts; their weights become the
    # first prior's means (log-variance log_var_init). 0: prior N(0, prior_sigma² I).
    vcl_pretrain_epochs: int = 0
    # natural-gradient VCL (a vcl_ng member; vcl_jax.continual.vcl_ng): the step α of the
    # preconditioned mean update (in place of learning_rate, decayed as it is), the curvature
    # per datum at a task's start h₀, the momentum and curvature averaging β₁, β₂, and a bound
    # on each weight's step (None: none). The deterministic leaves (per-task embeddings,
    # norms) take Adam steps at learning_rate.
    ng_learning_rate: float = 0.1
    ng_hess_init: float = 0.1
    ng_b1: float = 0.9
    ng_b2: float = 0.999
    ng_clip: float | None = None
    ng_floor: bool = True  # the curvature kept ≥ 0: no posterior broader than its prior
    # EWC (methods with an ewc_* member; defaults: the rank-1 paper's): the penalty's λ, and
    # the Fisher of each finished task from fisher_samples of its training images, each at a
    # timestep uniform in fisher_t_min..fisher_t_max (None: T), in chunks of fisher_chunk
    ewc_lambda: float = 1e4
    fisher_samples: int = 1000
    fisher_t_min: int = 1
    fisher_t_max: int | None = None
    fisher_chunk: int = 128
    # evaluation
    classifier_epochs: int | None = None  # None: the cached default classifier of the dataset
    eval_per_class: int = 20
    guidance: float = 2.0
    sampler: str = "ddpm"
    ddim_steps: int = 100
    eval_eta: float = 0.0  # DDIM's η (1: stochastic, DDPM-like steps; 0: deterministic)
    # images per sampler call (None: every image of a weight draw in one call). A speed
    # setting: a small batch keeps the activations in a CPU's caches; the samples beyond
    # the first call's draw other noise, from the same distribution.
    eval_batch: int | None = None
    # reproducibility
    seed: int = 0

    # Each field's section (vcl_jax.config): overrides may name it, `model.n_feat=32`.
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("dataset", "data_dir", "data_variant", "classes", "max_per_task",
                 "pixel_range"),
        "model": ("n_feat", "embed_dim", "context", "weight_init", "conv_impl"),
        "diffusion": ("T", "beta_1", "beta_T", "p_uncond"),
        "optim": ("epochs", "batch_size", "learning_rate", "lr_decay", "unroll"),
        "methods": ("methods", "coreset_sizes"),
        "vcl": ("train_samples", "estimator", "weight_draws", "eval_samples",
                "eval_average_draws", "log_var_init", "prior_sigma", "kl_scale", "likelihood",
                "prior_decay", "variational_norms", "vcl_pretrain_epochs"),
        "vcl_ng": ("ng_learning_rate", "ng_hess_init", "ng_b1", "ng_b2", "ng_clip", "ng_floor"),
        "ewc": ("ewc_lambda", "fisher_samples", "fisher_t_min", "fisher_t_max", "fisher_chunk"),
        "coreset": ("coreset_method", "coreset_mode", "coreset_epochs"),
        "eval": ("classifier_epochs", "eval_per_class", "guidance", "sampler", "ddim_steps",
                 "eval_eta", "eval_batch"),
        "run": ("seed",),
    }

    def validate(self) -> VCLDiffusionConfig:
        checks([(len(self.methods) > 0, "methods must name at least one method")])
        specs = [parse_method(m) for m in self.methods]
        check_choice("data_variant", self.data_variant, variants(self.dataset))
        check_choice("coreset_mode", self.coreset_mode, CORESET_MODES)
        check_choice("context", self.context, CONTEXTS)
        check_choice("weight_init", self.weight_init, INITS)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        check_choice("weight_draws", self.weight_draws, ("auto", *DRAWS))
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("coreset_method", self.coreset_method, CORESET_METHODS)
        check_choice("pixel_range", self.pixel_range, RANGES)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        checks(diffusion_checks(self) + [
            (all(s >= 0 for s in self.coreset_sizes),
             f"coreset sizes must be ≥ 0, got {self.coreset_sizes}"),
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (self.train_samples >= 1, f"train_samples must be ≥ 1, got {self.train_samples}"),
            (self.estimator != "grouped" or self.batch_size % self.train_samples == 0,
             f"estimator=grouped splits each batch over the train_samples={self.train_samples} "
             f"weight draws: batch_size={self.batch_size} must be a multiple of it"),
            (self.eval_samples >= 1, f"eval_samples must be ≥ 1, got {self.eval_samples}"),
            (self.eval_per_class >= 1, f"eval_per_class must be ≥ 1, got {self.eval_per_class}"),
            (0.0 <= self.eval_eta <= 1.0, f"eval_eta must be in [0, 1], got {self.eval_eta}"),
            (self.eval_batch is None or self.eval_batch >= 1,
             f"eval_batch must be ≥ 1 or none, got {self.eval_batch}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.kl_scale >= 0, f"kl_scale must be ≥ 0, got {self.kl_scale}"),
            (self.prior_sigma > 0, f"prior_sigma must be > 0, got {self.prior_sigma}"),
            (0 < self.prior_decay <= 1, f"prior_decay must be in (0, 1], got {self.prior_decay}"),
            *natural_gradient_checks(self, any(s.trainer == "vcl_ng" for s in specs)),
            (0 <= self.p_uncond < 1, f"p_uncond must be in [0, 1), got {self.p_uncond}"),
            (len(self.classes) >= 1, "classes must name at least one class"),
            *class_checks("classes", self.classes, NUM_CLASSES.get(self.dataset)),
            (self.unroll >= 0, f"unroll must be ≥ 0, got {self.unroll}"),
            (self.vcl_pretrain_epochs >= 0,
             f"vcl_pretrain_epochs must be ≥ 0, got {self.vcl_pretrain_epochs}"),
            (self.ewc_lambda >= 0, f"ewc_lambda must be ≥ 0, got {self.ewc_lambda}"),
            (self.fisher_samples >= 1, f"fisher_samples must be ≥ 1, got {self.fisher_samples}"),
            (self.fisher_chunk >= 1, f"fisher_chunk must be ≥ 1, got {self.fisher_chunk}"),
            (1 <= self.fisher_t_min <= (self.fisher_t_max or self.T) <= self.T,
             f"need 1 ≤ fisher_t_min ≤ fisher_t_max ≤ T={self.T}, got "
             f"{self.fisher_t_min}..{self.fisher_t_max or self.T}"),
        ])
        return self


PRESETS = {
    # The paper's Table 2 on the complete MNIST (offline: shared/data/mnist-full/).
    # Where the text is silent, the author's code: its conditioning (free per-task decoder
    # scales, the null pair inside the KL), 20 MLE pre-training epochs for the first prior,
    # ε averaged over the 10 draws when sampling.
    "paper": VCLDiffusionConfig(coreset_sizes=(0, 200, 500), vcl_pretrain_epochs=20,
                                context="film", eval_per_class=50),
    # The complete MNIST (each digit's ~6,000 images: the paper's N_d) on a 2-core CPU: a
    # narrower U-Net with the author's conditioning and initialisation (BENCHMARKS.md: they
    # fix VCL's first task), about 290 optimizer steps per task at a higher learning rate,
    # K = 1 weight draw per step, and 50 guided samples per digit from DDIM-100 with η = 1
    # (it ranks the methods as DDPM-400 does, at a quarter of the cost), one draw per image.
    "cpu": VCLDiffusionConfig(
        data_variant="full", n_feat=16, embed_dim=32, context="film", weight_init="pytorch",
        epochs=3, batch_size=64, learning_rate=2e-3, unroll=8, train_samples=1,
        eval_per_class=50, sampler="ddim", ddim_steps=100, eval_eta=1.0, eval_batch=128,
        vcl_pretrain_epochs=3, eval_average_draws=False,
        # Coreset fine-tuning as large a share of a task's training as the authors' (their
        # 10 epochs at lr 1e-4 after 25 a task; here 3 a task at 20× the learning rate):
        # one epoch gives the same learning rate × steps relative to the task's training.
        coreset_epochs=1,
        # EWC as the rank-1 experiment's cpu preset chose it on a validation split
        ewc_lambda=1e2, fisher_samples=500, fisher_t_min=300),
    # Seconds: three tasks, tiny model, few samples.
    "smoke": VCLDiffusionConfig(
        data_variant="5k", classes=(0, 1, 2), max_per_task=32, n_feat=8, embed_dim=8, T=20,
        epochs=2, batch_size=16, learning_rate=1e-3, unroll=1, train_samples=2, eval_samples=2,
        eval_per_class=4, coreset_epochs=1, sampler="ddpm", classifier_epochs=1,
        vcl_pretrain_epochs=1, eval_average_draws=False, fisher_samples=8, fisher_chunk=4),
}


# Fields that change speed, not results (tested: both convolution forms agree); a
# checkpoint written with another value is still this run's.
SPEED_ONLY = ("conv_impl", "weight_draws", "eval_batch")


def sub_run_config(cfg: VCLDiffusionConfig, method: str, coreset_size: int) -> dict:
    """What determines one (method, coreset size) sub-run, its checkpoints' key: the
    config's sections that its method uses (the data, model, diffusion, optim, eval and run
    sections always; vcl, vcl_ng, ewc and coreset when it has them)."""

    # where the data was read from is not part of a run's identity (its checksum is)
    spec = parse_method(method)
    unused = {"methods"}  # the sweep: a sub-run has one method and one coreset size
    unused |= set() if spec.variational else {"vcl"}
    unused |= set() if spec.trainer == "vcl_ng" else {"vcl_ng"}
    unused |= set() if spec.penalty else {"ewc"}
    unused |= set() if coreset_size else {"coreset"}
    out = {k: v for k, v in sections_dict(cfg, unused).items() if k != "data_dir"}
    return dict(out, method=method, coreset_size=coreset_size)


def open_checkpoints(folder: str, cfg: VCLDiffusionConfig, method: str,
                     coreset_size: int, data: dict | None = None) -> Checkpoints:
    """The checkpoints of one sub-run, refusing a folder written with another config or
    (``data``, see :class:`~vcl_jax.checkpoint.Checkpoints`) other data."""
    return Checkpoints(folder, sub_run_config(cfg, method, coreset_size), ignore=SPEED_ONLY,
                       data=data)
