"""Faults and bad input: each is caught with a message that names it, nothing finished is
lost, and the re-run that resumes ends where an uninterrupted run ends.

Unit tests (default suite) inject each fault into the piece that handles it; the
end-to-end tests (marked slow) inject it into a real `smoke` VCL-diffusion run and check
that the finished checkpoints and `metrics.json` are byte-identical before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.checkpoint import CheckpointError, Checkpoints, ConfigMismatchError
from vcl_jax.config import override
from vcl_jax.data import fingerprint
from vcl_jax.run_lock import LOCK_NAME, RunLock, RunLockedError
from vcl_jax.training.guard import DivergenceError, check_finite, first_bad_epoch
from vcl_jax.vi import mean_field as mf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(root: str) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _kept(before: dict, after: dict) -> None:
    """Every file of ``before`` is in ``after``, byte-identical."""
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or lost: {changed[:5]}"


def _finished_files(run_dir: str) -> dict[str, str]:
    """The finished checkpoints (every sub-run) and metrics.json of a run directory."""
    snap = {p: h for p, h in _snapshot(run_dir).items()
            if ("/checkpoints/" in p or "/pretrained/" in p or p == "metrics.json")
            and ".orbax-checkpoint-tmp" not in p}  # a partial write is not a checkpoint
    assert snap, f"nothing finished in {run_dir}"
    return snap


# ---------------------------------------------------------------------------- the lock


def test_a_live_holder_is_named_and_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "since": "then"}))
        with pytest.raises(RunLockedError, match=f"PID {holder.pid} on host"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # untouched


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(),
                                                  "pid": dead.pid}))
    with pytest.warns(UserWarning, match="no longer runs"), RunLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match="being written by"):  # this process holds it
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_a_lock_from_another_host_is_refused_with_the_way_out(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunLockedError, match=r"cannot be checked from this host.*rm "):
        RunLock(str(tmp_path)).acquire()


def test_a_run_on_a_locked_directory_is_refused_before_writing(env, tmp_path):
    from vcl_jax.configs.split_mnist import PRESETS
    from vcl_jax.protocols import split_mnist

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(),
                                                      "pid": holder.pid}))
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            split_mnist.run(PRESETS["smoke"], str(tmp_path), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]


# ------------------------------------------------------------------ checkpoints


def _two_steps(folder: str) -> Checkpoints:
    ckpt = Checkpoints(folder, {"a": 1})
    for step in (0, 1):
        ckpt.save(step, {"w": jnp.full((64, 64), float(step))}, {"task": step})
    return ckpt


def _truncate_files(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            size = os.path.getsize(path)
            with open(path, "r+b") as fh:
                fh.truncate(size // 2)


def test_a_truncated_checkpoint_names_its_step_path_and_the_way_back(tmp_path):
    folder = str(tmp_path / "checkpoints")
    _two_steps(folder).close()
    _truncate_files(os.path.join(folder, "1"))
    before = _snapshot(folder)
    with pytest.raises(CheckpointError) as err:
        ckpt = Checkpoints(folder, {"a": 1})  # reads the latest step's metadata
        ckpt.restore(1, {"w": jnp.zeros((64, 64))})
    msg = str(err.value)
    assert "step 1" in msg and os.path.join(folder, "1") in msg
    assert "previous good checkpoint (step 0)" in msg and "mv " in msg
    assert len(msg.splitlines()) == 2  # one sentence and the command, no TensorStore dump
    _kept(before, _snapshot(folder))  # nothing deleted or rewritten
    subprocess.run(msg.splitlines()[1].split(), check=True)  # the command it gives
    ckpt = Checkpoints(folder, {"a": 1})
    assert ckpt.latest_step() == 0
    state, meta = ckpt.restore(0, {"w": jnp.zeros((64, 64))})
    assert meta["task"] == 0 and float(state["w"][0, 0]) == 0.0


def test_garbled_metadata_is_a_checkpoint_error_not_a_traceback(tmp_path):
    folder = str(tmp_path / "checkpoints")
    _two_steps(folder).close()
    for root, _, files in os.walk(os.path.join(folder, "1", "meta")):
        for f in files:
            with open(os.path.join(root, f), "w") as fh:
                fh.write("{not json")
    with pytest.raises(CheckpointError, match=r"step 1 at .* cannot be read"):
        Checkpoints(folder, {"a": 1})


def _fail_finalize_of(monkeypatch, step: int, exc: BaseException) -> None:
    """Orbax's commit of checkpoint ``step`` (the rename of its complete temporary folder)
    raises ``exc``: the data is written, the step never becomes visible."""
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.AtomicRenameTemporaryPath.finalize

    def finalize(self, *args, **kwargs):
        if os.path.basename(str(self.get_final())) == str(step):
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def test_a_full_disk_during_a_write_keeps_the_earlier_steps(tmp_path, monkeypatch):
    folder = str(tmp_path / "checkpoints")
    ckpt = Checkpoints(folder, {"a": 1})
    ckpt.save(0, {"w": jnp.ones(8)}, {"task": 0})
    before = _snapshot(folder)
    _fail_finalize_of(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError, match=r"step 1 .*No space left.*steps 0\.\.0 are intact"):
        ckpt.save(1, {"w": jnp.zeros(8)}, {"task": 1})
    monkeypatch.undo()
    _kept(before, _snapshot(folder))
    assert sorted(os.listdir(folder)) == ["0"]  # its own partial folder removed
    again = Checkpoints(folder, {"a": 1})
    assert again.latest_step() == 0
    np.testing.assert_array_equal(again.restore(0, {"w": jnp.ones(8)})[0]["w"], np.ones(8))


# --------------------------------------------------------------------- divergence


def test_non_finite_terms_and_variables_are_named():
    good = mf.MeanField({"w": jnp.ones(3)}, {"w": jnp.full(3, -6.0)})
    check_finite({"loss": 1.0, "kl": 2.0}, good, "x")  # all finite: no error
    with pytest.raises(DivergenceError, match=r"vcl_diffusion vcl task 2/3, epoch 4/9: the "
                                              r"training 'kl' became nan"):
        check_finite({"loss": 1.0, "kl": float("nan")}, good,
                     "vcl_diffusion vcl task 2/3, epoch 4/9")
    bad = mf.MeanField({"w": jnp.ones(3)}, {"w": jnp.array([-6.0, jnp.inf, -6.0])})
    with pytest.raises(DivergenceError, match=r"trainable variables .*log_var\['w'\]"):
        check_finite({"loss": 1.0}, bad, "here")
    assert first_bad_epoch({"loss": np.array([1.0, 2.0, np.nan]), "kl": np.ones(3)}) == 2
    assert first_bad_epoch({"loss": np.ones(3)}) is None


# ----------------------------------------------------------------------- data identity


def test_the_data_fingerprint_follows_the_content_not_the_folder():
    a = [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3)]
    assert fingerprint(a) == fingerprint([x.copy() for x in a])
    b = [a[0].copy(), a[1]]
    b[0][1, 2] += 1
    assert fingerprint(b) != fingerprint(a)
    assert fingerprint([a[0].astype(np.float64), a[1]]) != fingerprint(a)


# ------------------------------------------------------------- end to end, smoke preset


def _cfg(*extra: str):
    from vcl_jax.configs.vcl_diffusion import PRESETS

    return override(PRESETS["smoke"], ["classes=0,1", *extra])


def _run(run_dir: str, *extra: str) -> dict:
    from vcl_jax.protocols import vcl_diffusion

    return vcl_diffusion.run(_cfg(*extra), run_dir, progress=False)


def _same_result(a: dict, b: dict, name: str = "vcl_coreset0") -> None:
    ha, hb = a["runs"][name]["history"], b["runs"][name]["history"]
    assert len(ha) == len(hb) == 2
    for x, y in zip(ha, hb, strict=True):
        # scores pass through a 20-step sampler and the classifier, which magnify the last
        # bits of the weights (tests/golden.py); a wrong resume moves them by far more
        np.testing.assert_allclose(y["avg_uncertainty"], x["avg_uncertainty"], rtol=1e-3)
        np.testing.assert_allclose(y["train_final"]["loss"], x["train_final"]["loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory):
    """An uninterrupted run: MLE and VCL over digits 0 and 1."""
    run_dir = str(tmp_path_factory.mktemp("baseline"))
    return run_dir, _run(run_dir, "methods=mle,vcl")


@pytest.mark.slow
def test_a_diverging_task_stops_before_its_checkpoint_and_resumes(baseline, tmp_path,
                                                                  monkeypatch):
    from vcl_jax.training import sequence

    run_dir = str(tmp_path / "run")
    _run(run_dir, "methods=mle")  # a finished run, then VCL added to it
    real = sequence.train_epochs

    def poisoned(runner, state, data, key, **kw):  # VCL's second task sees NaN images
        if kw.get("where", "").startswith("vcl_diffusion vcl_coreset0 task 2/2"):
            data = dict(data, x=data["x"] * jnp.nan)
        return real(runner, state, data, key, **kw)

    monkeypatch.setattr(sequence, "train_epochs", poisoned)  # the task loop's training
    before = _finished_files(run_dir)
    messages = []
    for _ in range(2):  # the re-run fails the same way
        with pytest.raises(DivergenceError) as err:
            _run(run_dir, "methods=mle,vcl")
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("vcl_diffusion vcl_coreset0 task 2/2, epoch 1/2: the "
                                  "training 'kl' and 'loss' became nan")
    after = _finished_files(run_dir)
    _kept(before, after)
    ckpts = os.path.join(run_dir, "vcl_coreset0", "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["0"]  # task 1 checkpointed, the bad task 2 not
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))
    monkeypatch.undo()
    _same_result(baseline[1], _run(run_dir, "methods=mle,vcl"))


@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_run_goes_on_after_the_first(baseline, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(baseline[0], run_dir)
    before = _finished_files(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            _run(run_dir, "methods=mle,vcl")
        _kept(before, _finished_files(run_dir))
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="taking over the lock"):
        again = _run(run_dir, "methods=mle,vcl")
    _same_result(baseline[1], again)
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))


@pytest.mark.slow
def test_a_truncated_checkpoint_is_reported_and_the_run_resumes_from_the_one_before(
        baseline, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(baseline[0], run_dir)
    _truncate_files(os.path.join(run_dir, "vcl_coreset0", "checkpoints", "1"))
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as err:
        _run(run_dir, "methods=mle,vcl")
    _kept(before, _snapshot(run_dir))
    subprocess.run(str(err.value).splitlines()[1].split(), check=True)
    _same_result(baseline[1], _run(run_dir, "methods=mle,vcl"))


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_keeps_the_finished_ones(baseline, tmp_path,
                                                                 monkeypatch):
    run_dir = str(tmp_path / "run")
    _run(run_dir, "methods=mle")
    before = _finished_files(run_dir)
    _fail_finalize_of(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError, match="No space left"):
        _run(run_dir, "methods=mle,vcl")
    monkeypatch.undo()
    _kept(before, _finished_files(run_dir))
    assert sorted(os.listdir(os.path.join(run_dir, "vcl_coreset0", "checkpoints"))) == ["0"]
    _same_result(baseline[1], _run(run_dir, "methods=mle,vcl"))


def _cli(run_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.vcl_diffusion", "--preset", "smoke", "--quiet",
            "--run-dir", run_dir, "classes=0,1", "methods=mle,vcl", *extra]


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not os.path.isdir(path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()}"


@pytest.mark.slow
def test_sigterm_stops_the_run_with_its_checkpoints_intact(baseline, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(_cli(run_dir), cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(os.path.join(run_dir, "vcl_coreset0", "checkpoints", "0"), proc)
    proc.send_signal(signal.SIGTERM)  # during VCL's second task
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM: stopped" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))  # released on the way out
    before = _finished_files(run_dir)
    done = subprocess.run(_cli(run_dir), cwd=REPO, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    _kept({p: h for p, h in before.items() if p != "metrics.json"}, _finished_files(run_dir))
    _same_result(baseline[1], json.load(open(os.path.join(run_dir, "metrics.json"))))


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one(baseline, tmp_path):
    run_dir = str(tmp_path / "run")
    # The process is SIGKILLed from inside the commit of VCL's second checkpoint: its data is
    # written, the rename that makes it a step never happens.
    code = (
        "import os, signal, sys\n"
        "from orbax.checkpoint._src.path import atomicity\n"
        "real = atomicity.AtomicRenameTemporaryPath.finalize\n"
        "def finalize(self, *a, **k):\n"
        "    if 'vcl_coreset0' in str(self.get_final()) and str(self.get_final()).endswith('/1'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, *a, **k)\n"
        "atomicity.AtomicRenameTemporaryPath.finalize = finalize\n"
        "from experiments.vcl_diffusion import main\n"
        "main(sys.argv[1:])\n")
    args = _cli(run_dir)[3:]
    killed = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO,
                            env=os.environ.copy(), capture_output=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL
    ckpts = os.path.join(run_dir, "vcl_coreset0", "checkpoints")
    assert "0" in os.listdir(ckpts) and "1" not in os.listdir(ckpts)
    before = _finished_files(run_dir)
    # the dead process's lock is taken over; the partial write is ignored
    done = subprocess.run(_cli(run_dir), cwd=REPO, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "taking over the lock" in done.stderr
    _kept(before, _finished_files(run_dir))
    _same_result(baseline[1], json.load(open(os.path.join(run_dir, "metrics.json"))))


@pytest.mark.slow
def test_the_same_data_from_another_folder_resumes_and_other_data_is_refused(
        baseline, tmp_path, shared_data):
    run_dir = str(tmp_path / "run")
    shutil.copytree(baseline[0], run_dir)
    moved = tmp_path / "moved"
    shutil.copytree(os.path.join(shared_data, "mnist-5k"), moved / "mnist-5k")
    checkpoints = {p: h for p, h in _finished_files(run_dir).items() if p != "metrics.json"}
    again = _run(run_dir, "methods=mle,vcl", f"data_dir={moved}")  # finished: nothing to train
    _same_result(baseline[1], again)
    assert str(moved) in again["data"]["source"]  # metrics.json names the folder it read
    _kept(checkpoints, _finished_files(run_dir))
    before = _finished_files(run_dir)
    # other digits under the same name: the training images of digit 1 changed
    from vcl_jax.data import idx

    name = next(f for f in os.listdir(moved / "mnist-5k") if f.startswith("train-images"))
    images = np.array(idx.read_idx(str(moved / "mnist-5k" / name), expected_ndim=3))
    images[np.nonzero(idx.read_idx(str(moved / "mnist-5k" / name.replace(
        "images-idx3", "labels-idx1")), expected_ndim=1) == 1)[0][:5]] = 255
    idx.write_idx(str(moved / "mnist-5k" / name), images)
    with pytest.raises(ConfigMismatchError, match="data: checkpoint has"):
        _run(run_dir, "methods=mle,vcl", f"data_dir={moved}")
    _kept(before, _finished_files(run_dir))
