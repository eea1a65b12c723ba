"""The data layer: IDX/CIFAR readers, validation errors, tfds path, tasks, coresets."""

from __future__ import annotations

import gzip
import os

import jax
import numpy as np
import pytest
from conftest import require_data, write_mnist_like

from vcl_jax.data import (
    DataError,
    TaskStream,
    cifar,
    complement,
    idx,
    kcenter_coreset,
    load,
    pad_to,
    random_coreset,
    sources,
    to_float,
)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_load(tmp_path, isolated_data, gz):
    images, labels = write_mnist_like(str(tmp_path / "mnist"), gz=gz)
    data = load("mnist", "train", data_dir=str(tmp_path))
    assert data.images.shape == (40, 28, 28, 1) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[..., 0], images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int32
    assert load("mnist", "test", data_dir=str(tmp_path)).images.shape == (20, 28, 28, 1)


def test_data_dir_may_hold_the_files_directly(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path))
    assert len(load("mnist", "train", data_dir=str(tmp_path))) == 40


def test_env_var_root_with_subfolder(tmp_path, isolated_data, monkeypatch):
    write_mnist_like(str(tmp_path / "fashion-mnist"))
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path))
    data = load("fashion_mnist", "train")
    assert data.source == str(tmp_path / "fashion-mnist")


def test_missing_directory(tmp_path, isolated_data):
    with pytest.raises(DataError, match="does not exist"):
        load("mnist", "train", data_dir=str(tmp_path / "nope"))


def test_env_var_naming_missing_directory(tmp_path, isolated_data, monkeypatch):
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(DataError, match="VCL_JAX_DATA_DIR"):
        load("mnist", "train")


def test_missing_file_is_named(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path / "mnist"))
    os.remove(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load("mnist", "train", data_dir=str(tmp_path))


def test_no_local_copy_and_no_tfds_says_where_it_looked(tmp_path, isolated_data, monkeypatch):
    def offline(name, split):
        raise ConnectionError("no internet")

    monkeypatch.setattr(sources, "_read_tfds", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load("mnist", "train", data_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "Offline machines need local files" in msg and str(tmp_path / "empty") in msg
    assert "no internet" in msg


def test_wrong_magic_number(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path / "mnist"))
    # A labels file where the images file should be: 1 dimension instead of 3.
    os.replace(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz",
               tmp_path / "mnist" / "train-images-idx3-ubyte.gz")
    idx.write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(40, np.uint8))
    with pytest.raises(DataError, match="wrong IDX magic number 2049"):
        load("mnist", "train", data_dir=str(tmp_path))


def test_truncated_file(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path / "mnist"), gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match="truncated"):
        load("mnist", "train", data_dir=str(tmp_path))


def test_truncated_gzip(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path / "mnist"))
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load("mnist", "train", data_dir=str(tmp_path))


def test_label_count_mismatch(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path / "mnist"))
    idx.write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8))
    with pytest.raises(DataError, match="40 images but .* 39 labels"):
        load("mnist", "train", data_dir=str(tmp_path))


def test_unknown_dataset_and_split(isolated_data):
    with pytest.raises(DataError, match="unknown dataset"):
        load("svhn", "train")
    with pytest.raises(DataError, match="unknown split"):
        load("mnist", "validation")


def test_tfds_mock_data_path(isolated_data):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        data = load("mnist", "train")
    assert data.source == "tfds"
    assert data.images.shape == (12, 28, 28, 1) and data.images.dtype == np.uint8
    assert data.labels.shape == (12,) and data.labels.max() < 10


def _write_cifar(path, n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rec = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
    rec.tofile(path)
    return pixels.transpose(0, 2, 3, 1), labels


def test_cifar10_binary(tmp_path, isolated_data):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = [_write_cifar(folder / f, 3, seed=i) for i, f in enumerate(cifar.TRAIN_FILES)]
    _write_cifar(folder / "test_batch.bin", 4)
    data = load("cifar10", "train", data_dir=str(tmp_path))
    assert data.images.shape == (15, 32, 32, 3)
    np.testing.assert_array_equal(data.images[:3], expected[0][0])
    np.testing.assert_array_equal(data.labels[3:6], expected[1][1])
    (folder / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="whole number"):
        load("cifar10", "test", data_dir=str(tmp_path))


def test_real_offline_mnist(shared_data, isolated_data):
    train = load("mnist", "train", data_dir=shared_data, variant="5k")
    test = load("mnist", "test", data_dir=shared_data, variant="5k")
    assert train.images.shape == (5000, 28, 28, 1) and len(test) == 10000
    assert np.bincount(train.labels).tolist() == [500] * 10


def test_task_streams(tmp_path, isolated_data):
    write_mnist_like(str(tmp_path / "mnist"))
    data = load("mnist", "train", data_dir=str(tmp_path))
    digits = TaskStream.one_class_per_task()
    assert len(digits) == 10 and digits.groups[3] == (3,)
    pairs = TaskStream.pairs()
    assert pairs.groups == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    t = pairs.task(2, data)
    assert set(t.labels.tolist()) == {4, 5}
    np.testing.assert_array_equal(t.local_labels, (t.labels == 5).astype(np.int32))
    custom = TaskStream.from_groups([[0, 1, 2], [7]])
    assert [len(x) for x in custom.split(data)] == [12, 4]
    assert custom.task_of_class(7) == 1
    with pytest.raises(ValueError, match="repeats"):
        TaskStream.from_groups([[0, 1], [1, 2]])
    with pytest.raises(IndexError):
        pairs.task(5, data)


def test_preprocessing():
    x = np.array([[[[0], [255]]]], np.uint8)
    np.testing.assert_allclose(to_float(x)[..., 0], [[[0.0, 1.0]]])
    np.testing.assert_allclose(to_float(x, "symmetric")[..., 0], [[[-1.0, 1.0]]])
    padded = pad_to(np.ones((2, 28, 28, 1)), 32)
    assert padded.shape == (2, 32, 32, 1) and padded[:, :2].sum() == 0
    assert padded[:, 2:30, 2:30].min() == 1


def test_random_coreset_is_seeded_and_distinct():
    a = random_coreset(jax.random.key(0), 100, 40)
    b = random_coreset(jax.random.key(0), 100, 40)
    c = random_coreset(jax.random.key(1), 100, 40)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 40 and not np.array_equal(a, c)
    rest = complement(a, 100)
    assert len(rest) == 60 and not set(rest.tolist()) & set(a.tolist())


def test_kcenter_picks_far_apart_points():
    # Two tight clusters and one outlier: k-center from point 0 takes the outlier,
    # then the other cluster.
    x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0], [50.0, 0.0]])
    np.testing.assert_array_equal(kcenter_coreset(x, 3), [0, 5, 4])


def test_coreset_larger_than_task():
    with pytest.raises(ValueError, match="larger than the task"):
        random_coreset(jax.random.key(0), 10, 11)
    with pytest.raises(ValueError, match="larger than the task"):
        kcenter_coreset(np.zeros((5, 2)), 6)


def test_gzip_not_gzip(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        idx.read_idx(path, expected_ndim=3)
    with gzip.open(tmp_path / "ok.gz", "wb") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        idx.read_idx(tmp_path / "ok.gz", expected_ndim=3)


def _write_sized(folder, n_train):
    """A tiny MNIST-shaped dataset whose training split has ``n_train`` images."""
    write_mnist_like(str(folder), n_train=n_train, n_test=10)


@pytest.fixture
def small_variants(monkeypatch):
    """MNIST's two variants with tiny training-set sizes (50 full, 20 subset)."""
    monkeypatch.setitem(sources.VARIANTS, "mnist", {
        "full": sources.Variant(("mnist", "MNIST", "mnist-full"), 50, "the full set"),
        "5k": sources.Variant(("mnist-5k",), 20, "the subset")})


def test_variants_search_their_own_folders_and_check_the_size(tmp_path, isolated_data,
                                                               small_variants):
    _write_sized(tmp_path / "mnist-full", 50)
    _write_sized(tmp_path / "mnist-5k", 20)
    full = load("mnist", "train", data_dir=str(tmp_path), variant="full")
    small = load("mnist", "train", data_dir=str(tmp_path), variant="5k")
    assert (len(full), full.source, full.variant) == (50, str(tmp_path / "mnist-full"), "full")
    assert (len(small), small.source) == (20, str(tmp_path / "mnist-5k"))
    assert sources.source_of("mnist", str(tmp_path), "5k") == str(tmp_path / "mnist-5k")
    with pytest.raises(DataError, match="unknown variant 'half'"):
        load("mnist", "train", data_dir=str(tmp_path), variant="half")


def test_full_variant_finding_only_the_subset_names_both_folders(tmp_path, isolated_data,
                                                                  small_variants):
    _write_sized(tmp_path / "mnist-5k", 20)
    # A root that holds only the subset: no download is attempted, both folders are named.
    with pytest.raises(DataError) as e:
        load("mnist", "train", data_dir=str(tmp_path), variant="full")
    msg = str(e.value)
    assert str(tmp_path / "mnist-5k") in msg and str(tmp_path / "mnist-full") in msg
    assert "data_variant=5k" in msg
    # The subset's folder given directly, or under the full set's name: refused by its size.
    for folder in (tmp_path / "mnist-5k", tmp_path / "elsewhere"):
        if not folder.exists():
            _write_sized(folder / "mnist", 20)
        with pytest.raises(DataError, match="holds 20 mnist training images.*the full set") as e:
            load("mnist", "train", data_dir=str(folder), variant="full")
        assert "mnist-full" in str(e.value) and "data_variant=5k" in str(e.value)


def test_checkout_data_root_is_searched(tmp_path, isolated_data, monkeypatch):
    write_mnist_like(str(tmp_path / "mnist-5k"))
    monkeypatch.setattr(sources, "CHECKOUT_ROOTS", (str(tmp_path),))
    assert load("mnist", "train").source == str(tmp_path / "mnist-5k")


def test_real_full_mnist_and_subset_offline(shared_data, isolated_data):
    require_data(os.path.join(shared_data, "mnist-full"), "offline mnist-full")
    full = load("mnist", "train", data_dir=shared_data, variant="full")
    small = load("mnist", "train", data_dir=shared_data, variant="5k")
    assert full.source.endswith("mnist-full") and len(full) == 60_000
    assert small.source.endswith("mnist-5k") and len(small) == 5_000
    np.testing.assert_array_equal(np.bincount(full.labels),
                                  [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    # With no variant named, the full set is found first.
    assert load("mnist", "train", data_dir=shared_data).source.endswith("mnist-full")


def test_missing_data_skips_here_and_fails_under_ci(tmp_path, monkeypatch):
    """CI sets VCL_JAX_REQUIRE_DATA=1: a missing dataset then fails the test that needs it
    instead of skipping it (a suite that skipped every end-to-end test would pass)."""
    import conftest

    missing = str(tmp_path / "nowhere")
    monkeypatch.setattr(conftest, "REQUIRE_DATA", False)  # as outside CI
    with pytest.raises(pytest.skip.Exception, match="nowhere"):
        conftest.require_data(missing, "offline data")
    monkeypatch.setattr(conftest, "REQUIRE_DATA", True)
    with pytest.raises(pytest.fail.Exception, match="VCL_JAX_REQUIRE_DATA"):
        conftest.require_data(missing, "offline data")
    assert conftest.require_data(str(tmp_path), "offline data") == str(tmp_path)
