"""Several processes training one model: JAX's multi-process runtime.

After :func:`initialize` every process sees every process's devices (``jax.devices()``). The
train step's mesh spans them all (:func:`vcl_jax.training.state.data_sharding`): every process
runs the same program on the same global batch indices, XLA computes each device's shard of
the batch and all-reduces the gradients across processes, and parameters and optimizer state
stay replicated, identical on every process. Evaluation runs on the same replicated state, so
its results are the same on every process. Files are written by the primary process (index 0)
only (:func:`is_primary`); checkpoints by Orbax, which coordinates the processes (on several
hosts the run directory must be on a shared filesystem).
"""

from __future__ import annotations

import jax


def initialize(coordinator: str, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to a multi-process run: ``coordinator`` ``host:port`` (process 0
    listens there) with ``num_processes`` and this ``process_id``, or ``"auto"`` for the
    cluster's own description (SLURM, Kubernetes, Cloud TPU; JAX detects it). On CPUs the
    gradient all-reduce goes through gloo collectives."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs --num-processes and --process-id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1}")
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; True in a single process)."""
    return jax.process_index() == 0


def primary_first(fn, name: str):
    """``fn()`` on process 0 first, then on the others (e.g. a cache that process 0 fills
    and the others then read); in one process, just ``fn()``."""
    if not is_primary():
        sync(name)
    out = fn()
    if is_primary():
        sync(name)
    return out


_BARRIERS: dict[str, int] = {}


def sync(name: str, timeout_s: float = 1800.0) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing in one process).

    A barrier of the coordination service, not a device collective: a process may wait
    here for minutes (another one training the evaluation classifier, or compiling), while
    the first collective of a program fails if the processes reach it more than ~30 s apart
    (gloo's context set-up on CPUs)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    count = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1  # each use its own barrier
    jax_distributed.global_state.client.wait_at_barrier(f"vcl_jax:{name}:{count}",
                                                        int(timeout_s * 1000))
