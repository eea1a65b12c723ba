"""Random keys by name.

An experiment splits its seed's key once into named keys (a NamedTuple such as
``RunKeys(init, coreset, train, eval)``), and a use inside one of them that needs a stream of
its own folds in that stream's name (:func:`stream`), never a bare number: the code says
what each key is for, and a new use cannot land on another one's numbers.

The numbers behind the names are fixed — they are the offsets the experiments folded in
before their streams had names — so a seed gives the same numbers as it always has.
"""

from __future__ import annotations

import jax

# stream name -> the integer folded in (plus the stream's index: a task, a member)
STREAMS = {
    "tune": 10_000,  # a task's coreset fine-tuning, inside the task's training key
    "pretrain": 100_000,  # VCL's MLE pre-training of its first prior's means
    "fisher": 200_000,  # the examples of an EWC Fisher, one per finished task
}
# no stream's indices may reach the next stream's
_SPACING = 10_000


def stream(key: jax.Array, name: str, index: int = 0) -> jax.Array:
    """Key number ``index`` of stream ``name`` inside ``key``.

    Raises:
      KeyError: an unknown stream (add it to :data:`STREAMS`).
      ValueError: an index outside ``0..9999``, which would reach another stream.
    """
    if not 0 <= index < _SPACING:
        raise ValueError(f"stream {name!r}: index {index} outside 0..{_SPACING - 1}")
    return jax.random.fold_in(key, STREAMS[name] + index)
