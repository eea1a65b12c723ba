"""The evaluation classifier on the real offline data.

The two trainings from scratch (~4 min on 2 cores) are marked ``classifier``: ``make test``
leaves them out, ``make test-classifiers`` (and ``.ci/run``, after ``make test``) runs them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import require_data

from vcl_jax.data import load, to_float
from vcl_jax.eval.classifier import get_classifier


@pytest.mark.classifier
def test_mnist_classifier_trained_on_mnist_5k(shared_data, isolated_data):
    clf = get_classifier("mnist", data_dir=shared_data, variant="5k", progress=False)
    test = load("mnist", "test", data_dir=shared_data, variant="5k")
    assert len(test) == 10_000 and clf.info["n_train"] == 5_000
    acc = clf.accuracy(to_float(test.images), test.labels)
    print(f"MNIST test accuracy (trained on mnist-5k): {acc:.4f}")
    assert acc >= 0.980
    # Reloaded from the cache: same predictions, features of the configured size.
    again = get_classifier("mnist", data_dir=shared_data, variant="5k", progress=False)
    x = to_float(test.images[:64])
    np.testing.assert_allclose(again.log_probs(x), clf.log_probs(x), rtol=1e-5, atol=1e-5)
    assert again.features(x).shape == (64, 128)


@pytest.mark.classifier
def test_fashion_mnist_classifier():
    require_data("/usr/share/datasets/fashion-mnist", "Debian's dataset-fashion-mnist")
    clf = get_classifier("fashion_mnist", progress=False)
    test = load("fashion_mnist", "test")
    acc = clf.accuracy(to_float(test.images), test.labels)
    print(f"Fashion-MNIST test accuracy: {acc:.4f}")
    assert acc >= 0.90


def test_cached_classifier_is_keyed_by_training_data(tmp_path, isolated_data):
    from conftest import write_mnist_like

    write_mnist_like(str(tmp_path / "a" / "mnist"), n_train=30, seed=0)
    write_mnist_like(str(tmp_path / "b" / "mnist"), n_train=30, seed=1)
    cache = str(tmp_path / "cache")
    a = get_classifier("mnist", data_dir=str(tmp_path / "a"), cache=cache, epochs=1,
                       progress=False)
    b = get_classifier("mnist", data_dir=str(tmp_path / "b"), cache=cache, epochs=1,
                       progress=False)
    assert a.info["fingerprint"] != b.info["fingerprint"]
    root = os.path.join(cache, "classifiers")
    assert sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))) == sorted(
        f"mnist-{c.info['fingerprint']}" for c in (a, b))


def test_a_classifier_being_trained_elsewhere_is_waited_for_and_reloaded(tmp_path,
                                                                          isolated_data):
    # Another process holding the entry's lock (here: this thread, through its own open file,
    # which flock treats like another process) makes get_classifier wait, then reload.
    import fcntl
    import threading

    from conftest import write_mnist_like

    write_mnist_like(str(tmp_path / "mnist"), n_train=30)
    cache = str(tmp_path / "cache")
    first = get_classifier("mnist", data_dir=str(tmp_path), cache=cache, epochs=1,
                           progress=False)
    folder = os.path.join(cache, "classifiers", f"mnist-{first.info['fingerprint']}")
    got = {}
    with open(folder + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.update(clf=get_classifier(
            "mnist", data_dir=str(tmp_path), cache=cache, epochs=1, progress=False)))
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive() and not got  # still waiting for the lock
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(timeout=60)
    assert got["clf"].info == first.info


def test_a_cached_classifier_outlives_run_formats(tmp_path, monkeypatch):
    """The run format describes run directories, not the classifier cache: an entry saved
    while another run format was current still loads (a run's checkpoints of that format are
    refused)."""
    import jax.numpy as jnp

    from vcl_jax import checkpoint

    params = {"w": jnp.arange(3.0)}
    monkeypatch.setattr(checkpoint, "RUN_FORMAT", checkpoint.RUN_FORMAT - 1)
    for run in (True, False):
        old = checkpoint.Checkpoints(str(tmp_path / f"run{run}"), {"epochs": 1}, local=True,
                                     run=run)
        old.save(0, params, {"info": {}})
        old.close()
    monkeypatch.undo()
    cache = checkpoint.Checkpoints(str(tmp_path / "runFalse"), {"epochs": 1}, local=True,
                                   run=False)
    restored, _ = cache.restore(0, params)
    np.testing.assert_array_equal(restored["w"], params["w"])
    cache.close()
    with pytest.raises(checkpoint.ConfigMismatchError, match="run format"):
        checkpoint.Checkpoints(str(tmp_path / "runTrue"), {"epochs": 1}, local=True)
