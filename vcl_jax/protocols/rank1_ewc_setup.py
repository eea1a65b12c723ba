"""What a rank-1 EWC run builds from its config (:mod:`vcl_jax.protocols.rank1_ewc`): the
class-pair tasks' images, the U-Net with its losses (real and replayed images, distillation,
the Fisher's per-example loss) and methods, the replay pools, and the evaluation by
FD-classifier and sample accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vcl_jax.config import ConfigError
from vcl_jax.configs.rank1_ewc import Rank1EWCConfig, parse_method
from vcl_jax.continual import distillation, generative_replay, methods, mle
from vcl_jax.continual.base import stack
from vcl_jax.data import TaskStream, pad_to, to_float, to_unit
from vcl_jax.diffusion.generate import generate
from vcl_jax.diffusion.loss import example_loss_at, fisher_examples, noised_batch
from vcl_jax.eval.classifier import EvalClassifier
from vcl_jax.eval.metrics import frechet_distance, gaussian_stats
from vcl_jax.models.unet import ContextUNet, init_unet

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task of the stream.

    Attributes:
      classes: dataset labels of the task.
      x: ``[N, S, S, C]`` training images in model space ([−1, 1], padded).
      c: ``[N]`` class index (position in ``cfg.data.classes``: the U-Net's embedding).
      reference: ``[M, H, W, C]`` images in [0, 1] at the dataset's size (test or
        validation) that the task's samples are compared with.
      reference_labels: ``[M]`` their dataset labels.
    """

    classes: tuple[int, ...]
    x: np.ndarray
    c: np.ndarray
    reference: np.ndarray
    reference_labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run builds from its config: model, schedule, losses and methods."""

    cfg: Rank1EWCConfig
    model: ContextUNet
    sched: Any
    shape: tuple[int, int, int]  # model space (S, S, C)
    data_size: int  # the dataset's image side (28 or 32)

    @property
    def stream(self) -> TaskStream:
        return TaskStream.pairs(self.cfg.data.classes)

    def init_params(self, key: jax.Array) -> dict:
        return init_unet(self.model, key, self.shape)

    def eps_fn(self, params):
        return lambda x, t, d, keep: self.model.apply({"params": params}, x, t, d, keep)

    def _mixed(self, batch, key):
        """The batch's real images, plus ``replay_batch`` drawn from the replay pool when
        the batch carries one; returns (x0, class index, number of real images)."""
        x, c = batch["x"], batch["c"]
        n_real = x.shape[0]
        if "pool_x" in batch:
            m = self.cfg.replay.replay_batch or self.cfg.optim.batch_size
            idx = jax.random.randint(key, (m,), 0, batch["pool_n"])
            x = jnp.concatenate([x, batch["pool_x"][idx]])
            c = jnp.concatenate([c, batch["pool_c"][idx]])
        return x, c, n_real

    def batch_loss(self, params, batch, key):
        """Mean per-pixel ε-MSE over the real (and replayed) images."""
        k_mix, k_noise = jax.random.split(key)
        x0, c, _ = self._mixed(batch, k_mix)
        xt, t, noise, keep = noised_batch(self.sched, k_noise, x0, self.cfg.diffusion.p_uncond)
        pred = self.eps_fn(params)(xt, t / self.sched.T, c, keep)
        return jnp.mean((pred - noise) ** 2)

    def loss_with_teacher(self, params, teacher, batch, key):
        """ε-MSE over real and replayed images (one student forward pass) plus
        ``distill_weight`` · MSE(student ε̂, teacher ε̂) on the noised replay images."""
        k_mix, k_noise = jax.random.split(key)
        x0, c, n_real = self._mixed(batch, k_mix)
        xt, t, noise, keep = noised_batch(self.sched, k_noise, x0, self.cfg.diffusion.p_uncond)
        pred = self.eps_fn(params)(xt, t / self.sched.T, c, keep)
        eps_loss = jnp.mean((pred - noise) ** 2)
        if "pool_x" not in batch:
            return eps_loss, {"loss": eps_loss}
        sl = slice(n_real, None)
        target = self.eps_fn(teacher)(xt[sl], t[sl] / self.sched.T, c[sl], keep[sl])
        dist = jnp.mean((pred[sl] - target) ** 2)
        return eps_loss + self.cfg.replay.distill_weight * dist, {"loss": eps_loss, "distill": dist}

    def example_loss(self, params, example):
        """ε-MSE of one example at its own (fixed) timestep and noise (the Fisher's)."""
        return example_loss_at(self.eps_fn(params), self.sched, example)

    def method(self, name: str):
        """The method of a config name, from the grammar's builder: MLE (or, for
        ``distill``, MLE with a teacher) trains the model; an EWC member adds its Fisher
        penalty, a replay member its generated pools."""
        cfg = self.cfg
        k_replay = run_keys(cfg).replay
        return methods.build(parse_method(name), {
            "mle": lambda: mle(self.batch_loss),
            "distill": lambda: distillation(self.loss_with_teacher),
            **methods.penalty_factories(self.example_loss, n_tasks=len(self.stream),
                                        lam=cfg.ewc.ewc_lambda, chunk=cfg.ewc.fisher_chunk),
            "replay": lambda: generative_replay(lambda params, d: replay_pool(
                self, params, d, jax.random.fold_in(k_replay, d))),
        })


class RunKeys(NamedTuple):
    """The keys of a method's run, split once from its seed (every method starts from one
    init)."""

    init: jax.Array  # the U-Net's initial params
    train: jax.Array  # training (per task: fold_in of the task)
    replay: jax.Array  # the replay pools (per task: fold_in of the task)
    fisher: jax.Array  # the Fisher's examples (per task: fold_in of the task)
    eval: jax.Array  # sampling and scoring after each task


def run_keys(cfg: Rank1EWCConfig) -> RunKeys:
    return RunKeys(*jax.random.split(jax.random.key(cfg.run.seed), 5))


def build(cfg: Rank1EWCConfig, data_shape: tuple[int, int, int]) -> Setup:
    """``data_shape``: the dataset's ``(H, W, C)``."""
    cfg.validate()
    h, _, c = data_shape
    if h > cfg.data.image_size:
        raise ConfigError(f"image_size {cfg.data.image_size} is smaller than the images ({h}×{h})")
    size = cfg.data.image_size
    return Setup(cfg, cfg.model.module(len(cfg.data.classes), c), cfg.diffusion.schedule(),
                 (size, size, c), h)


def load_tasks(cfg: Rank1EWCConfig) -> tuple[list[TaskData], tuple[int, int, int]]:
    """Training images per task (minus the validation hold-out) and FD references."""
    data = cfg.data
    train, test = data.load("train"), data.load("test")
    stream = TaskStream.pairs(data.classes)
    rng = np.random.default_rng(cfg.run.seed)
    tasks = []
    for group in stream.groups:
        xs, cs, vals, val_labels = [], [], [], []
        for label in group:
            images = train.images[train.labels == label]
            if len(images) == 0:
                raise ConfigError(f"class {label} has no training images in {cfg.data.dataset}")
            order = rng.permutation(len(images))
            n_val = cfg.data.validation_per_class
            if n_val >= len(images):
                raise ConfigError(f"validation_per_class={n_val} leaves no training image of "
                                  f"class {label} ({len(images)} in all)")
            val, rest = images[order[:n_val]], images[order[n_val:]]
            rest = rest[: cfg.data.max_per_class] if cfg.data.max_per_class else rest
            xs.append(rest)
            cs.append(np.full(len(rest), cfg.data.classes.index(label), np.int32))
            vals.append(val)
            val_labels.append(np.full(len(val), label, np.int32))
        x = pad_to(to_float(np.concatenate(xs), cfg.data.pixel_range), cfg.data.image_size,
                   value=black(cfg.data.pixel_range))
        if cfg.eval.eval_split == "validation":
            ref, ref_labels = np.concatenate(vals), np.concatenate(val_labels)
        else:
            mask = np.isin(test.labels, group)
            ref, ref_labels = test.images[mask], test.labels[mask]
        tasks.append(TaskData(tuple(group), x, np.concatenate(cs), to_float(ref),
                              ref_labels.astype(np.int32)))
    return tasks, train.images.shape[1:]


def black(pixel_range: str) -> float:
    """The model-space value of a black pixel (what 28×28 images are padded with)."""
    return 0.0 if pixel_range == "unit" else -1.0


def sample_clip(pixel_range: str) -> tuple[float, float] | None:
    """DDIM's clip of each step's predicted x_0: [−1, 1] for symmetric images (the rank-1
    paper's sampler); none for unit ones (the VCL paper's): clipping [0, 1] images' x_0 at
    0 biases the early, noisy predictions of a black background upwards, and the samples
    come out grey (sample accuracy 0.29 against 0.99 unclipped; BENCHMARKS.md)."""
    return (-1.0, 1.0) if pixel_range == "symmetric" else None


def _to_data_space(setup: Setup, x: np.ndarray) -> np.ndarray:
    """Model-space samples ``[N, S, S, C]`` → [0, 1] at the dataset's size (centre crop)."""
    x = to_unit(x, setup.cfg.data.pixel_range)
    off = (setup.shape[0] - setup.data_size) // 2
    return x[:, off:off + setup.data_size, off:off + setup.data_size, :]


def replay_pool(setup: Setup, params: dict, task: int, key: jax.Array) -> dict:
    """``replay_per_class`` DDIM samples of every class of tasks ``< task``, padded to the
    size of the largest pool of the stream (one compiled train step for all tasks)."""
    cfg = setup.cfg
    old = [cfg.data.classes.index(c) for g in setup.stream.groups[:task] for c in g]
    rp = cfg.replay
    cls = np.repeat(np.asarray(old, np.int32), rp.replay_per_class)
    x = generate(setup.model, stack(params, 1), setup.sched, key, cls, setup.shape,
                 sampler="ddim", guidance=rp.replay_guidance, ddim_steps=rp.ddim_steps,
                 eta=rp.replay_eta, clip=sample_clip(cfg.data.pixel_range))
    largest = rp.replay_per_class * (len(cfg.data.classes) - len(setup.stream.groups[-1]))
    pool_x = np.zeros((largest, *setup.shape), np.float32)
    pool_c = np.zeros((largest,), np.int32)
    pool_x[: len(cls)], pool_c[: len(cls)] = x, cls
    return {"pool_x": jnp.asarray(pool_x), "pool_c": jnp.asarray(pool_c),
            "pool_n": jnp.asarray(len(cls), jnp.int32)}


def fisher_data(setup: Setup, task: TaskData, key: jax.Array) -> dict:
    """``fisher_samples`` of the task's real training images, each with its own timestep
    (uniform in ``fisher_t_min..fisher_t_max``) and noise."""
    cfg = setup.cfg
    return fisher_examples(key, task.x, task.c, cfg.ewc.fisher_samples, T=cfg.diffusion.T,
                           t_min=cfg.ewc.fisher_t_min, t_max=cfg.ewc.fisher_t_max)


def evaluate(setup: Setup, params: dict, tasks: list[TaskData], upto: int, key: jax.Array,
             classifier: EvalClassifier, ref_stats: list) -> tuple[dict, np.ndarray, np.ndarray]:
    """Samples ``eval_per_class`` images of every class of tasks ``0..upto``; per task:
    FD-classifier against its reference images and classifier accuracy on the samples.

    Returns:
      (metrics, images in [0, 1] ``[N, H, W(, C)]``, dataset labels ``[N]``).
    """
    cfg = setup.cfg
    labels = np.asarray([c for t in tasks[: upto + 1] for c in t.classes], np.int32)
    labels = np.repeat(labels, cfg.eval.eval_per_class)
    cls = np.asarray([cfg.data.classes.index(int(c)) for c in labels], np.int32)
    x = generate(setup.model, stack(params, 1), setup.sched, key, cls, setup.shape,
                 sampler="ddim", guidance=cfg.eval.eval_guidance, ddim_steps=cfg.replay.ddim_steps,
                 eta=cfg.eval.eval_eta, clip=sample_clip(cfg.data.pixel_range))
    images = _to_data_space(setup, x)
    feats = classifier.features(images)
    pred = classifier.log_probs(images).argmax(-1)
    fd, acc = [], []
    for k in range(upto + 1):
        sel = np.isin(labels, tasks[k].classes)
        fd.append(frechet_distance(gaussian_stats(feats[sel]), ref_stats[k]))
        acc.append(float(np.mean(pred[sel] == labels[sel])))
    metrics = {"task": upto, "fd": fd, "avg_fd": float(np.mean(fd)), "accuracy": acc,
               "avg_accuracy": float(np.mean(acc))}
    return metrics, images[..., 0] if images.shape[-1] == 1 else images, labels
