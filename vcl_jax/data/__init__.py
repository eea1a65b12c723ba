"""Data layer: datasets from local IDX/binary files or tfds, task streams, coresets."""

from vcl_jax.data.coreset import complement, kcenter_coreset, random_coreset, select
from vcl_jax.data.errors import DataError
from vcl_jax.data.preprocess import pad_to, to_float, to_unit
from vcl_jax.data.sources import (
    ENV_VAR,
    VARIANTS,
    Dataset,
    data_record,
    data_text,
    find_local,
    fingerprint,
    identity,
    load,
    source_of,
    variants,
)
from vcl_jax.data.tasks import Task, TaskStream

__all__ = [
    "ENV_VAR", "VARIANTS", "DataError", "Dataset", "Task", "TaskStream", "complement",
    "data_record", "data_text", "find_local", "fingerprint", "identity", "kcenter_coreset",
    "load", "pad_to", "random_coreset", "select", "source_of", "to_float", "to_unit", "variants",
]
