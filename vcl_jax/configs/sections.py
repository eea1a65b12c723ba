"""The config sections the experiments share (:mod:`vcl_jax.config`).

Each is a frozen dataclass that checks itself (``checks()``: the conditions that must hold,
as :func:`vcl_jax.config.checks` takes them); an experiment's config adds the checks that
join two sections (a sampler's steps against the noise schedule's T).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vcl_jax.config import check_choice
from vcl_jax.data import Dataset, data_record, load, variants
from vcl_jax.diffusion.schedule import Schedule, linear_schedule
from vcl_jax.models.layers import CONV_IMPLS, INITS, resolve_impl
from vcl_jax.models.unet import CONTEXTS, ContextUNet


def finite(value: float) -> bool:
    """Neither NaN nor ±inf."""
    return value == value and abs(value) != float("inf")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a run's images come from; each experiment's data section adds its tasks.

    ``data_variant``: which training set, "full" (the complete dataset) or, for MNIST, "5k"
    (the balanced 500-per-digit subset); a folder holding another one is refused
    (vcl_jax.data.sources). ``data_dir``: a folder to read first (None: the usual places).
    """

    dataset: str = "mnist"
    data_dir: str | None = None
    data_variant: str = "full"

    def load(self, split: str) -> Dataset:
        """The ``split`` ("train" or "test") of the dataset."""
        return load(self.dataset, split, data_dir=self.data_dir, variant=self.data_variant)

    def record(self, train_per_task: list[int], arrays: list[np.ndarray]) -> dict:
        """What a run trains on, for its metrics and checkpoints (:func:`data_record`)."""
        return data_record(self.dataset, self.data_dir, self.data_variant, train_per_task,
                           arrays)

    def classifier(self, epochs: int | None = None, progress: bool = False):
        """The dataset's evaluation classifier (cached; ``epochs`` None: the default)."""
        from vcl_jax.eval.classifier import get_classifier

        return get_classifier(self.dataset, data_dir=self.data_dir, variant=self.data_variant,
                              epochs=epochs, progress=progress)

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("data_variant", self.data_variant, variants(self.dataset))
        return []


@dataclasses.dataclass(frozen=True)
class UNet:
    """The conditional U-Net (:mod:`vcl_jax.models.unet`)."""

    n_feat: int = 128
    embed_dim: int = 32
    # "shared": one pair of context MLPs over per-class embedding vectors (inside the KL
    # under VCL); "film": free per-class decoder scales (deterministic) and a null pair inside
    # the KL, the VCL paper's code
    context: str = "shared"
    # "paper": weights ~ U(±√(15/fan_in)) (the VCL paper's table); "pytorch": U(±1/√fan_in),
    # PyTorch's default and what both papers' PyTorch code gets
    weight_init: str = "paper"
    # "auto": XLA's convolution, except the patches form (a batched matmul) for VCL's
    # vmapped weight draws on CPU, where XLA's grouped convolution is ~40× slower;
    # "xla" / "im2col" force one form everywhere. Same math: checkpoints ignore it.
    conv_impl: str = "auto"

    def module(self, n_classes: int, channels: int, vmapped: bool = False) -> ContextUNet:
        """The U-Net of this section for ``n_classes`` classes of ``channels``-channel
        images; ``vmapped``: its convolutions run under a vmap of weight draws."""
        return ContextUNet(n_feat=self.n_feat, n_tasks=n_classes, channels=channels,
                           embed_dim=self.embed_dim, impl=resolve_impl(self.conv_impl, vmapped),
                           context=self.context, weight_init=self.weight_init)

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("context", self.context, CONTEXTS)
        check_choice("weight_init", self.weight_init, INITS)
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        return [(self.n_feat >= 1, f"n_feat must be ≥ 1, got {self.n_feat}"),
                (self.embed_dim >= 1, f"embed_dim must be ≥ 1, got {self.embed_dim}")]


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """The noise process: T steps with β linear from beta_1 to beta_T; labels dropped with
    probability p_uncond in training (classifier-free guidance)."""

    T: int = 400  # noqa: N815
    beta_1: float = 1e-4
    beta_T: float = 0.02  # noqa: N815
    p_uncond: float = 0.1

    def schedule(self) -> Schedule:
        return linear_schedule(self.T, self.beta_1, self.beta_T)

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.T >= 1, f"T must be ≥ 1, got {self.T}"),
            (0 < self.beta_1 <= self.beta_T < 1, f"need 0 < beta_1 ≤ beta_T < 1, got "
                                                 f"beta_1={self.beta_1}, beta_T={self.beta_T}"),
            (0 <= self.p_uncond < 1, f"p_uncond must be in [0, 1), got {self.p_uncond}"),
        ]


@dataclasses.dataclass(frozen=True)
class Optim:
    """Adam over each task: epochs of batch_size images at learning_rate (decayed linearly
    to 0 within each task with lr_decay); unroll: steps per jitted call, 0 = one lax.scan
    per epoch (vcl_jax.training.epoch)."""

    epochs: int = 25
    batch_size: int = 128
    learning_rate: float = 1e-4
    lr_decay: bool = True
    unroll: int = 0

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.unroll >= 0, f"unroll must be ≥ 0, got {self.unroll}"),
        ]


@dataclasses.dataclass(frozen=True)
class EWC:
    """The EWC penalty of methods with an ``ewc_*`` member (defaults: the rank-1 paper's):
    its λ, and the Fisher of each finished task from fisher_samples of its training images,
    each at a timestep uniform in fisher_t_min..fisher_t_max (None: T), in chunks of
    fisher_chunk per-example gradients."""

    ewc_lambda: float = 1e4
    fisher_samples: int = 1000
    fisher_t_min: int = 1
    fisher_t_max: int | None = None
    fisher_chunk: int = 128

    def checks(self, T: int) -> list[tuple[bool, str]]:  # noqa: N803
        t_max = T if self.fisher_t_max is None else self.fisher_t_max
        return [
            (self.ewc_lambda >= 0, f"ewc_lambda must be ≥ 0, got {self.ewc_lambda}"),
            (self.fisher_samples >= 2, f"fisher_samples must be ≥ 2, got {self.fisher_samples}"),
            (self.fisher_chunk >= 1, f"fisher_chunk must be ≥ 1, got {self.fisher_chunk}"),
            (1 <= self.fisher_t_min <= t_max <= T, f"need 1 ≤ fisher_t_min ≤ fisher_t_max ≤ "
                                                   f"T={T}, got {self.fisher_t_min}..{t_max}"),
        ]


@dataclasses.dataclass(frozen=True)
class NaturalGradient:
    """Natural-gradient VCL (a ``vcl_ng`` member; :mod:`vcl_jax.vi.natural_gradient`): the
    step α of the preconditioned mean update (decayed as the learning rate is), the
    curvature per datum at a task's start h₀, the momentum and curvature averaging β₁, β₂, a
    bound on each weight's step (None: none) and whether the curvature is kept ≥ 0 (no
    posterior broader than its prior). Deterministic leaves take Adam steps."""

    ng_learning_rate: float = 0.1
    ng_hess_init: float = 0.1
    ng_b1: float = 0.9
    ng_b2: float = 0.999
    ng_clip: float | None = None
    ng_floor: bool = True

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.ng_learning_rate > 0,
             f"ng_learning_rate must be > 0, got {self.ng_learning_rate}"),
            (self.ng_hess_init > 0, f"ng_hess_init must be > 0, got {self.ng_hess_init}"),
            (0 <= self.ng_b1 < 1 and 0 <= self.ng_b2 < 1,
             f"ng_b1 and ng_b2 must be in [0, 1), got {self.ng_b1}, {self.ng_b2}"),
            (self.ng_clip is None or self.ng_clip > 0,
             f"ng_clip must be > 0 or none, got {self.ng_clip}"),
        ]


def ng_kl_check(kl_scale: float, used: bool, name: str = "kl_scale") -> tuple[bool, str]:
    """Natural-gradient VCL's effective sample size is N/kl_scale: a run that trains by it
    (``used``) needs kl_scale > 0."""
    return (kl_scale > 0 or not used,
            f"natural-gradient VCL needs {name} > 0 (its effective sample size is N/{name})")


@dataclasses.dataclass(frozen=True)
class Run:
    """The run itself: its seed (the same seed gives the same numbers)."""

    seed: int = 0

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.seed >= 0, f"seed must be ≥ 0, got {self.seed}")]
