"""What a VCL-diffusion run builds from its config (PAPERS.md §1): the U-Net, the noise
schedule, the losses and methods (:class:`Setup`), the task stream's images, each task's
coreset, and the evaluation of a model by the classifier uncertainty of its samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vcl_jax.checkpoint import Checkpoints
from vcl_jax.config import ConfigError
from vcl_jax.configs.vcl_diffusion import (
    VCLDiffusionConfig,
    parse_method,
)
from vcl_jax.continual import Method, coreset, methods, mle, vcl, vcl_ng
from vcl_jax.data import TaskStream, select, to_float, to_unit
from vcl_jax.diffusion.generate import fresh_draws, generate
from vcl_jax.diffusion.loss import batch_loss, example_loss_at, fisher_examples
from vcl_jax.eval.classifier import EvalClassifier
from vcl_jax.eval.metrics import (
    classifier_uncertainty,
    mean_stderr,
    per_class_mean,
    per_class_stderr,
)
from vcl_jax.kernels import conv3x3 as cpu_conv
from vcl_jax.models.unet import ContextUNet, init_unet, variational_mask
from vcl_jax.protocols.experiment import identity
from vcl_jax.training.epoch import EpochRunner
from vcl_jax.training.state import optimizer_for
from vcl_jax.vi import mean_field as mf

PyTree = Any
# How sampling uses a posterior's weights (:meth:`Setup.sample`).
WEIGHTS = ("draws", "mean", "average")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run builds from its config: model, schedule, loss and methods."""

    cfg: VCLDiffusionConfig
    model: ContextUNet  # for one set of weights: MLE, pre-training, sampling
    sched: Any
    shape: tuple[int, int, int]
    draws_model: ContextUNet  # the same network for VCL's vmapped weight draws in training
    draws_layout: str  # ``weight_draws`` resolved for this backend: "vmap" or "loop"
    # Coresets already selected, by (task, size, digest of the images): VCL's pre-training
    # withholds task 0's coreset and the coreset member asks for the same one again.
    _coresets: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                        compare=False)

    def init_params(self, key: jax.Array) -> dict:
        return init_unet(self.model, key, self.shape)

    def eps_fn(self, params, model: ContextUNet | None = None):
        """The noise prediction ``(x, t, task, keep) -> ε̂`` of ``params``."""
        model = model or self.model
        return lambda x, t, d, keep: model.apply({"params": params}, x, t, d, keep)

    def batch_loss(self, params, batch, key, *, model: ContextUNet | None = None):
        return batch_loss(self.eps_fn(params, model), self.sched, key, batch["x"],
                          batch["task"], p_uncond=self.cfg.diffusion.p_uncond)

    def example_loss(self, params, example):
        """ε-MSE of one example at its own fixed timestep and noise (an EWC Fisher's)."""
        return example_loss_at(self.eps_fn(params), self.sched, example)

    def method(self, name: str, params: dict, coreset_size: int = 0):
        """The method of a config name, from the grammar's builder: "joint" or "mle" is
        MLE, "vcl" VCL, "vcl_ng" VCL trained by natural gradients, an ``ewc_*`` member an
        EWC penalty on the params of the one that trains the model; with a coreset size, a
        coreset (``coreset_method``, ``coreset_mode``) chained last."""
        cfg = self.cfg
        spec = sub_run_spec(cfg, name, coreset_size)
        draws_loss = functools.partial(self.batch_loss, model=self.draws_model)
        v, ng = cfg.vcl, cfg.vcl_ng
        vcl_kw = dict(n_samples=v.train_samples, estimator=v.estimator, draws=self.draws_layout,
                      kl_scale=v.kl_scale, likelihood_scale=self.likelihood_scale,
                      prior_sigma=v.prior_sigma, log_var_init=v.log_var_init,
                      pretrained_prior=v.vcl_pretrain_epochs > 0, prior_decay=v.prior_decay)
        factories = {
            "mle": lambda: mle(self.batch_loss),
            "vcl": lambda: vcl(draws_loss, mask=self.mask(params), **vcl_kw),
            "vcl_ng": lambda: vcl_ng(
                draws_loss, mask=self.mask(params), **vcl_kw, hess_init=ng.ng_hess_init,
                b1=ng.ng_b1, b2=ng.ng_b2, clip=ng.ng_clip, floor=ng.ng_floor,
                deterministic_scale=cfg.optim.learning_rate / ng.ng_learning_rate),
            **methods.penalty_factories(self.example_loss, n_tasks=len(cfg.data.classes),
                                        lam=cfg.ewc.ewc_lambda, chunk=cfg.ewc.fisher_chunk),
        }
        if spec.coreset:
            example = {"x": jax.ShapeDtypeStruct(self.shape, jnp.float32),
                       "task": jax.ShapeDtypeStruct((), jnp.int32)}
            factories[spec.coreset] = lambda: coreset(
                lambda d, ex: self.coreset_of(d, ex["x"], coreset_size), coreset_size,
                len(cfg.data.classes), example, mode=cfg.coreset.coreset_mode)
        return methods.build(spec, factories)

    def coreset_of(self, task: int, x: np.ndarray, size: int) -> np.ndarray:
        """The indices of task ``task``'s coreset of ``size`` among its images ``x`` (the
        run's coreset key: the same ones every time they are asked for, selected once)."""
        x = np.ascontiguousarray(x)
        key = (task, size, x.shape, hashlib.blake2b(x.data, digest_size=16).hexdigest())
        if key not in self._coresets:
            picked = coreset_indices(self.cfg, run_keys(self.cfg).coreset, task, x, size)
            picked.flags.writeable = False  # shared by every caller
            self._coresets[key] = picked
        return self._coresets[key]

    def fisher_data(self, name: str, x: np.ndarray, task: int, key: jax.Array) -> dict | None:
        """What method ``name``'s ``end_task`` is given after ``task``: the examples of
        its EWC Fisher (``fisher_samples`` of the task's training images ``x``), or None."""
        if parse_method(name).penalty is None:
            return None
        ewc = self.cfg.ewc
        return fisher_examples(key, x, np.full(len(x), task, np.int32), ewc.fisher_samples,
                               T=self.cfg.diffusion.T, t_min=ewc.fisher_t_min,
                               t_max=ewc.fisher_t_max)

    @property
    def likelihood_scale(self) -> float:
        """Likelihood terms per example for VCL's KL weight: 1 for the loss averaged over
        pixels (``likelihood=mean``), the pixel count for their sum (``sum``)."""
        return float(np.prod(self.shape)) if self.cfg.vcl.likelihood == "sum" else 1.0

    def learning_rate(self, method: Method) -> float:
        """The rate ``method`` trains at (decayed within a task when ``lr_decay``):
        ``ng_learning_rate`` for natural-gradient VCL, else ``learning_rate``."""
        cfg = self.cfg
        return cfg.vcl_ng.ng_learning_rate if method.optimizer else cfg.optim.learning_rate

    def optimizer(self, method: Method) -> optax.GradientTransformation:
        """The update rule of ``method``: its own (natural-gradient VCL), else Adam."""
        return optimizer_for(method, self.learning_rate(method))

    def mask(self, params: dict) -> dict:
        """Which leaves VCL treats as random (in the posterior and the KL)."""
        return variational_mask(params, norms=self.cfg.vcl.variational_norms)

    def eval_draws(self, method: Method) -> int:
        """Weight draws of an evaluation: ``eval_samples`` for a posterior (a method that
        owns trainables other than the params: VCL), else the params themselves."""
        return self.cfg.vcl.eval_samples if method.view is not None else 1

    def steps_per_call(self, name: str) -> int:
        """Train steps per jitted call of method ``name`` (``EpochRunner``'s ``unroll``;
        0: the whole epoch in one rolled scan).

        With our CPU convolution kernels covering the U-Net (``conv_impl`` resolved to
        ``ffi``, ``n_feat`` a multiple of their vector width) the epoch is one rolled scan:
        the kernels run as fast inside a loop as unrolled, and the step compiles once instead
        of ``unroll`` times (VCL's step: 17 against 79 s; BENCHMARKS.md). Otherwise
        ``cfg.optim.unroll`` counts U-Net copies in one compiled call (XLA:CPU's own convolutions
        are an order of magnitude slower in a loop): VCL with looped weight draws has K
        copies per step, so it runs the largest divisor of ``unroll`` that is ≤
        ``unroll // K`` steps per call, at least 1 (the compile's memory grows with the
        copies). Either way an epoch has ``unroll``'s step count (:meth:`runner`), so the
        training is the same.
        """
        u, k = self.cfg.optim.unroll, self.cfg.vcl.train_samples
        if u and self.model.impl == "ffi" and cpu_conv.supports(self.cfg.model.n_feat):
            return 0
        if not parse_method(name).variational or k == 1 or not u or self.draws_layout != "loop":
            return u
        return max(d for d in range(1, max(u // k, 1) + 1) if u % d == 0)

    def runner(self, step, name: str) -> EpochRunner:
        """The epoch runner of train step ``step`` of method ``name``: ``steps_per_call``
        steps per jitted call, epochs rounded up to a multiple of ``unroll`` steps."""
        return EpochRunner(step, self.cfg.optim.batch_size, self.steps_per_call(name),
                           multiple=max(self.cfg.optim.unroll, 1))

    def sample(self, method: Method, trainable, k_draw: jax.Array, k_sample: jax.Array,
               tasks: np.ndarray, *, weights: str | None = None, sampler: str | None = None,
               ddim_steps: int | None = None, eta: float | None = None,
               guidance: float | None = None) -> np.ndarray:
        """Samples ``tasks [N]`` (one image each) from a method's trainables.

        Args:
          k_draw: the key of the weight draws; k_sample: that of the sampler's noise.
          weights: ``draws`` (one of ``eval_draws`` posterior draws per image,
            round-robin), ``mean`` (the posterior means) or ``average`` (ε averaged over
            ``eval_draws`` draws fresh at every step: the authors' sampler). None:
            ``average`` if the config's ``eval_average_draws``, else ``draws``. A point
            estimate samples from its params whatever this says.
          sampler, ddim_steps, eta, guidance: None: the config's.

        Returns:
          ``[N, H, W, C]`` samples in model space.
        """
        cfg = self.cfg
        if weights is not None and weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; accepted: {', '.join(WEIGHTS)}")
        m = self.eval_draws(method)
        # the config's eval_average_draws: ε averaged over the draws (only with several)
        weights = weights or ("average" if cfg.vcl.eval_average_draws and m > 1 else "draws")
        if m == 1 and weights == "average":
            weights = "draws"
        redraw = None
        if weights == "mean" and isinstance(trainable, mf.MeanField):
            draws = jax.tree.map(lambda a: a[None], trainable.mean)
        elif weights == "average":
            draws, redraw = (trainable, k_draw), fresh_draws(method.draws, m)
        else:
            draws = method.draws(trainable, k_draw, m)
        ev = cfg.eval
        return generate(self.model, draws, self.sched, k_sample, tasks, self.shape,
                        sampler=sampler or ev.sampler, guidance=_given(guidance, ev.guidance),
                        ddim_steps=ddim_steps or ev.ddim_steps, eta=_given(eta, ev.eval_eta),
                        average=weights == "average", redraw=redraw, max_batch=ev.eval_batch)


# Fields that change speed, not results (tested: both convolution forms agree); a
# checkpoint written with another value is still this run's.
SPEED_ONLY = ("model.conv_impl", "vcl.weight_draws", "eval.eval_batch")


def sub_run_spec(cfg: VCLDiffusionConfig, method: str, coreset_size: int) -> methods.Spec:
    """The method of one (method, coreset size) sub-run: the config's name, with a coreset
    member (``coreset_method``) when the size is not 0."""
    spec = parse_method(method)
    return spec._replace(coreset=f"coreset_{cfg.coreset.coreset_method}") if coreset_size else spec


def sub_run_identity(cfg: VCLDiffusionConfig, method: str, coreset_size: int) -> dict:
    """What determines one sub-run (:func:`~vcl_jax.protocols.experiment.identity`): so
    adding coreset sizes or changing a VCL-only setting reuses the finished MLE runs."""
    spec = sub_run_spec(cfg, method, coreset_size)
    return identity(cfg, method, spec, coreset_size=coreset_size)


def open_checkpoints(folder: str, cfg: VCLDiffusionConfig, method: str,
                     coreset_size: int, data: dict | None = None) -> Checkpoints:
    """The checkpoints of one sub-run, refusing a folder written with another config or
    (``data``, see :class:`~vcl_jax.checkpoint.Checkpoints`) other data."""
    return Checkpoints(folder, sub_run_identity(cfg, method, coreset_size), ignore=SPEED_ONLY,
                       data=data)


def _given(value, default):
    return default if value is None else value


def build(cfg: VCLDiffusionConfig, shape: tuple[int, int, int] = (28, 28, 1)) -> Setup:
    cfg.validate()
    model = cfg.model.module(len(cfg.data.classes), shape[-1])
    layout = draws_layout(cfg.vcl.weight_draws, cfg.vcl.train_samples)
    vmapped = cfg.vcl.train_samples > 1 and layout == "vmap"
    draws_model = cfg.model.module(len(cfg.data.classes), shape[-1], vmapped=vmapped)
    return Setup(cfg, model, cfg.diffusion.schedule(), shape, draws_model, layout)


def draws_layout(weight_draws: str, k: int) -> str:
    """``weight_draws`` with ``auto`` resolved for the backend the run is built on: the
    loop of K plain U-Nets on a CPU when K > 1 (XLA:CPU runs batched-kernel convolutions
    slowly), else one vmapped computation."""
    if weight_draws != "auto":
        return weight_draws
    return "loop" if k > 1 and jax.default_backend() == "cpu" else "vmap"


class RunKeys(NamedTuple):
    """The keys of a sub-run, split once from its seed."""

    init: jax.Array  # the U-Net's initial params
    coreset: jax.Array  # the coresets' selection
    train: jax.Array  # training (per task: fold_in of the task; named streams inside)
    eval: jax.Array  # sampling and scoring after each task


def run_keys(cfg: VCLDiffusionConfig) -> RunKeys:
    """The keys of a sub-run (the same for every method: they start from one init)."""
    return RunKeys(*jax.random.split(jax.random.key(cfg.run.seed), 4))


def load_tasks(cfg: VCLDiffusionConfig) -> list[np.ndarray]:
    """Training images of each task, float ``[N_d, H, W, C]`` in [0, 1]."""
    data = cfg.data
    train = data.load("train")
    out = []
    for task in TaskStream.one_class_per_task(data.classes).split(train):
        x = to_float(task.images, data.pixel_range)
        out.append(x[: data.max_per_task] if data.max_per_task else x)
    for size in cfg.coreset_sizes:
        for d, x in enumerate(out):
            if size > len(x):
                raise ConfigError(f"coreset size {size} is larger than task {d} "
                                  f"(class {cfg.data.classes[d]}: {len(x)} training images)")
    return out


def coreset_indices(cfg: VCLDiffusionConfig, key: jax.Array, task: int, x: np.ndarray,
                    size: int) -> np.ndarray:
    """Task ``task``'s coreset (deterministic given the key): withheld from its training data."""
    if not size:
        return np.zeros((0,), np.int32)
    return select(cfg.coreset.coreset_method, jax.random.fold_in(key, task), x, size)


def evaluate(setup: Setup, method, trainable, task: int, key: jax.Array,
             classifier: EvalClassifier) -> tuple[dict, np.ndarray, np.ndarray]:
    """Samples every class seen so far and scores them by classifier uncertainty.

    Returns:
      (metrics, images ``[N, H, W]`` in [0, 1], class labels ``[N]``).
    """
    cfg = setup.cfg
    seen = np.repeat(np.arange(task + 1), cfg.eval.eval_per_class)
    k_draw, k_sample = jax.random.split(key)
    x = setup.sample(method, trainable, k_draw, k_sample, seen)
    images = to_unit(x, cfg.data.pixel_range)
    labels = np.asarray(cfg.data.classes)[seen]
    return score(images, labels, task, classifier), _squeeze(images), labels


def _squeeze(images: np.ndarray) -> np.ndarray:
    return images[..., 0] if images.shape[-1] == 1 else images


def score(images: np.ndarray, labels: np.ndarray, task: int,
          classifier: EvalClassifier) -> dict:
    """Classifier uncertainty of samples ``images`` of classes ``labels`` (after ``task``)."""
    log_probs = classifier.log_probs(images if images.ndim == 4 else images[..., None])
    u = classifier_uncertainty(log_probs, labels)
    per_class, se = per_class_mean(u, labels), per_class_stderr(u, labels)
    return {"task": task, "avg_uncertainty": float(np.mean(list(per_class.values()))),
            "avg_stderr": mean_stderr(list(se.values())),
            "per_class": {str(k): v for k, v in per_class.items()},
            "per_class_stderr": {str(k): v for k, v in se.items()},
            "samples_per_class": int(len(labels) // max(len(per_class), 1)),
            "sample_accuracy": float(np.mean(log_probs.argmax(-1) == labels))}


def task_data(xs: list[np.ndarray], task_ids: list[int]) -> dict:
    """The images of tasks ``task_ids`` (one array each) as one training set, each image
    labelled with its task (what the U-Net is conditioned on)."""
    x = np.concatenate(xs)
    t = np.concatenate([np.full(len(a), d, np.int32) for a, d in zip(xs, task_ids, strict=True)])
    return {"x": jnp.asarray(x), "task": jnp.asarray(t)}
