"""One process of ``test_multihost.py``: a few VCL train steps of the `smoke` diffusion model
on fixed global batches, each process feeding its own rows of every batch.

    python tests/multihost_worker.py OUT.npz [--port P --num-processes N --process-id I]
        [--perturb]

Writes how far the steps moved this process's copy of the posterior means (leaf order).
``--perturb``: the last process scales its rows of every batch by −1 (the other processes do
not see them: only a reduction across processes can carry the change to them).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--perturb", action="store_true")
    parser.add_argument("--conv", default="auto")
    args = parser.parse_args()
    from vcl_jax import distributed

    if args.num_processes > 1:
        distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)

    from vcl_jax.config import override
    from vcl_jax.configs.vcl_diffusion import PRESETS
    from vcl_jax.protocols.vcl_diffusion_setup import build
    from vcl_jax.training.state import TrainState, data_sharding, make_train_step

    setup = build(override(PRESETS["smoke"], [f"conv_impl={args.conv}"]))
    params = setup.init_params(jax.random.key(0))
    method = setup.method("vcl", params, 0)
    # plain SGD: an update linear in the gradient, so float rounding stays rounding (Adam
    # turns the rounding noise of gradients that are zero in exact arithmetic, e.g. a conv
    # bias before a GroupNorm, into whole steps)
    opt = optax.sgd(0.05)
    state = TrainState.create(method, opt, params)
    trainable, mstate = method.begin_task(state.trainable, state.method_state, 0, 64)
    state = state._replace(trainable=trainable, method_state=mstate)
    sharding = data_sharding()
    step = jax.jit(make_train_step(method, opt, sharding))
    rng = np.random.default_rng(0)
    n, per = 16, 16 // args.num_processes
    mine = slice(args.process_id * per, (args.process_id + 1) * per)
    for i in range(3):
        batch = {"x": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
                 "task": rng.integers(0, 3, size=n).astype(np.int32)}
        if args.perturb and args.process_id == args.num_processes - 1:
            batch["x"][mine] *= -1.0
        if sharding is not None:  # the global batch from each process's own rows
            batch = {k: jax.make_array_from_process_local_data(sharding, v[mine])
                     for k, v in batch.items()}
        if i == 0:  # compile first, so the processes reach the first all-reduce together
            step = step.lower(state, batch, jax.random.key(i)).compile()
            distributed.sync("compiled")
        state, _ = step(state, batch, jax.random.key(i))
    moved = jax.tree.map(lambda a, b: a - b, state.trainable.mean, trainable.mean)
    np.savez(args.out, *[np.asarray(a) for a in jax.tree.leaves(moved)])


if __name__ == "__main__":
    main()
