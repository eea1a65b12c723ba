"""Shared fixtures: small IDX datasets written by the tests, and the real offline data."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from vcl_jax.data import idx, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most of the suite's time is XLA compiling programs that then run a few steps: LLVM's first
# optimisation level instead of the default third compiles them in about half the time and
# gives the smoke presets' numbers to float rounding (their golden files were recorded at the
# default). Not so for every program: at levels 1-2 XLA:CPU's gradient of the 16-channel
# U-Net differs from level 3's by 3% (NaN at level 0; `benchmarks/xla_opt_levels.py`), so a
# test of such a gradient's values compiles at level 3 itself (`tests/test_kernels.py`).
# Set before JAX starts its backend; subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=1").strip()
# Identical programs (the same train step in several sub-runs or subprocesses) compile once.
_JIT_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vcl_jax", "jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

SHARED_DATA = os.environ.get("VCL_JAX_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
# CI sets this: there a missing dataset is a broken machine, not a reason to skip the
# end-to-end tests (which would pass a suite that tested none of the experiments).
REQUIRE_DATA = os.environ.get("VCL_JAX_REQUIRE_DATA") == "1"


def require_data(folder: str, what: str) -> str:
    """``folder`` if it exists; otherwise skips the test, or fails it under
    ``VCL_JAX_REQUIRE_DATA=1``."""
    if not os.path.isdir(folder):
        message = f"{what} not found at {folder}"
        if REQUIRE_DATA:
            pytest.fail(f"{message} (VCL_JAX_REQUIRE_DATA=1: the data must be there)")
        pytest.skip(message)
    return folder


def write_mnist_like(folder: str, n_train: int = 40, n_test: int = 20, gz: bool = True,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Writes the four IDX files of a tiny MNIST-shaped dataset; returns train images, labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    out = None
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        idx.write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{ext}"), images)
        idx.write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{ext}"), labels)
        if split == "train":
            out = (images, labels)
    return out


@pytest.fixture
def isolated_data(monkeypatch):
    """No environment, checkout or system data dirs: only what a test passes explicitly."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setattr(sources, "SYSTEM_ROOTS", ())
    monkeypatch.setattr(sources, "CHECKOUT_ROOTS", ())


@pytest.fixture
def shared_data():
    require_data(os.path.join(SHARED_DATA, "mnist-5k"), "offline data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> str:
    """A classifier cache for the whole test session, apart from the user's: classifiers are
    keyed by their training data and config, so modules training the same one share it.
    Parallel workers (pytest-xdist) share one: the cache's lock lets one of them train a
    classifier while the others wait for it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # base is <session>/popen-gwN
        folder = base.parent / "classifier-cache"
        folder.mkdir(exist_ok=True)
        return str(folder)
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def env(session_cache):
    """Offline data from ../shared and the session's own classifier cache."""
    require_data(os.path.join(SHARED_DATA, "mnist-5k"), "offline data")
    cache = session_cache
    old = {k: os.environ.get(k) for k in ("VCL_JAX_DATA_DIR", "VCL_JAX_CACHE_DIR")}
    os.environ.update(VCL_JAX_DATA_DIR=SHARED_DATA, VCL_JAX_CACHE_DIR=cache)
    yield dict(os.environ)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
