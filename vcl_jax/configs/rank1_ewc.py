"""Config and presets of the rank-1 EWC experiment (PAPERS.md §2).

Its methods are named in the grammar of :mod:`vcl_jax.continual.methods`, trained by MLE:
``mle``, ``replay``, ``distill``, ``ewc_diag``, ``ewc_rank1``, ``ewc_rank1_unit`` (c = 1),
``ewc_diag+distill``, ``ewc_rank1+distill``, ``ewc_rank1+replay``, ...; or ``joint``, the
reference that is not a continual learner: one model trained on every task's images at once.
A :class:`Rank1EWCConfig` is the methods and one section per concern; each preset is a
function returning one.
"""

from __future__ import annotations

import dataclasses

from vcl_jax.config import check_choice, checks, class_checks
from vcl_jax.configs.sections import EWC, Diffusion, Optim, Run, Source, UNet, finite
from vcl_jax.continual import methods
from vcl_jax.data.preprocess import RANGES
from vcl_jax.data.sources import NUM_CLASSES

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
class Data(Source):
    """The tasks: consecutive pairs of ``classes`` of ``dataset``."""

    dataset: str = "fashion_mnist"
    classes: tuple[int, ...] = tuple(range(10))  # consecutive pairs are the tasks
    max_per_class: int | None = None  # cap on training images per class (None: all)
    # hold out this many training images per class; with eval.eval_split=validation the
    # FD-classifier is measured against them instead of the test images (choose settings so)
    validation_per_class: int = 0
    image_size: int = 32  # 28×28 datasets are padded (black)
    # model space: "symmetric" [−1, 1] (the rank-1 paper's code) or "unit" [0, 1] (the VCL
    # paper's code: a black background is 0, so its noised value is pure noise)
    pixel_range: str = "symmetric"

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("pixel_range", self.pixel_range, RANGES)
        return [*super().checks(),
            (len(self.classes) >= 2 and len(self.classes) % 2 == 0,
             f"classes must be an even number ≥ 2 (consecutive pairs are tasks), "
             f"got {self.classes}"),
            *class_checks("classes", self.classes, NUM_CLASSES.get(self.dataset)),
            (self.image_size % 4 == 0, f"image_size must be divisible by 4, got {self.image_size}"),
            (self.validation_per_class >= 0,
             f"validation_per_class must be ≥ 0, got {self.validation_per_class}"),
        ]


@dataclasses.dataclass(frozen=True)
class Replay:
    """Generative replay of the old classes (the replay and distill members): a pool of
    replay_per_class images per old class from the previous model by DDIM (ddim_steps, η =
    replay_eta, guidance replay_guidance), regenerated at each task; replay_batch of them in
    each batch (None: batch_size); distill_weight weighs the distillation loss."""

    replay_per_class: int = 1000
    replay_batch: int | None = None
    replay_guidance: float = 0.0  # class-conditional DDIM without guidance
    replay_eta: float = 0.0  # 0: deterministic, the authors'
    ddim_steps: int = 50  # also the evaluation samples' steps
    distill_weight: float = 1.0

    def checks(self, T: int) -> list[tuple[bool, str]]:  # noqa: N803
        return [
            (self.replay_batch is None or self.replay_batch >= 1,
             f"replay_batch must be ≥ 1, got {self.replay_batch}"),
            (self.replay_per_class >= 1,
             f"replay_per_class must be ≥ 1, got {self.replay_per_class}"),
            (0 <= self.replay_eta <= 1, f"replay_eta must be in [0, 1], got {self.replay_eta}"),
            (self.distill_weight >= 0, f"distill_weight must be ≥ 0, got {self.distill_weight}"),
            (1 <= self.ddim_steps <= T, f"ddim_steps must be in 1..T={T}, got {self.ddim_steps}"),
            (finite(self.replay_guidance), "guidance weights must be finite numbers"),
        ]


@dataclasses.dataclass(frozen=True)
class Eval:
    """DDIM samples per class (replay.ddim_steps), scored in the evaluation classifier's
    features against the test images or, eval_split=validation, the held-out ones."""

    eval_split: str = "test"
    eval_per_class: int = 500
    eval_guidance: float = 0.0
    eval_eta: float = 0.0  # DDIM η of the evaluation samples (0: deterministic, 1: DDPM-like)
    classifier_epochs: int | None = None

    def checks(self) -> list[tuple[bool, str]]:
        check_choice("eval_split", self.eval_split, EVAL_SPLITS)
        return [
            (0 <= self.eval_eta <= 1, f"eval_eta must be in [0, 1], got {self.eval_eta}"),
            (self.eval_per_class >= 2, f"eval_per_class must be ≥ 2 (a covariance), got "
                                       f"{self.eval_per_class}"),
            (finite(self.eval_guidance), "guidance weights must be finite numbers"),
        ]


@dataclasses.dataclass(frozen=True)
class Rank1EWCConfig:
    """Every hyperparameter of one rank-1 EWC run. The paper gives λ (1e4–2e4), DDIM-50
    replay with η = 0, distillation weight 1, 5 class-pair tasks and 32×32 images in
    [−1, 1]; the rest are our choices, stated in the README."""

    methods: tuple[str, ...] = METHODS
    data: Data = Data()
    model: UNet = UNet(conv_impl="xla")
    diffusion: Diffusion = Diffusion(T=1000)
    # per task; batches hold batch_size real + replay.replay_batch replayed images
    optim: Optim = Optim(epochs=50, lr_decay=False)
    ewc: EWC = EWC()
    replay: Replay = Replay()
    eval: Eval = Eval()
    run: Run = Run()

    def validate(self) -> Rank1EWCConfig:
        for m in self.methods:
            parse_method(m)
        T = self.diffusion.T  # noqa: N806
        checks([
            (len(self.methods) >= 1, "methods must name at least one method"),
            *self.data.checks(), *self.model.checks(), *self.diffusion.checks(),
            *self.optim.checks(), *self.ewc.checks(T), *self.replay.checks(T),
            *self.eval.checks(), *self.run.checks(),
            (self.eval.eval_split == "test" or self.data.validation_per_class >= 2,
             "eval_split=validation needs validation_per_class ≥ 2"),
        ])
        return self


def paper() -> Rank1EWCConfig:
    """The protocol at GPU scale (full datasets; n_feat 128)."""
    return Rank1EWCConfig()


def cpu() -> Rank1EWCConfig:
    """Offline on the 2-core CPU, full datasets: the VCL experiment's `cpu` U-Net (16
    channels, FiLM class vectors, PyTorch's initialisation, images in [0, 1] at 28×28, T =
    400), 3 epochs of 64 real (+ 32 replayed) images per task at 2e-3 decayed to 0 within the
    task; replay and evaluation by DDIM-50 with η = 1 and guidance 2, unclipped
    (deterministic unguided DDIM-50 and [-1, 1] images with a 32×32 pad gave this model grey,
    unrecognisable samples: BENCHMARKS.md). λ = 1e2 and the Fisher's t ≥ 300 (low SNR, where
    F is near rank one) as a validation split chose them for the 500-per-class model before
    this one."""
    return Rank1EWCConfig(
        data=Data(data_variant="full", image_size=28, pixel_range="unit"),
        model=UNet(n_feat=16, embed_dim=32, context="film", weight_init="pytorch",
                   conv_impl="auto"),
        diffusion=Diffusion(T=400),
        optim=Optim(epochs=3, batch_size=64, learning_rate=2e-3, lr_decay=True, unroll=8),
        ewc=EWC(ewc_lambda=1e2, fisher_samples=500, fisher_t_min=300),
        replay=Replay(replay_per_class=100, replay_batch=32, replay_guidance=2.0,
                      replay_eta=1.0),
        eval=Eval(eval_per_class=50, eval_guidance=2.0, eval_eta=1.0))


def smoke() -> Rank1EWCConfig:
    """Seconds, for tests."""
    return Rank1EWCConfig(
        methods=("mle", "ewc_rank1+distill"),
        data=Data(classes=(0, 1, 2, 3), max_per_class=16),
        model=UNet(n_feat=8, embed_dim=8, conv_impl="xla"), diffusion=Diffusion(T=20),
        optim=Optim(epochs=1, batch_size=8, learning_rate=1e-3, lr_decay=False, unroll=1),
        ewc=EWC(fisher_samples=8, fisher_chunk=4),
        replay=Replay(replay_per_class=4, replay_batch=4, ddim_steps=4),
        eval=Eval(eval_per_class=4, classifier_epochs=1))


PRESETS = {"paper": paper(), "cpu": cpu(), "smoke": smoke()}

