"""What a split-MNIST run builds: the tasks' data, the multi-head MLP's methods (MLE, EWC, VCL,
VCL with a coreset) and their trainers (all epochs of a task in one jitted scan, a fresh Adam
per task, as the original code). :mod:`vcl_jax.protocols.split_mnist` runs them."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vcl_jax.configs.split_mnist import SplitMNISTConfig, parse_method
from vcl_jax.continual import Method, coreset, ewc, methods, mle, vcl, vcl_ng
from vcl_jax.data import TaskStream, select, to_float
from vcl_jax.models import bayes_mlp, mlp
from vcl_jax.training.epoch import epoch_indices, scan_steps
from vcl_jax.training.state import TrainState, make_train_step
from vcl_jax.vi import mean_field as mf

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task, flattened: ``x: [N, 784]`` float32 in [0, 1], ``y: [N]`` labels within the task."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _flat(images: np.ndarray) -> np.ndarray:
    return to_float(images).reshape(len(images), -1)


def load_tasks(cfg: SplitMNISTConfig) -> list[TaskData]:
    """The task stream's train/test subsets, capped as the config says."""
    train, test = cfg.data.load("train"), cfg.data.load("test")
    stream = TaskStream.from_groups(cfg.data.groups)
    rng = np.random.default_rng(cfg.run.seed)  # caps take a random subset (mnist-5k is sorted)
    tasks = []
    for tr, te in zip(stream.split(train), stream.split(test), strict=True):
        keep = np.sort(rng.permutation(len(tr))[:cfg.data.max_per_task])
        x, y = _flat(tr.images[keep]), tr.local_labels[keep]
        keep = np.sort(rng.permutation(len(te))[:cfg.data.max_test_per_task])
        xt, yt = _flat(te.images[keep]), te.local_labels[keep]
        # evaluate on held-out training images, never the test split
        if cfg.data.validation_fraction:
            perm = rng.permutation(len(y))
            n_val = max(1, int(round(cfg.data.validation_fraction * len(y))))
            val, fit = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            x, y, xt, yt = x[fit], y[fit], x[val], y[val]
        tasks.append(TaskData(x, y, xt, yt))
    return tasks


def task_batch(x: np.ndarray, y: np.ndarray, head: int, size: int | None = None) -> dict:
    """One task's examples as a batch; ``size`` pads it to that many with weight-0 rows.

    Every loss is a ``w``-weighted mean, so a padded batch trains exactly on its real
    examples, and the tasks (whose sizes differ) share one compiled full-batch trainer.
    """
    n = len(y)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.int32),
             "head": jnp.full((n,), head, jnp.int32), "w": jnp.ones((n,), jnp.float32)}
    return batch if size is None else pad_batch(batch, size)


def pad_batch(batch: dict, size: int) -> dict:
    """``batch`` padded to ``size`` rows of weight 0 (zeros, in the batch's head)."""
    n = int(batch["y"].shape[0])
    if size < n:
        raise ValueError(f"cannot pad {n} examples to {size}")
    pad = size - n
    return {"x": jnp.pad(batch["x"], ((0, pad), (0, 0))), "y": jnp.pad(batch["y"], (0, pad)),
            "head": jnp.pad(batch["head"], (0, pad), mode="edge"),
            "w": jnp.pad(batch["w"], (0, pad))}


class TaskRunner:
    """All epochs of a task in one jitted call, with a fresh Adam per call (the original code):
    split MNIST's counterpart of :class:`~vcl_jax.training.epoch.EpochRunner`.

    One ``lax.scan`` over epochs; an epoch is one full-batch step, or a scan over
    shuffled minibatches when ``batch_size`` is smaller than the data.
    """

    def __init__(self, method: Method, *, learning_rate: float, epochs: int,
                 batch_size: int | None):
        # a method that owns its update (natural-gradient VCL) brings it; else Adam
        self.opt = (method.optimizer(learning_rate) if method.optimizer is not None
                    else optax.adam(learning_rate))
        step = make_train_step(method, self.opt)

        def train(state, data, key):
            n = data["y"].shape[0]

            def epoch(state, e):
                k = jax.random.fold_in(key, e)
                if batch_size is None or batch_size >= n:
                    return step(state, data, k)
                kp, ks = jax.random.split(k)
                state, m = scan_steps(step, state, data, epoch_indices(kp, n, batch_size), ks)
                return state, jax.tree.map(jnp.mean, m)

            return jax.lax.scan(epoch, state, jnp.arange(epochs))

        self._train = jax.jit(train)

    def __call__(self, trainable: PyTree, method_state: PyTree, data: dict,
                 key: jax.Array) -> tuple[PyTree, dict]:
        """Returns the trained variables and per-epoch metrics ``{name: [epochs]}``."""
        state = TrainState(trainable, self.opt.init(trainable), method_state)
        state, metrics = self._train(state, data, key)
        return state.trainable, metrics


class TaskKeys(NamedTuple):
    """The keys of one task of a split-MNIST run."""

    coreset: jax.Array  # its coreset's selection
    mle_fit: jax.Array  # VCL's MLE fit of the first posterior's means (task 0)
    train: jax.Array
    head: jax.Array  # the new head's initial means
    tune: jax.Array  # the coreset fine-tuning
    eval: jax.Array  # the predictive's weight draws


class Setup:
    """The methods of one config and their trainers, built once so that the runs of a
    comparison reuse the jitted steps."""

    def __init__(self, cfg: SplitMNISTConfig):
        self.cfg = cfg
        self.k_init, self._k_tasks = jax.random.split(jax.random.PRNGKey(cfg.run.seed))

        def mle_loss(params, batch, key):
            del key
            nll = mlp.nll(mlp.apply(params, batch["x"], batch["head"]), batch["y"])
            return jnp.sum(nll * batch["w"]) / jnp.sum(batch["w"])

        def expected_loss(estimator, n_samples=cfg.vcl.train_samples):
            return lambda q, batch, key: bayes_mlp.expected_nll(
                q, batch["x"], batch["y"], batch["head"], key, estimator=estimator,
                n_samples=n_samples, weight=batch["w"])

        def example_loss(params, ex):
            return mlp.nll(mlp.apply(params, ex["x"][None], ex["head"][None]), ex["y"][None])[0]

        self.mle = mle(mle_loss)
        # The MLP's diagonal Fisher in closed form: the per-example gradients' squares
        # summed by matmuls (the same numbers as vmapped per-example gradients, without
        # materialising one gradient per example).
        fisher = jax.jit(lambda p, d: mlp.diag_fisher(p, d["x"], d["y"], d["head"]))
        self.ewc = ewc(None, example_loss, n_tasks=len(cfg.data.groups), lam=cfg.ewc.ewc_lambda,
                       diag_fn=fisher)  # the penalty, chained after MLE
        vcl_kw = dict(n_samples=cfg.vcl.train_samples, kl_scale=cfg.vcl.kl_scale,
                      prior_sigma=cfg.vcl.prior_sigma, log_var_init=cfg.vcl.log_var_init)
        self.vcl = vcl(None, **vcl_kw, expected_loss=expected_loss(cfg.vcl.estimator))
        # the coreset fine-tuning's VCL: the same objective with its own estimator
        self.vcl_tune = self.vcl if cfg.vcl.tune_estimator == cfg.vcl.estimator else vcl(
            None, **vcl_kw, expected_loss=expected_loss(cfg.vcl.tune_estimator))
        ng = cfg.vcl_ng
        ng_kw = dict(vcl_kw, kl_scale=ng.ng_kl_scale, n_samples=ng.ng_train_samples,
                     hess_init=ng.ng_hess_init, b1=ng.ng_b1, b2=ng.ng_b2, clip=ng.ng_clip,
                     floor=ng.ng_floor)
        self.vcl_ng = vcl_ng(None, **ng_kw, expected_loss=expected_loss(
            ng.ng_estimator, ng.ng_train_samples))
        self.vcl_ng_tune = self.vcl_ng if cfg.vcl.tune_estimator == ng.ng_estimator else vcl_ng(
            None, **ng_kw, expected_loss=expected_loss(cfg.vcl.tune_estimator, ng.ng_train_samples))
        self.fit_mle = self.task_runner(self.mle)
        self._runs: dict = {}
        self.predict = jax.jit(bayes_mlp.predict_proba, static_argnames=("n_samples",))
        self.predict_mle = jax.jit(lambda p, x, head: jax.nn.softmax(mlp.apply(p, x, head)))

    def learning_rate(self, method: Method) -> float:
        """``ng_learning_rate`` for a method that owns its update (natural-gradient VCL),
        else Adam's ``learning_rate``."""
        cfg = self.cfg
        ng = method.optimizer is not None
        return cfg.vcl_ng.ng_learning_rate if ng else cfg.optim.learning_rate

    def task_runner(self, method: Method) -> TaskRunner:
        cfg = self.cfg
        return TaskRunner(method, learning_rate=self.learning_rate(method),
                          epochs=cfg.optim.epochs, batch_size=cfg.optim.batch_size)

    def task_keys(self, task: int) -> TaskKeys:
        """Task ``task``'s keys, split once from the run's task key folded with ``task``."""
        return TaskKeys(*jax.random.split(jax.random.fold_in(self._k_tasks, task), 6))

    def pick(self, kind: str, task: int, x: np.ndarray) -> np.ndarray:
        """The indices of task ``task``'s coreset among its images ``x``."""
        return select(kind, self.task_keys(task).coreset, x, self.cfg.coreset.coreset_size)

    def run(self, name: str, dim: int) -> tuple[Method, TaskRunner, TaskRunner | None]:
        """Method ``name``, its trainer and its coreset fine-tuning trainer (or None), built
        by the grammar's builder: VCL with a coreset is ``chain(vcl, coreset)``, each task's
        coreset tuning a copy of its own (``finetune_each``, the original's multi-head
        protocol) with the same chain around the tuning's VCL."""
        if name not in self._runs:
            spec = parse_method(name)
            factories = {"mle": lambda: self.mle, "vcl": lambda: self.vcl,
                         "vcl_ng": lambda: self.vcl_ng, "ewc_diag": lambda: self.ewc}
            tune = None
            if spec.coreset:
                example = {"x": jax.ShapeDtypeStruct((dim,), jnp.float32),
                           "y": jax.ShapeDtypeStruct((), jnp.int32),
                           "head": jax.ShapeDtypeStruct((), jnp.int32),
                           "w": jax.ShapeDtypeStruct((), jnp.float32)}
                core = coreset(lambda t, ex: self.pick(spec.coreset_kind, t, ex["x"]),
                               self.cfg.coreset.coreset_size, len(self.cfg.data.groups), example,
                               mode="finetune_each")
                factories[spec.coreset] = lambda: core
                tune = methods.build(spec, dict(factories, vcl=lambda: self.vcl_tune,
                                                vcl_ng=lambda: self.vcl_ng_tune))
            method = methods.build(spec, factories)
            fit = self.fit_mle if method is self.mle else self.task_runner(method)
            self._runs[name] = (method, fit, tune and self.task_runner(tune))
        return self._runs[name]

    def new_head(self, key: jax.Array, q: mf.MeanField, head: int,
                 log_var: float | None = None) -> mf.MeanField:
        """Head ``head`` of ``q`` re-initialised: means ~ truncated N(0, head_init_std²),
        log-variance ``log_var`` (default ``log_var_init``)."""
        cfg = self.cfg
        kw, kb = jax.random.split(key)
        d, o = q.mean["heads"]["w"].shape[1:]
        mean = {"w": mlp.truncated_normal(kw, (d, o), cfg.model.head_init_std),
                "b": mlp.truncated_normal(kb, (o,), cfg.model.head_init_std)}
        return bayes_mlp.reset_head(q, head, mean,
                                    cfg.vcl.log_var_init if log_var is None else log_var)

    def ng_head_log_var(self, n_data: int) -> float:
        """A new head's log-variance under natural-gradient VCL: the precision its prior
        N(0, σ₀²) gives plus λ·h₀, as every other weight's at a task's start."""
        cfg = self.cfg
        ess = n_data / cfg.vcl_ng.ng_kl_scale
        return -float(np.log(cfg.vcl.prior_sigma ** -2 + ess * cfg.vcl_ng.ng_hess_init))

    def unseen_heads_at_prior(self, q: mf.MeanField) -> mf.MeanField:
        """Heads of later tasks equal their prior N(0, σ₀²), so they add nothing to the KL."""
        d, o = q.mean["heads"]["w"].shape[1:]
        zero = {"w": jnp.zeros((d, o)), "b": jnp.zeros((o,))}
        for h in range(1, q.mean["heads"]["w"].shape[0]):
            q = bayes_mlp.reset_head(q, h, zero, 2.0 * float(np.log(self.cfg.vcl.prior_sigma)))
        return q
