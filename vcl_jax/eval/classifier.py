"""Train, cache and reload the evaluation classifier of a dataset.

The classifier is trained once per (dataset, training data, config) and cached
under ``$VCL_JAX_CACHE_DIR`` (default ``~/.cache/vcl_jax``) as an Orbax
checkpoint; later calls reload it. The cache key includes a hash of the training
images, so ``mnist-5k`` and full MNIST never share a classifier. Processes sharing a
cache (two experiments started together, parallel test workers) take a file lock per
entry: one trains, the others wait and reload its result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vcl_jax import checkpoint
from vcl_jax.data import Dataset, load, to_float
from vcl_jax.models.classifier import Classifier
from vcl_jax.models.layers import resolve_impl
from vcl_jax.training.epoch import EpochRunner

CACHE_ENV = "VCL_JAX_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Hyperparameters of the evaluation classifier."""

    width: int = 32
    features: int = 128
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    shift: int = 2  # random translation augmentation, pixels
    seed: int = 0
    unroll: int = 8  # steps per jitted call (see vcl_jax.training.epoch); 0 = one scan per epoch


def default_config(dataset: str, n_train: int) -> ClassifierConfig:
    """Epochs scaled so that small sets get more passes (≈150k–240k examples seen)."""
    epochs = int(np.clip(round(150_000 / max(n_train, 1)), 4, 40))
    return ClassifierConfig(epochs=epochs, shift=2 if dataset != "cifar10" else 0)


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "vcl_jax"))


def _fingerprint(data: Dataset, config: ClassifierConfig) -> str:
    h = hashlib.sha256()
    h.update(data.images.tobytes())
    h.update(data.labels.tobytes())
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _shift(key: jax.Array, x: jax.Array, s: int) -> jax.Array:
    """Random translation by up to ``s`` pixels (zero fill), per example."""
    if s == 0:
        return x
    b, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
    offs = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(xp, offs)


@dataclasses.dataclass(frozen=True)
class EvalClassifier:
    """A trained classifier with batched, jitted evaluation.

    Attributes:
      params: the Flax params.
      model: the module.
      info: dataset name, fingerprint and test accuracy.
    """

    params: dict
    model: Classifier
    info: dict

    def _batched(self, fn: Callable, x: np.ndarray, batch: int = 1000) -> np.ndarray:
        outs = [np.asarray(fn(self.params, jnp.asarray(x[i:i + batch], jnp.float32)))
                for i in range(0, len(x), batch)]
        return np.concatenate(outs) if outs else np.zeros((0,))

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        """``x: [N, H, W, C]`` in [0, 1] → ``[N, classes]`` log-probabilities."""
        return self._batched(_log_probs_fn(self.model), x)

    def features(self, x: np.ndarray) -> np.ndarray:
        """``x: [N, H, W, C]`` in [0, 1] → ``[N, features]`` penultimate activations."""
        return self._batched(_features_fn(self.model), x)

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.log_probs(x).argmax(-1) == labels))


_FN_CACHE: dict = {}


def _log_probs_fn(model):
    key = ("logp", model)
    if key not in _FN_CACHE:
        _FN_CACHE[key] = jax.jit(lambda p, x: model.apply(p, x))
    return _FN_CACHE[key]


def _features_fn(model):
    key = ("feat", model)
    if key not in _FN_CACHE:
        _FN_CACHE[key] = jax.jit(lambda p, x: model.apply(p, x, return_features=True)[1])
    return _FN_CACHE[key]


def _model(num_classes: int, config: ClassifierConfig) -> Classifier:
    """The classifier module; its convolutions in this backend's fastest form (same params)."""
    return Classifier(num_classes=num_classes, width=config.width, features=config.features,
                      impl=resolve_impl("auto", False))


def classifier_text(info: dict) -> str:
    """One sentence of ``summary.md`` naming the evaluation classifier (its ``info``)."""
    return (f"Evaluation classifier `{info['dataset']}-{info['fingerprint']}`: trained on "
            f"{info['n_train']:,} images from `{info['train_source']}`, test accuracy "
            f"{100 * info['test_accuracy']:.2f}%.")


def train_classifier(train: Dataset, config: ClassifierConfig, *, progress: bool = True):
    """Trains the classifier on a whole training split.

    Returns:
      (params, model, per-epoch training losses).
    """
    num_classes = int(train.labels.max()) + 1
    model = _model(num_classes, config)
    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    x = jnp.asarray(to_float(train.images))
    y = jnp.asarray(train.labels)
    params = jax.jit(model.init)(init_key, x[:1])  # one compile, not one per initializer
    steps = -(-len(train) // config.batch_size)
    sched = optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps)
    opt = optax.adam(sched)
    state = (params, opt.init(params))

    def step(state, batch, key):
        params, opt_state = state
        xb = _shift(key, batch["x"], config.shift)

        def loss_fn(p):
            logp = model.apply(p, xb)
            return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], 1))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    epoch = EpochRunner(step, config.batch_size, config.unroll)

    losses = []
    from tqdm import tqdm

    bar = tqdm(range(config.epochs), desc=f"classifier {train.name}", disable=not progress)
    for e in bar:
        state, m = epoch(state, {"x": x, "y": y}, jax.random.fold_in(data_key, e))
        losses.append(float(m["loss"]))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return state[0], model, losses


def get_classifier(
    dataset: str,
    *,
    data_dir: str | None = None,
    variant: str | None = None,
    config: ClassifierConfig | None = None,
    cache: str | None = None,
    epochs: int | None = None,
    progress: bool = True,
) -> EvalClassifier:
    """The evaluation classifier of ``dataset``: reloaded from the cache, or trained and cached.

    Args:
      dataset: ``mnist``, ``fashion_mnist`` or ``cifar10``.
      data_dir: passed to :func:`vcl_jax.data.load`.
      variant: the training set (``full``, ``5k``; None: any, the full one first), passed to
        :func:`vcl_jax.data.load`.
      config: hyperparameters (default: :func:`default_config`).
      cache: cache root (default ``$VCL_JAX_CACHE_DIR`` or ``~/.cache/vcl_jax``).
      epochs: override the default number of epochs (a different cache entry).
      progress: show a progress bar while training.
    """
    train = load(dataset, "train", data_dir=data_dir, variant=variant)
    config = config or default_config(dataset, len(train))
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    fp = _fingerprint(train, config)
    folder = os.path.join(cache or cache_dir(), "classifiers", f"{dataset}-{fp}")
    model = _model(int(train.labels.max()) + 1, config)
    with _entry_lock(folder, progress):
        ckpt = checkpoint.Checkpoints(folder, dataclasses.asdict(config), local=True, run=False)
        if ckpt.latest_step() is not None:
            like = jax.eval_shape(model.init, jax.random.key(0),
                                  jnp.zeros((1,) + train.images.shape[1:]))  # a template only
            params, meta = ckpt.restore(ckpt.latest_step(), like)
            ckpt.close()
            return EvalClassifier(params, model, meta["info"])
        ckpt.close()
        return _train_and_cache(train, model, config, fp, folder, dataset, data_dir=data_dir,
                                variant=variant, progress=progress)


@contextlib.contextmanager
def _entry_lock(folder: str, progress: bool):
    """Holds an exclusive lock on ``folder``'s cache entry (``<folder>.lock``) for the block;
    a process that finds it held waits (saying so) for the holder to finish."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process training the classifier in {folder}",
                      flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_and_cache(train: Dataset, model: Classifier, config: ClassifierConfig, fp: str,
                     folder: str, dataset: str, *, data_dir: str | None, variant: str | None,
                     progress: bool) -> EvalClassifier:
    """Trains the classifier, scores it on the test split and saves it in ``folder``."""
    params, model, losses = train_classifier(train, config, progress=progress)
    test = load(dataset, "test", data_dir=data_dir, variant=variant)
    clf = EvalClassifier(params, model, {})
    acc = clf.accuracy(to_float(test.images), test.labels)
    info = {"dataset": dataset, "fingerprint": fp, "n_train": len(train), "train_source":
            train.source, "test_accuracy": acc, "final_train_loss": losses[-1]}
    ckpt = checkpoint.Checkpoints(folder, dataclasses.asdict(config), local=True, run=False)
    ckpt.save(0, params, {"info": info})
    ckpt.close()
    return EvalClassifier(params, model, info)
