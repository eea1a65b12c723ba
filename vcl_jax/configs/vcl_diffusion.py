"""Config and presets of the VCL-diffusion experiment (PAPERS.md §1).

A :class:`VCLDiffusionConfig` is its sweep (``methods`` × ``coreset_sizes``) and one section
per concern; each preset is a function returning one.
"""

from __future__ import annotations

import dataclasses

from vcl_jax.config import check_choice, checks, class_checks
from vcl_jax.configs.sections import (
    EWC,
    Diffusion,
    NaturalGradient,
    Optim,
    Run,
    Source,
    UNet,
    finite,
    ng_kl_check,
)
from vcl_jax.continual import methods
from vcl_jax.continual.variational import DRAWS, ESTIMATORS
from vcl_jax.data.coreset import METHODS as CORESET_METHODS
from vcl_jax.data.preprocess import RANGES
from vcl_jax.data.sources import NUM_CLASSES
from vcl_jax.diffusion.generate import SAMPLERS

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
class Data(Source):
    """The task stream: one class (digit) of ``dataset`` per task, in ``classes`` order."""

    classes: tuple[int, ...] = tuple(range(10))
    max_per_task: int | None = None  # cap on training images per task (None: all)
    pixel_range: str = "unit"  # "unit" [0, 1] as in the paper's code, or "symmetric" [−1, 1]

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("pixel_range", self.pixel_range, RANGES)
        return [*super().checks(),(len(self.classes) >= 1, "classes must name at least one class"),
                *class_checks("classes", self.classes, NUM_CLASSES.get(self.dataset))]


@dataclasses.dataclass(frozen=True)
class VCL:
    """Mean-field VCL over the U-Net (the vcl and vcl_ng members)."""

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

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("weight_draws", self.weight_draws, ("auto", *DRAWS))
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        return [
            (self.train_samples >= 1, f"train_samples must be ≥ 1, got {self.train_samples}"),
            (self.eval_samples >= 1, f"eval_samples must be ≥ 1, got {self.eval_samples}"),
            (self.kl_scale >= 0, f"kl_scale must be ≥ 0, got {self.kl_scale}"),
            (self.prior_sigma > 0, f"prior_sigma must be > 0, got {self.prior_sigma}"),
            (0 < self.prior_decay <= 1, f"prior_decay must be in (0, 1], got {self.prior_decay}"),
            (self.vcl_pretrain_epochs >= 0,
             f"vcl_pretrain_epochs must be ≥ 0, got {self.vcl_pretrain_epochs}"),
        ]


@dataclasses.dataclass(frozen=True)
class Coreset:
    """Each task's coreset (coreset_sizes > 0): chosen by coreset_method, then fine-tuned on
    for coreset_epochs before evaluation ("finetune", the paper's) or replayed ("replay")."""

    coreset_method: str = "random"
    coreset_mode: str = "finetune"
    coreset_epochs: int = 10

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("coreset_method", self.coreset_method, CORESET_METHODS)
        check_choice("coreset_mode", self.coreset_mode, CORESET_MODES)
        return []


@dataclasses.dataclass(frozen=True)
class Eval:
    """Samples per class, scored by the dataset's evaluation classifier."""

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

    def checks(self, T: int) -> list[tuple[bool, str]]:  # noqa: N803
        check_choice("sampler", self.sampler, SAMPLERS)
        return [
            (self.eval_per_class >= 1, f"eval_per_class must be ≥ 1, got {self.eval_per_class}"),
            (0.0 <= self.eval_eta <= 1.0, f"eval_eta must be in [0, 1], got {self.eval_eta}"),
            (self.eval_batch is None or self.eval_batch >= 1,
             f"eval_batch must be ≥ 1 or none, got {self.eval_batch}"),
            (self.sampler != "ddim" or 1 <= self.ddim_steps <= T,
             f"ddim_steps must be in 1..T={T}, got {self.ddim_steps}"),
            (finite(self.guidance), "guidance weights must be finite numbers"),
        ]


@dataclasses.dataclass(frozen=True)
class VCLDiffusionConfig:
    """Every hyperparameter of one VCL-diffusion run: the sweep and its sections.

    Defaults are the paper's (Table 2) where it gives them.
    """

    methods: tuple[str, ...] = ("mle", "vcl")
    coreset_sizes: tuple[int, ...] = (0,)
    data: Data = Data()
    model: UNet = UNet()
    diffusion: Diffusion = Diffusion()
    optim: Optim = Optim()
    vcl: VCL = VCL()
    vcl_ng: NaturalGradient = NaturalGradient()
    ewc: EWC = EWC()
    coreset: Coreset = Coreset()
    eval: Eval = Eval()
    run: Run = Run()

    def validate(self) -> VCLDiffusionConfig:
        checks([(len(self.methods) > 0, "methods must name at least one method")])
        specs = [parse_method(m) for m in self.methods]
        T = self.diffusion.T  # noqa: N806
        checks([
            *self.data.checks(), *self.model.checks(), *self.diffusion.checks(),
            *self.optim.checks(), *self.vcl.checks(), *self.vcl_ng.checks(),
            *self.ewc.checks(T), *self.coreset.checks(), *self.eval.checks(T),
            *self.run.checks(),
            (all(s >= 0 for s in self.coreset_sizes),
             f"coreset sizes must be ≥ 0, got {self.coreset_sizes}"),
            (self.vcl.estimator != "grouped"
             or self.optim.batch_size % self.vcl.train_samples == 0,
             f"estimator=grouped splits each batch over the train_samples="
             f"{self.vcl.train_samples} weight draws: batch_size={self.optim.batch_size} must "
             f"be a multiple of it"),
            ng_kl_check(self.vcl.kl_scale, any(s.trainer == "vcl_ng" for s in specs)),
        ])
        return self


def paper() -> VCLDiffusionConfig:
    """The paper's Table 2 on the complete MNIST (offline: shared/data/mnist-full/). Where
    the text is silent, the author's code: its conditioning (free per-task decoder scales,
    the null pair inside the KL), 20 MLE pre-training epochs for the first prior, ε averaged
    over the 10 draws when sampling."""
    return VCLDiffusionConfig(coreset_sizes=(0, 200, 500), model=UNet(context="film"),
                              vcl=VCL(vcl_pretrain_epochs=20), eval=Eval(eval_per_class=50))


def cpu() -> VCLDiffusionConfig:
    """The complete MNIST (each digit's ~6,000 images: the paper's N_d) on a 2-core CPU: a
    narrower U-Net with the author's conditioning and initialisation (BENCHMARKS.md: they
    fix VCL's first task), about 290 optimizer steps per task at a higher learning rate,
    K = 1 weight draw per step, and 50 guided samples per digit from DDIM-100 with η = 1
    (it ranks the methods as DDPM-400 does, at a quarter of the cost), one draw per image."""
    return VCLDiffusionConfig(
        data=Data(data_variant="full"),
        model=UNet(n_feat=16, embed_dim=32, context="film", weight_init="pytorch"),
        optim=Optim(epochs=3, batch_size=64, learning_rate=2e-3, unroll=8),
        vcl=VCL(train_samples=1, vcl_pretrain_epochs=3, eval_average_draws=False),
        eval=Eval(eval_per_class=50, sampler="ddim", ddim_steps=100, eval_eta=1.0,
                  eval_batch=128),
        # Coreset fine-tuning as large a share of a task's training as the authors' (their
        # 10 epochs at lr 1e-4 after 25 a task; here 3 a task at 20× the learning rate):
        # one epoch gives the same learning rate × steps relative to the task's training.
        coreset=Coreset(coreset_epochs=1),
        # EWC as the rank-1 experiment's cpu preset chose it on a validation split
        ewc=EWC(ewc_lambda=1e2, fisher_samples=500, fisher_t_min=300))


def smoke() -> VCLDiffusionConfig:
    """Seconds: three tasks, tiny model, few samples."""
    return VCLDiffusionConfig(
        data=Data(data_variant="5k", classes=(0, 1, 2), max_per_task=32),
        model=UNet(n_feat=8, embed_dim=8), diffusion=Diffusion(T=20),
        optim=Optim(epochs=2, batch_size=16, learning_rate=1e-3, unroll=1),
        vcl=VCL(train_samples=2, eval_samples=2, vcl_pretrain_epochs=1,
                eval_average_draws=False),
        coreset=Coreset(coreset_epochs=1),
        eval=Eval(eval_per_class=4, sampler="ddpm", classifier_epochs=1),
        ewc=EWC(fisher_samples=8, fisher_chunk=4))


PRESETS = {"paper": paper(), "cpu": cpu(), "smoke": smoke()}

