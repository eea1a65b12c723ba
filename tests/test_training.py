"""The train step: one trace, rolled vs unrolled epochs, two-device equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.continual import mle, vcl
from vcl_jax.training.epoch import EpochRunner, epoch_indices, pad_rows, row_bucket
from vcl_jax.training.state import TrainState, adam, make_train_step, train_epochs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linear_problem():
    x = jax.random.normal(jax.random.key(0), (40, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def batch_loss(params, batch, key):
        del key
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    return {"x": x, "y": y}, batch_loss, {"w": jnp.zeros(3)}


def test_epoch_indices_cover_every_example():
    idx = np.asarray(epoch_indices(jax.random.key(0), 10, 4, multiple=2))
    assert idx.shape == (4, 4)  # 3 steps rounded up to a multiple of 2
    assert set(idx.ravel().tolist()) == set(range(10))


def test_padded_tasks_of_other_sizes_share_one_compiled_epoch():
    assert [row_bucket(n) for n in (1, 256, 257, 500, 4096)] == [256, 256, 512, 512, 4096]
    data, batch_loss, params = _linear_problem()
    method, opt = mle(batch_loss), adam(0.1)
    runner = EpochRunner(make_train_step(method, opt), batch_size=8, unroll=2, donate=False)
    state = TrainState(params, opt.init(params), ())
    key = jax.random.key(3)
    plain, _ = runner(state, data, key)
    padded, _ = runner(state, pad_rows(data, 64), key, n=40)
    chex.assert_trees_all_equal(plain, padded)  # the padding rows are never drawn
    # train_epochs pads: tasks of 40 and 30 examples run one compiled epoch function
    traced = chex.assert_max_traces(make_train_step(method, opt), n=1)
    runner = EpochRunner(traced, batch_size=8, unroll=2)
    for n in (40, 30):
        sub = jax.tree.map(lambda a, n=n: a[:n], data)
        state, _ = train_epochs(runner, state, sub, key, epochs=1, learning_rate=0.1,
                                decay=False, progress=False)


def test_train_step_traces_once():
    data, batch_loss, params = _linear_problem()
    method = mle(batch_loss)
    opt = adam(0.1)
    step = chex.assert_max_traces(make_train_step(method, opt), n=1)
    runner = EpochRunner(step, batch_size=8, unroll=0)
    state = TrainState(params, opt.init(params), ())
    state, hist = train_epochs(runner, state, data, jax.random.key(1), epochs=3,
                               learning_rate=0.1, decay=True, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_plain_adam_keeps_the_checkpointed_state_layout():
    # Every checkpoint written so far holds inject_hyperparams(optax.adam)'s state; a
    # different layout (e.g. fewer injected hyperparameters) would make them unrestorable.
    import optax

    params = {"w": jnp.ones(3)}
    ours = jax.tree.structure(adam(0.1).init(params))
    assert ours == jax.tree.structure(optax.inject_hyperparams(optax.adam)(0.1).init(params))


def test_rolled_and_unrolled_epochs_agree():
    data, batch_loss, params = _linear_problem()
    method = vcl(batch_loss, n_samples=2, log_var_init=-6.0)
    opt = adam(0.05)

    def run(unroll, multiple, n):
        q, ms = method.init(jax.tree.map(jnp.copy, params))  # each run donates its own
        ms = method.begin_task(q, ms, 0, n)[1]
        state = TrainState(q, opt.init(q), ms)
        runner = EpochRunner(make_train_step(method, opt), batch_size=10, unroll=unroll,
                             multiple=multiple)
        sub = jax.tree.map(lambda a: a[:n], data)
        state, _ = train_epochs(runner, state, sub, jax.random.key(2), epochs=2,
                                learning_rate=0.05, decay=False, progress=False)
        return state.trainable

    # a rolled scan and calls of 2 steps (4 batches of 10 per epoch)
    chex.assert_trees_all_close(run(0, None, 40), run(2, None, 40), rtol=1e-5, atol=1e-6)
    # calls of 1 step drawing the epochs of calls of 2 (3 batches rounded up to 4)
    chex.assert_trees_all_close(run(2, None, 30), run(1, 2, 30), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="calls of 3 steps"):
        EpochRunner(make_train_step(method, opt), batch_size=10, unroll=3, multiple=2)


_TWO_DEVICES = r"""
import json, jax, jax.numpy as jnp, numpy as np
from vcl_jax.config import override
from vcl_jax.continual import vcl
from vcl_jax.models import mlp
from vcl_jax.protocols import vcl_diffusion, vcl_diffusion_setup
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.training.state import TrainState, adam, data_sharding, make_train_step
assert jax.local_device_count() == 2, jax.devices()
# MLE on the smoke U-Net, and VCL (two weight draws over the whole batch) on a multi-head
# MLP: the same train step and sharding; the MLP keeps the VCL compile cheap.
setup = vcl_diffusion_setup.build(PRESETS["smoke"])
unet_batch = {"x": jax.random.uniform(jax.random.key(1), (16, 28, 28, 1)),
              "task": jnp.arange(16, dtype=jnp.int32) % 3}
mlp_params = mlp.init_mlp(jax.random.key(4), 20, (16,), 2, 2)
mlp_loss = lambda p, b, key: jnp.mean(mlp.nll(mlp.apply(p, b["x"], b["head"]), b["y"]))
mlp_batch = {"x": jax.random.normal(jax.random.key(5), (16, 20)),
             "y": jnp.arange(16, dtype=jnp.int32) % 2, "head": jnp.arange(16) % 2}
cases = {"mle": (setup.method("mle", setup.init_params(jax.random.key(0))),
                 setup.init_params(jax.random.key(0)), unet_batch),
         "vcl": (vcl(mlp_loss, n_samples=2, log_var_init=-6.0), mlp_params, mlp_batch)}
out = {}
for name, (method, params, batch) in cases.items():
    opt = adam(1e-3)
    tr, ms = method.init(params)
    tr, ms = method.begin_task(tr, ms, 0, 32)
    state = TrainState(tr, opt.init(tr), ms)
    for label, sharding in (("one", None), ("two", data_sharding())):
        step = jax.jit(make_train_step(method, opt, sharding))
        new, metrics = step(state, batch, jax.random.key(3))
        leaf = jax.tree.leaves(new.trainable)[0]
        out[f"{name}_{label}"] = {"loss": float(metrics["loss"]),
                                 "param": np.asarray(leaf).ravel()[:50].tolist()}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # ~35 s of compiles in a subprocess; CI runs it (and the two-process test)
def test_two_devices_match_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("mle", "vcl"):
        one, two = out[f"{name}_one"], out[f"{name}_two"]
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
        np.testing.assert_allclose(two["param"], one["param"], rtol=1e-4, atol=1e-6)


def test_the_task_loop_trains_each_task_by_index_and_resumes_after_the_last_checkpoint(
        tmp_path):
    from vcl_jax.checkpoint import Checkpoints
    from vcl_jax.continual import TrainData
    from vcl_jax.training.sequence import TrainSchedule, epoch_trainer, fold_keys, run_sequence

    data, batch_loss, params = _linear_problem()
    method, opt = mle(batch_loss), adam(0.05)
    runner = EpochRunner(make_train_step(method, opt), 8, 0)
    usual = epoch_trainer(runner, TrainSchedule(2, 0.05, False), where="test", progress=False)
    seen = []

    def train(state, task_data, key, task, label):
        seen.append((task, label))
        return usual(state, task_data, key, task, label)

    def run(n_tasks, ckpt):
        trainable, mstate = method.init(jax.tree.map(jnp.copy, params))
        return run_sequence(
            method, TrainState(trainable, opt.init(trainable), mstate), n_tasks,
            prepare=lambda d, state: TrainData(data, 40), train=train,
            evaluate=lambda d, p: ({"w0": float(p["w"][0])}, None),
            task_keys=fold_keys(jax.random.key(1)), name="toy", ckpt=ckpt, progress=False)

    first = run(2, Checkpoints(str(tmp_path / "c"), {"toy": 1}))
    assert seen == [(0, "toy task 1/2"), (1, "toy task 2/2")]
    assert [len(first["task_seconds"][p]) for p in ("train", "eval")] == [2, 2]
    seen.clear()
    more = run(3, Checkpoints(str(tmp_path / "c"), {"toy": 1}))  # tasks 0, 1 are done
    assert seen == [(2, "toy task 3/3")]
    assert more["history"][:2] == first["history"] and len(more["history"]) == 3
    uninterrupted = run(3, None)
    np.testing.assert_allclose(more["history"][2]["w0"], uninterrupted["history"][2]["w0"],
                               rtol=1e-6)
