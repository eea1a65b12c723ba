"""Config and presets of the discriminative split-MNIST VCL experiment (Nguyen et al. 2018).

A :class:`SplitMNISTConfig` is the methods and one section per concern; each preset is a
function returning one.
"""

from __future__ import annotations

import dataclasses

from vcl_jax.config import check_choice, checks, class_checks
from vcl_jax.configs.sections import NaturalGradient, Run, Source, ng_kl_check
from vcl_jax.continual import methods
from vcl_jax.data.sources import NUM_CLASSES
from vcl_jax.models.bayes_mlp import ESTIMATORS

# Methods are named in the grammar of vcl_jax.continual.methods: a trainer ("mle", "vcl",
# "vcl_ng": VCL trained by natural gradients) with an optional coreset ("vcl+coreset_random"),
# or MLE with diagonal EWC ("ewc_diag").
MEMBERS = (*methods.TRAINERS, "ewc_diag", *methods.CORESETS)
# the seed paper's comparison
PUBLISHED = ("mle", "vcl", "vcl+coreset_random", "vcl+coreset_kcenter", "ewc_diag")


def parse_method(name: str) -> methods.Spec:
    """A method name's :class:`~vcl_jax.continual.methods.Spec`; a clear error for one
    outside the grammar or naming a member this experiment cannot build."""
    return methods.parse(name, MEMBERS)


@dataclasses.dataclass(frozen=True)
class Data(Source):
    """The tasks: one group of classes each, every group the same size (one head size)."""

    groups: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    max_per_task: int | None = None  # cap on training images per task (None: all)
    max_test_per_task: int | None = None  # cap on test images per task (None: all)
    # > 0: hold out this fraction of each task's training images and evaluate on them
    # instead of the test split (for choosing settings such as ewc_lambda)
    validation_fraction: float = 0.0

    def checks(self) -> list[tuple[bool, str]]:
        return [*super().checks(),
            (len(self.groups) >= 1, "groups must name at least one task"),
            (all(len(g) >= 2 for g in self.groups),
             f"every task needs ≥ 2 classes for a classifier head, got {self.groups}"),
            (len({len(g) for g in self.groups}) == 1,
             f"every task needs the same number of classes (one head size), got {self.groups}"),
            *class_checks("groups", tuple(c for g in self.groups for c in g),
                          NUM_CLASSES.get(self.dataset)),
            (0.0 <= self.validation_fraction < 1.0,
             f"validation_fraction must be in [0, 1), got {self.validation_fraction}"),
            (self.max_per_task is None or self.max_per_task >= 1,
             f"max_per_task must be ≥ 1 or none, got {self.max_per_task}"),
        ]


@dataclasses.dataclass(frozen=True)
class MLP:
    """The multi-head MLP: shared hidden layers, a new head per task."""

    hidden: tuple[int, ...] = (256, 256)
    head_init_std: float = 0.1  # new heads' means ~ truncated N(0, 0.1²)

    def checks(self) -> list[tuple[bool, str]]:
        return [(all(h >= 1 for h in self.hidden), f"hidden widths must be ≥ 1, got {self.hidden}")]


@dataclasses.dataclass(frozen=True)
class FullBatchOptim:
    """Adam over each task for ``epochs``, on batches of batch_size (None: the whole task)."""

    epochs: int = 120
    batch_size: int | None = None
    learning_rate: float = 1e-3

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1,
             f"batch_size must be ≥ 1 or none (full batch), got {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
        ]


@dataclasses.dataclass(frozen=True)
class VCL:
    """Mean-field VCL over the MLP (the vcl members; vcl_ng shares its prior)."""

    train_samples: int = 10  # K Monte-Carlo samples per training step
    test_samples: int = 100  # weight draws averaged (probabilities) at test time
    estimator: str = "grouped"  # see vcl_jax.models.bayes_mlp; "paper" is the original's
    # the estimator of the coreset fine-tuning (same objective): with 40 images a step,
    # drawing K whole weight sets costs far more than the images' forward passes, while local
    # reparameterisation draws one noise per pre-activation of each image
    tune_estimator: str = "local"
    log_var_init: float = -6.0
    prior_sigma: float = 1.0
    kl_scale: float = 1.0

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("tune_estimator", self.tune_estimator, ESTIMATORS)
        return [
            (self.train_samples >= 1, f"train_samples must be ≥ 1, got {self.train_samples}"),
            (self.test_samples >= 1, f"test_samples must be ≥ 1, got {self.test_samples}"),
            (self.prior_sigma > 0, f"prior_sigma must be > 0, got {self.prior_sigma}"),
            (self.kl_scale >= 0, f"kl_scale must be ≥ 0, got {self.kl_scale}"),
        ]


@dataclasses.dataclass(frozen=True)
class SplitNaturalGradient(NaturalGradient):
    """Natural-gradient VCL (the vcl_ng methods): the same objective, prior and estimators,
    the posterior trained by IVON's update instead of Adam. The defaults are the best
    accuracy measured (98.2% on seed 0) but their variances are set by h₀ and β₂, not learnt:
    the estimate decays from h₀ at its fastest rate all task (BENCHMARKS.md); h₀ = 0.1
    diverged on the second task. β₂ = 0.95 averages the curvature over ~1/(1 − β₂) of a
    task's 120 steps; a bound ng_clip on the preconditioned step keeps a weight of near-zero
    curvature from taking Newton steps that can wreck the network within one task."""

    ng_hess_init: float = 1.0
    ng_b2: float = 0.95
    ng_train_samples: int = 1  # weight draws per step (IVON: one)
    # the estimator of the expected loss; "local" draws independent noise per example and
    # pre-activation (full-batch tasks: one shared weight draw per step was unstable)
    ng_estimator: str = "local"
    # the KL's weight of the vcl_ng methods (their λ is N/ng_kl_scale). Below 1 the posterior is
    # tempered: 0.01 (with ng_hess_init=0.1, ng_b2=0.9, ng_clip=0.01) learns a real spread of
    # variances but forgets task 0/1 (BENCHMARKS.md)
    ng_kl_scale: float = 1.0

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("ng_estimator", self.ng_estimator, ESTIMATORS)
        return super().checks()


@dataclasses.dataclass(frozen=True)
class DiagEWC:
    """The optional baseline ``ewc_diag``: the diagonal empirical Fisher's penalty weight
    (a 10% validation split could not separate 1e2..1e6: BENCHMARKS.md)."""

    ewc_lambda: float = 1e4

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.ewc_lambda >= 0, f"ewc_lambda must be ≥ 0, got {self.ewc_lambda}")]


@dataclasses.dataclass(frozen=True)
class Coreset:
    """Each task's coreset (the coreset_* members): coreset_size images, fine-tuned on
    before each evaluation."""

    coreset_size: int = 40


@dataclasses.dataclass(frozen=True)
class SplitMNISTConfig:
    """Every hyperparameter of one split-MNIST run; defaults are the published configuration."""

    methods: tuple[str, ...] = PUBLISHED
    data: Data = Data()
    model: MLP = MLP()
    optim: FullBatchOptim = FullBatchOptim()
    vcl: VCL = VCL()
    vcl_ng: SplitNaturalGradient = SplitNaturalGradient()
    ewc: DiagEWC = DiagEWC()
    coreset: Coreset = Coreset()
    run: Run = Run()

    def validate(self) -> SplitMNISTConfig:
        specs = [parse_method(m) for m in self.methods]
        size = self.coreset.coreset_size
        checks([
            *self.data.checks(), *self.model.checks(), *self.optim.checks(),
            *self.vcl.checks(), *self.vcl_ng.checks(), *self.ewc.checks(), *self.run.checks(),
            (size >= (1 if any(s.coreset for s in specs) else 0),
             f"coreset_size must be ≥ 1 with a coreset method (≥ 0 without), got {size}"),
            (all(s.variational or not s.coreset for s in specs),
             "a coreset here fine-tunes a VCL posterior: name it with vcl or vcl_ng "
             "(e.g. vcl+coreset_random)"),
            (len(self.methods) >= 1, "methods must name at least one method"),
            ng_kl_check(self.vcl_ng.ng_kl_scale, any(s.trainer == "vcl_ng" for s in specs),
                        "ng_kl_scale"),
        ])
        return self


def paper() -> SplitMNISTConfig:
    """Nguyen et al. (2018) on the complete MNIST (offline: shared/data/mnist-full/)."""
    return SplitMNISTConfig()


def cpu() -> SplitMNISTConfig:
    """The balanced 500-per-digit subset (mnist-5k): 1,000 training images per task, the
    same protocol."""
    return SplitMNISTConfig(data=Data(data_variant="5k"))


def smoke() -> SplitMNISTConfig:
    """Seconds: two tasks, a small network, few samples."""
    return SplitMNISTConfig(
        data=Data(data_variant="5k", groups=((0, 1), (2, 3)), max_per_task=64,
                  max_test_per_task=64),
        model=MLP(hidden=(32, 32)), optim=FullBatchOptim(epochs=5),
        vcl=VCL(train_samples=2, test_samples=4), coreset=Coreset(coreset_size=8))


PRESETS = {"paper": paper(), "cpu": cpu(), "smoke": smoke()}
