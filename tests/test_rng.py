"""Named key streams (vcl_jax.rng): fixed numbers behind the names, indices kept apart."""

import jax
import pytest

from vcl_jax import rng


def test_streams_are_the_offsets_the_runs_always_used():
    key = jax.random.key(3)
    same = jax.random.fold_in(key, 200_000 + 4)
    assert (jax.random.key_data(rng.stream(key, "fisher", 4)) ==
            jax.random.key_data(same)).all()
    assert not (jax.random.key_data(rng.stream(key, "fisher", 5)) ==
                jax.random.key_data(same)).all()


def test_unknown_streams_and_overflowing_indices_are_refused():
    key = jax.random.key(0)
    with pytest.raises(KeyError):
        rng.stream(key, "replay")
    with pytest.raises(ValueError, match="outside 0..9999"):
        rng.stream(key, "tune", 10_000)
    starts = sorted(rng.STREAMS.values())
    assert all(b - a >= 10_000 for a, b in zip(starts, starts[1:], strict=False))
