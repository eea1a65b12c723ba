"""Config and presets of the rank-1 EWC experiment (PAPERS.md §2).

Its methods are named in the grammar of :mod:`vcl_jax.continual.methods`, trained by MLE:
``mle``, ``replay``, ``distill``, ``ewc_diag``, ``ewc_rank1``, ``ewc_rank1_unit`` (c = 1),
``ewc_diag+distill``, ``ewc_rank1+distill``, ``ewc_rank1+replay``, ...; or ``joint``, the
reference that is not a continual learner: one model trained on every task's images at once.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vcl_jax.config import (
    ConfigError,
    check_choice,
    checks,
    class_checks,
    diffusion_checks,
    sections_dict,
)
from vcl_jax.continual import methods
from vcl_jax.data import variants
from vcl_jax.data.preprocess import RANGES
from vcl_jax.data.sources import NUM_CLASSES
from vcl_jax.models.layers import CONV_IMPLS, INITS
from vcl_jax.models.unet import CONTEXTS

# The members this experiment builds (every method is trained by MLE).
MEMBERS = ("mle", *methods.PENALTIES, *methods.REPLAYS, methods.JOINT)
METHODS = ("mle", "replay", "distill", "ewc_diag", "ewc_rank1", "ewc_diag+distill",
           "ewc_rank1+distill")
EVAL_SPLITS = ("test", "validation")


def parse_method(name: str) -> methods.Spec:
    """``"ewc_rank1+distill"`` → its :class:`~vcl_jax.continual.methods.Spec`; a clear
    error for a name outside the grammar or a member this experiment cannot build."""
    return methods.parse(name, MEMBERS)


@dataclasses.dataclass(frozen=True)
class Rank1EWCConfig:
    """Every hyperparameter of one rank-1 EWC run. The paper gives λ (1e4–2e4), DDIM-50
    replay with η = 0, distillation weight 1, 5 class-pair tasks and 32×32 images in
    [−1, 1]; the rest are our choices, stated in the README."""

    # data and tasks
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    # which training set: "full" (the complete dataset) or, for MNIST, "5k" (the balanced
    # 500-per-digit subset); a folder holding another one is refused (vcl_jax.data.sources)
    data_variant: str = "full"
    classes: tuple[int, ...] = tuple(range(10))  # consecutive pairs are the tasks
    max_per_class: int | None = None  # cap on training images per class (None: all)
    # hold out this many training images per class; with eval_split=validation the
    # FD-classifier is measured against them instead of the test images (choose settings so)
    validation_per_class: int = 0
    eval_split: str = "test"
    image_size: int = 32  # 28×28 datasets are padded (black)
    # model space: "symmetric" [−1, 1] (the rank-1 paper's code) or "unit" [0, 1] (the VCL
    # paper's code: a black background is 0, so its noised value is pure noise)
    pixel_range: str = "symmetric"
    # model and diffusion
    n_feat: int = 128
    embed_dim: int = 32
    # "shared": one pair of context MLPs over per-class embedding vectors; "film": free
    # per-class decoder scales (the VCL paper's code; vcl_jax.models.unet)
    context: str = "shared"
    # "paper": weights ~ U(±√(15/fan_in)) (the VCL paper's table); "pytorch": U(±1/√fan_in),
    # PyTorch's default and what both papers' PyTorch code gets
    weight_init: str = "paper"
    conv_impl: str = "xla"
    T: int = 1000  # noqa: N815
    beta_1: float = 1e-4
    beta_T: float = 0.02  # noqa: N815
    p_uncond: float = 0.1
    # optimisation (per task; batches hold batch_size real + replay_batch replayed images)
    epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 1e-4
    lr_decay: bool = False
    unroll: int = 0  # see vcl_jax.training.epoch (CPU presets: 8)
    # methods
    methods: tuple[str, ...] = METHODS
    ewc_lambda: float = 1e4
    fisher_samples: int = 1000  # per-example gradients per finished task
    fisher_t_min: int = 1  # timesteps of the Fisher's examples: uniform in t_min..t_max
    fisher_t_max: int | None = None  # None: T (all timesteps, the authors' code)
    fisher_chunk: int = 128
    replay_per_class: int = 1000  # replay pool per old class, regenerated at each task
    replay_batch: int | None = None  # None: batch_size
    replay_guidance: float = 0.0  # class-conditional DDIM without guidance
    replay_eta: float = 0.0  # DDIM η of the replayed images (0: deterministic, the authors')
    ddim_steps: int = 50
    distill_weight: float = 1.0
    # evaluation: DDIM samples per class, scored in the evaluation classifier's features
    eval_per_class: int = 500
    eval_guidance: float = 0.0
    eval_eta: float = 0.0  # DDIM η of the evaluation samples (0: deterministic, 1: DDPM-like)
    classifier_epochs: int | None = None
    seed: int = 0

    # Each field's section (vcl_jax.config): overrides may name it, `model.n_feat=32`.
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("dataset", "data_dir", "data_variant", "classes", "max_per_class",
                 "validation_per_class", "image_size", "pixel_range"),
        "model": ("n_feat", "embed_dim", "context", "weight_init", "conv_impl"),
        "diffusion": ("T", "beta_1", "beta_T", "p_uncond"),
        "optim": ("epochs", "batch_size", "learning_rate", "lr_decay", "unroll"),
        "methods": ("methods",),
        "ewc": ("ewc_lambda", "fisher_samples", "fisher_t_min", "fisher_t_max", "fisher_chunk"),
        "replay": ("replay_per_class", "replay_batch", "replay_guidance", "replay_eta",
                   "ddim_steps",
                   "distill_weight"),
        "eval": ("eval_split", "eval_per_class", "eval_guidance", "eval_eta",
                 "classifier_epochs"),
        "run": ("seed",),
    }

    def validate(self) -> Rank1EWCConfig:
        for m in self.methods:
            parse_method(m)
        check_choice("data_variant", self.data_variant, variants(self.dataset))
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        check_choice("context", self.context, CONTEXTS)
        check_choice("pixel_range", self.pixel_range, RANGES)
        check_choice("weight_init", self.weight_init, INITS)
        if self.eval_split not in EVAL_SPLITS:
            raise ConfigError(f"unknown eval_split {self.eval_split!r}; accepted: "
                              f"{', '.join(EVAL_SPLITS)}")
        t_max = self.T if self.fisher_t_max is None else self.fisher_t_max
        checks(diffusion_checks(self) + [
            (len(self.methods) >= 1, "methods must name at least one method"),
            (len(self.classes) >= 2 and len(self.classes) % 2 == 0,
             f"classes must be an even number ≥ 2 (consecutive pairs are tasks), "
             f"got {self.classes}"),
            *class_checks("classes", self.classes, NUM_CLASSES.get(self.dataset)),
            (self.image_size % 4 == 0, f"image_size must be divisible by 4, got {self.image_size}"),
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (self.replay_batch is None or self.replay_batch >= 1,
             f"replay_batch must be ≥ 1, got {self.replay_batch}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.ewc_lambda >= 0, f"ewc_lambda must be ≥ 0, got {self.ewc_lambda}"),
            (self.fisher_samples >= 2, f"fisher_samples must be ≥ 2, got {self.fisher_samples}"),
            (1 <= self.fisher_t_min <= t_max <= self.T,
             f"need 1 ≤ fisher_t_min ≤ fisher_t_max ≤ T={self.T}, got "
             f"{self.fisher_t_min}..{t_max}"),
            (self.replay_per_class >= 1,
             f"replay_per_class must be ≥ 1, got {self.replay_per_class}"),
            (0 <= self.eval_eta <= 1, f"eval_eta must be in [0, 1], got {self.eval_eta}"),
            (0 <= self.replay_eta <= 1, f"replay_eta must be in [0, 1], got {self.replay_eta}"),
            (self.distill_weight >= 0, f"distill_weight must be ≥ 0, got {self.distill_weight}"),
            (self.eval_per_class >= 2, f"eval_per_class must be ≥ 2 (a covariance), got "
                                       f"{self.eval_per_class}"),
            (self.validation_per_class >= 0,
             f"validation_per_class must be ≥ 0, got {self.validation_per_class}"),
            (self.eval_split == "test" or self.validation_per_class >= 2,
             "eval_split=validation needs validation_per_class ≥ 2"),
            (0 <= self.p_uncond < 1, f"p_uncond must be in [0, 1), got {self.p_uncond}"),
        ])
        return self


PRESETS = {
    # The protocol at GPU scale (full datasets; n_feat 128).
    "paper": Rank1EWCConfig(),
    # Offline on the 2-core CPU, full datasets: the VCL experiment's `cpu` U-Net (16 channels,
    # FiLM class vectors, PyTorch's initialisation, images in [0, 1] at 28×28, T = 400), 3 epochs
    # of 64 real (+ 32 replayed) images per task at 2e-3 decayed to 0 within the task; replay
    # and evaluation by DDIM-50 with η = 1 and guidance 2, unclipped (deterministic unguided
    # DDIM-50 and [-1, 1] images with a 32×32 pad gave this model grey, unrecognisable
    # samples: BENCHMARKS.md). λ = 1e2 and the Fisher's t ≥ 300 (low SNR, where F is near
    # rank one) as a validation split chose them for the 500-per-class model before this one.
    "cpu": Rank1EWCConfig(
        data_variant="full", image_size=28, pixel_range="unit", n_feat=16, embed_dim=32,
        context="film", weight_init="pytorch", conv_impl="auto", T=400, epochs=3,
        batch_size=64, learning_rate=2e-3, lr_decay=True, unroll=8, ewc_lambda=1e2,
        fisher_samples=500, fisher_t_min=300, replay_per_class=100, replay_batch=32,
        replay_guidance=2.0, replay_eta=1.0, eval_per_class=50, eval_guidance=2.0,
        eval_eta=1.0),
    # Seconds, for tests.
    "smoke": Rank1EWCConfig(
        classes=(0, 1, 2, 3), max_per_class=16, n_feat=8, embed_dim=8, T=20, epochs=1,
        batch_size=8, learning_rate=1e-3, unroll=1, fisher_samples=8, fisher_chunk=4,
        replay_per_class=4, replay_batch=4, ddim_steps=4, eval_per_class=4,
        classifier_epochs=1, methods=("mle", "ewc_rank1+distill")),
}

def sub_run_config(cfg: Rank1EWCConfig, method: str) -> dict:
    """What determines one method's training, its checkpoints' key: the config's sections
    that the method uses (ewc and replay only when it has them)."""
    spec = parse_method(method)
    unused = {"methods"} | (set() if spec.penalty else {"ewc"})
    unused |= set() if spec.replay else {"replay"}
    # where the data lives is not its identity (its checksum is)
    out = {k: v for k, v in sections_dict(cfg, unused).items() if k != "data_dir"}
    return dict(out, method=method)
