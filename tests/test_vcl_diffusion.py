"""The VCL-diffusion experiment end to end on the smoke preset."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vcl_jax.analysis.sampling import sample_from_run
from vcl_jax.checkpoint import ConfigMismatchError
from vcl_jax.config import ConfigError, override, preset
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.protocols import vcl_diffusion, vcl_diffusion_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(env, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("smoke"))
    cfg = override(PRESETS["smoke"], ["coreset_sizes=0,4"])  # both code paths, both methods
    metrics = vcl_diffusion.run(cfg, run_dir, progress=False)
    return run_dir, cfg, metrics


def test_smoke_writes_every_output(smoke_run):
    run_dir, cfg, metrics = smoke_run
    for f in ("config.json", "metrics.json", "summary.md", "uncertainty.png", "uncertainty_log.png",
              "uncertainty_per_digit.png"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    names = ["mle_coreset0", "vcl_coreset0", "mle_coreset4", "vcl_coreset4"]
    assert sorted(metrics["runs"]) == sorted(names)
    for name in names:
        assert os.path.isfile(os.path.join(run_dir, f"grid_{name}.png"))
        hist = metrics["runs"][name]["history"]
        assert [h["task"] for h in hist] == [0, 1, 2]
        assert all(np.isfinite(h["avg_uncertainty"]) and h["avg_uncertainty"] >= 0 for h in hist)
        assert sorted(hist[-1]["per_class"]) == ["0", "1", "2"]
        with np.load(os.path.join(run_dir, name, "samples_task2.npz")) as z:
            assert z["images"].shape == (3 * cfg.eval.eval_per_class, 28, 28)
            assert z["images"].min() >= 0 and z["images"].max() <= 1
            assert sorted(set(z["labels"].tolist())) == [0, 1, 2]
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["coreset_sizes"] == [0, 4] and saved["run"]["seed"] == cfg.run.seed


def _tb_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every TensorBoard event file in ``folder`` (TFRecords of Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_smoke_run_logs_every_epoch_and_task_with_its_provenance(smoke_run):
    run_dir, cfg, metrics = smoke_run
    lines = [json.loads(ln) for ln in open(os.path.join(run_dir, "log.jsonl"))]
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "end"
    prov = lines[0]["provenance"]
    assert prov == {**metrics["provenance"], "command": prov["command"]}
    assert set(prov["versions"]) >= {"python", "jax", "jaxlib", "flax", "optax",
                                     "orbax-checkpoint"}
    assert prov["versions"]["jax"] == jax.__version__ and prov["devices"] and prov["cpu"]
    assert len(prov["git_commit"] or "0" * 40) == 40  # None outside a git checkout
    epochs = [ln for ln in lines if ln["kind"] == "epoch"]
    for name, size in [("mle", 0), ("vcl", 0), ("mle", 4), ("vcl", 4)]:
        run = f"{name}_coreset{size}"
        train = [e for e in epochs if e["run"] == run and e["phase"] == "train"]
        tune = [e for e in epochs if e["run"] == run and e["phase"] == "tune"]
        pre = cfg.vcl.vcl_pretrain_epochs if name == "vcl" else 0
        assert len(train) == 3 * cfg.optim.epochs + pre  # every epoch of every task, pre-training
        assert len(tune) == (3 * cfg.coreset.coreset_epochs if size else 0)
        steps = [e["step"] for e in train]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
        assert all(np.isfinite(e["loss"]) and e["samples_per_s"] > 0 and e["lr"] > 0
                   for e in train)
        assert ("kl" in train[-1]) == (name == "vcl")
        tasks = [ln for ln in lines if ln["kind"] == "task" and ln["run"] == run]
        assert [t["task"] for t in tasks] == [1, 2, 3]
        assert [t["avg_uncertainty"] for t in tasks] == [
            h["avg_uncertainty"] for h in metrics["runs"][run]["history"]]
    if importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("tensorboardX (the `tensorboard` extra) is not installed")
    tb = _tb_scalars(os.path.join(run_dir, "tb"))
    assert len(tb["vcl_coreset0/train/loss"]) == 3 * cfg.optim.epochs + cfg.vcl.vcl_pretrain_epochs
    assert [v for _, v in tb["mle_coreset4/task/avg_uncertainty"]] == pytest.approx(
        [h["avg_uncertainty"] for h in metrics["runs"]["mle_coreset4"]["history"]])


def test_run_log_lines_are_readable_while_the_run_goes(tmp_path):
    from vcl_jax import runlog

    path = tmp_path / "log.jsonl"
    with runlog.open_log(str(tmp_path), units=2, progress=False) as log:
        assert runlog.current() is log
        log.epoch("mle_coreset0 task 1/2", 1, 1, 10, 640, 2.0, 1e-3, {"loss": 0.5})
        lines = path.read_text().splitlines()  # before the log is closed
        assert [json.loads(ln)["kind"] for ln in lines] == ["start", "epoch"]
        assert json.loads(lines[1])["samples_per_s"] == 320.0
    assert runlog.current() is None


def test_no_forgetting_bound_averages_each_digit_right_after_it_was_learned(smoke_run):
    from vcl_jax.protocols.vcl_diffusion_report import no_forgetting_bound

    hist = [{"per_class": {"3": 1.0}}, {"per_class": {"3": 5.0, "7": 2.0}},
            {"per_class": {"3": 9.0, "7": 4.0, "1": 0.0}}]
    assert no_forgetting_bound(hist, (3, 7, 1)) == [1.0, 1.5, 1.0]
    assert no_forgetting_bound(hist[:2], (3, 7, 1)) == [1.0, 1.5]
    run_dir = smoke_run[0]
    summary = open(os.path.join(run_dir, "summary.md")).read()
    assert "No-forgetting bound" in summary and "MLE's no-forgetting bound / MLE" in summary
    assert "| vcl_coreset0 |" in summary.split("Right after")[1]
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert set(metrics["continual"]) == set(metrics["runs"])
    assert set(metrics["over_mle"]) == set(metrics["runs"]) - {"mle_coreset0"}


def test_forgetting_and_right_after_carry_standard_errors():
    from vcl_jax.protocols.vcl_diffusion_report import continual_scores

    hist = [{"per_class": {"3": 1.0}, "per_class_stderr": {"3": 0.3}},
            {"per_class": {"3": 5.0, "7": 2.0}, "per_class_stderr": {"3": 0.4, "7": 0.1}},
            {"per_class": {"3": 9.0, "7": 4.0, "1": 0.0},
             "per_class_stderr": {"3": 0.4, "7": 0.2, "1": 0.6}}]
    c = continual_scores(hist, (3, 7, 1))
    assert np.isclose(c["right_after"], 1.0)  # (1 + 2 + 0) / 3
    assert np.isclose(c["right_after_stderr"], np.sqrt(0.09 + 0.01 + 0.36) / 3)
    assert np.isclose(c["forgetting"], 5.0)  # ((9 − 1) + (4 − 2)) / 2
    assert np.isclose(c["forgetting_stderr"], np.sqrt(0.16 + 0.09 + 0.04 + 0.01) / 2)
    assert "forgetting" not in continual_scores(hist[:1], (3, 7, 1))


def test_joint_reference_trains_once_on_every_task(env, tmp_path):
    cfg = override(PRESETS["smoke"], ["methods=joint", "coreset_sizes=0,4"])
    run_dir = str(tmp_path / "joint")
    metrics = vcl_diffusion.run(cfg, run_dir, progress=False)
    assert sorted(metrics["runs"]) == ["joint"]  # once, whatever the coreset sizes
    hist = metrics["runs"]["joint"]["history"]
    # one evaluation of every class; "after task d" keeps the classes of tasks 0..d
    assert [sorted(h["per_class"]) for h in hist] == [["0"], ["0", "1"], ["0", "1", "2"]]
    assert all(h["per_class"]["0"] == hist[-1]["per_class"]["0"] for h in hist)
    with np.load(os.path.join(run_dir, "joint", "samples_task1.npz")) as z:
        assert sorted(set(z["labels"].tolist())) == [0, 1]
    assert "`joint` is the reference" in open(os.path.join(run_dir, "summary.md")).read()
    out = sample_from_run(run_dir, method="joint", digits=[2], n=2,
                          out=str(tmp_path / "j.npz"))
    with np.load(out) as z:
        assert z["images"].shape == (2, 28, 28)
    again = vcl_diffusion.run(cfg, run_dir, progress=False)  # resumes: nothing retrained
    assert again["runs"]["joint"] == metrics["runs"]["joint"]


def test_rerun_of_a_finished_run_resumes_without_training(smoke_run):
    run_dir, cfg, metrics = smoke_run
    start = time.perf_counter()
    again = vcl_diffusion.run(cfg, run_dir, progress=False)
    assert again["runs"] == metrics["runs"]
    assert time.perf_counter() - start < 60


def test_other_config_never_overwrites(smoke_run):
    run_dir, cfg, _ = smoke_run
    ckpts = os.path.join(run_dir, "mle_coreset0", "checkpoints")
    before = {f: os.path.getmtime(os.path.join(ckpts, f)) for f in os.listdir(ckpts)}
    cfg_bytes = open(os.path.join(run_dir, "config.json"), "rb").read()
    with pytest.raises(ConfigMismatchError, match="epochs"):
        vcl_diffusion.run(override(cfg, ["epochs=3"]), run_dir, progress=False)
    after = {f: os.path.getmtime(os.path.join(ckpts, f)) for f in os.listdir(ckpts)}
    assert before == after
    assert open(os.path.join(run_dir, "config.json"), "rb").read() == cfg_bytes


def test_checkpoint_directory_from_other_config(smoke_run, tmp_path):
    import shutil

    run_dir, cfg, _ = smoke_run
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(run_dir, "mle_coreset0"), os.path.join(other, "mle_coreset0"))
    with pytest.raises(ConfigMismatchError, match="lr_decay"):
        vcl_diffusion.run(override(cfg, ["lr_decay=false", "methods=mle", "coreset_sizes=0"]),
                          other, progress=False)


def test_checkpoint_reload_and_sample(smoke_run, tmp_path):
    run_dir, cfg, _ = smoke_run
    out = sample_from_run(run_dir, task=2, digits=[0, 2], n=3, method="vcl_coreset0",
                          out=str(tmp_path / "s.npz"))
    with np.load(out) as z:
        assert z["images"].shape == (6, 28, 28)
        assert z["labels"].tolist() == [0, 0, 0, 2, 2, 2]
        assert 0 <= z["images"].min() and z["images"].max() <= 1
    avg = sample_from_run(run_dir, task=2, digits=[0, 2], n=3, method="vcl_coreset0",
                          out=str(tmp_path / "a.npz"), average_draws=True)
    with np.load(out) as z, np.load(avg) as za:  # ε averaged over the draws: other images
        assert za["images"].shape == (6, 28, 28) and not np.allclose(za["images"], z["images"])
    png = sample_from_run(run_dir, task=1, n=2, method="mle_coreset4", out=str(tmp_path / "s.png"))
    assert os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match="not learned by task 0"):
        sample_from_run(run_dir, task=0, digits=[1], n=2)
    with pytest.raises(ConfigError, match="unknown run"):
        sample_from_run(run_dir, method="ewc_coreset0")


def test_sample_entry_point(smoke_run, tmp_path, env):
    run_dir, _, _ = smoke_run
    from experiments import rescore, sample

    out = str(tmp_path / "cli.npz")
    # In this process (a subprocess would import JAX and compile the sampler again).
    assert sample.main(["--run", run_dir, "--task", "2", "--digits", "1", "--n", "2",
                        "--out", out]) == out
    assert np.load(out)["images"].shape == (2, 28, 28)
    got = rescore.main(["--run", run_dir, "--method", "mle_coreset0", "--n", "2", "--tasks", "0",
                        "--guidance", "0"])
    assert got["args"]["guidance"] == 0 and len(got["history"]) == 1
    assert os.path.isfile(os.path.join(run_dir, "rescore_mle_coreset0_draws_ddpm_a0_n2_s1.json"))


def test_bad_settings_are_clear_errors(env, tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        preset(PRESETS, "fast")
    with pytest.raises(ConfigError, match="unknown method"):
        vcl_diffusion.run(override(PRESETS["smoke"], ["methods=mle,ewc_full"]), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="coreset size 40 is larger than task 0"):
        vcl_diffusion.run(override(PRESETS["smoke"], ["coreset_sizes=40"]), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="unknown config key"):
        override(PRESETS["smoke"], ["epoch=3"])
    with pytest.raises(ConfigError, match="expected int"):
        override(PRESETS["smoke"], ["epochs=many"])
    with pytest.raises(ConfigError, match="unknown estimator 'local'"):
        override(PRESETS["smoke"], ["estimator=local"]).validate()
    with pytest.raises(ConfigError, match="unknown weight_draws 'scan'"):
        override(PRESETS["smoke"], ["weight_draws=scan"]).validate()
    with pytest.raises(ConfigError, match="batch_size=16 must be a multiple"):
        override(PRESETS["smoke"], ["estimator=grouped", "train_samples=3"]).validate()
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_a_coreset_is_selected_once_per_task(monkeypatch):
    # VCL's pre-training withholds task 0's coreset and the coreset member asks for it again:
    # one selection, the same indices; other images or another size select afresh
    from vcl_jax.protocols import vcl_diffusion_setup as vds

    calls = []
    real = vds.coreset_indices

    def counted(*args):
        calls.append(args[2:4])
        return real(*args)

    monkeypatch.setattr(vds, "coreset_indices", counted)
    setup = vcl_diffusion_setup.build(override(PRESETS["smoke"], ["coreset_method=kcenter"]))
    x = np.random.default_rng(0).random((30, 28, 28, 1), np.float32)
    first = setup.coreset_of(0, x, 4)
    np.testing.assert_array_equal(setup.coreset_of(0, x.copy(), 4), first)
    assert len(calls) == 1
    assert not first.flags.writeable
    setup.coreset_of(0, x[::-1], 4)
    setup.coreset_of(0, x, 5)
    setup.coreset_of(1, x, 4)
    assert len(calls) == 4
    np.testing.assert_array_equal(first, real(setup.cfg, vds.run_keys(setup.cfg).coreset, 0, x, 4))


@pytest.mark.slow  # ~50 s: its own smoke run; `make test-all`
def test_replay_mode_and_ddim_evaluation(env, tmp_path):
    # MLE (the coreset member acts on the data whatever trains; chain(vcl, coreset) is
    # tested in test_fisher) on the smoke preset's tasks, whose train step is compiled already
    cfg = override(PRESETS["smoke"], ["coreset_sizes=4", "coreset_mode=replay", "methods=mle",
                                      "sampler=ddim", "ddim_steps=5", "classes=3,4,5"])
    metrics = vcl_diffusion.run(cfg, str(tmp_path), progress=False)
    hist = metrics["runs"]["mle_coreset4"]["history"]
    assert sorted(hist[-1]["per_class"]) == ["3", "4", "5"]
    # replay mode fine-tunes nothing before evaluation (the chain test checks its data)
    seconds = metrics["runs"]["mle_coreset4"]["task_seconds"]
    assert len(seconds["tune"]) == 3 and max(seconds["tune"]) < 1  # no fine-tuning to do


def _cli(run_dir: str) -> list[str]:
    return [sys.executable, "-m", "experiments.vcl_diffusion", "--preset", "smoke", "--quiet",
            "--run-dir", run_dir, "methods=vcl", "classes=0,1,2,3"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(env, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_cli(full), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    proc = subprocess.Popen(_cli(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = os.path.join(killed, "vcl_coreset0", "checkpoints", "1")
    deadline = time.time() + 600
    while not os.path.isdir(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # during task 3
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "metrics.json"))
    subprocess.run(_cli(killed), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    a = json.load(open(os.path.join(full, "metrics.json")))["runs"]["vcl_coreset0"]["history"]
    b = json.load(open(os.path.join(killed, "metrics.json")))["runs"]["vcl_coreset0"]["history"]
    assert len(a) == len(b) == 4
    for ha, hb in zip(a, b, strict=True):
        np.testing.assert_allclose(hb["avg_uncertainty"], ha["avg_uncertainty"], rtol=1e-5)
        np.testing.assert_allclose(hb["train_final"]["loss"], ha["train_final"]["loss"], rtol=1e-5)


def test_vcl_only_change_reuses_finished_mle_runs(smoke_run, tmp_path):
    import shutil

    src, cfg, metrics = smoke_run
    run_dir = str(tmp_path / "copy")  # this test rewrites config.json: leave the fixture's alone
    shutil.copytree(src, run_dir)
    start = time.perf_counter()
    again = vcl_diffusion.run(override(cfg, ["kl_scale=0.5", "methods=mle"]), run_dir,
                              progress=False)
    assert again["runs"]["mle_coreset0"] == metrics["runs"]["mle_coreset0"]
    assert time.perf_counter() - start < 60
    with pytest.raises(ConfigMismatchError, match="kl_scale"):
        vcl_diffusion.run(override(cfg, ["kl_scale=0.5"]), run_dir, progress=False)


def test_speed_only_fields_share_checkpoints():
    from vcl_jax.checkpoint import config_diff
    from vcl_jax.protocols.vcl_diffusion_setup import SPEED_ONLY, sub_run_identity

    cfg = PRESETS["smoke"]
    xla = sub_run_identity(override(cfg, ["conv_impl=xla", "weight_draws=vmap"]), "vcl", 0)
    assert config_diff(xla, sub_run_identity(cfg, "vcl", 0), SPEED_ONLY) == []
    assert config_diff(xla, sub_run_identity(cfg, "vcl", 0))  # they are recorded, not ignored


def test_a_run_of_another_format_is_refused_by_name(smoke_run, tmp_path):
    """Checkpoints and config.json record the run format; what another format wrote is
    refused in one line naming it (no per-field upgrades), and nothing is overwritten."""
    from vcl_jax.analysis.sampling import load_config
    from vcl_jax.checkpoint import RUN_FORMAT, Checkpoints

    src, cfg, _ = smoke_run
    assert json.load(open(os.path.join(src, "config.json")))["format"] == RUN_FORMAT
    raw = {k: v for k, v in json.load(open(os.path.join(src, "config.json"))).items()
           if k != "format"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigMismatchError, match="a run format before 3"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, format=RUN_FORMAT + 1)))
    with pytest.raises(ConfigMismatchError, match=f"run format {RUN_FORMAT + 1}; this code"):
        load_config(str(tmp_path))
    # a checkpoint saved by an older format: its folder is refused before anything is written
    folder = str(tmp_path / "ckpt")
    ckpt = Checkpoints(folder, {"a": 1})
    ckpt.save(0, {"w": np.zeros(2)}, {"record": {}})
    ckpt.close()
    meta = os.path.join(folder, "0", "meta", "metadata")
    saved = json.load(open(meta))
    json.dump(dict(saved, format=2), open(meta, "w"))
    with pytest.raises(ConfigMismatchError, match="written by run format 2"):
        Checkpoints(folder, {"a": 1})
    assert sorted(os.listdir(folder)) == ["0"]


@pytest.mark.slow  # ~1-1.5 min of compiles; its parts: test_vi (layouts), test_models (convs)
def test_weight_draw_layouts_give_the_same_vcl_step():
    # "loop" (K U-Nets with plain kernels, XLA convolutions) and "vmap" (batched kernels, the
    # patches form on CPU) compute the same estimate from the same keys (the paper estimator's
    # layouts: tests/test_vi.py)
    estimator = "grouped"
    import jax
    import jax.numpy as jnp

    cfg = override(PRESETS["smoke"], [f"estimator={estimator}", "train_samples=2"])
    assert vcl_diffusion_setup.build(cfg).draws_layout == (
        "loop" if jax.default_backend() == "cpu" else "vmap")
    # looped draws: calls of at most `unroll` U-Net copies, a divisor of `unroll` steps
    calls = {(u, k): vcl_diffusion_setup.build(override(cfg, [f"unroll={u}", f"train_samples={k}",
                                                        "weight_draws=loop"])).steps_per_call("vcl")
             for u, k in ((8, 8), (8, 2), (9, 2), (8, 16))}
    assert calls == {(8, 8): 1, (8, 2): 4, (9, 2): 3, (8, 16): 1}
    batch = {"x": jax.random.uniform(jax.random.key(1), (4, 28, 28, 1)),
             "task": jnp.array([0, 1, 2, 0])}
    grads = []
    for layout in ("vmap", "loop"):
        setup = vcl_diffusion_setup.build(override(cfg, [f"weight_draws={layout}"]))
        params = setup.init_params(jax.random.key(0))
        method = setup.method("vcl", params)
        q, state = method.begin_task(*method.init(params), 0, 32)
        loss = jax.jit(jax.grad(lambda q, m=method, s=state: m.loss(q, s, batch,
                                                                     jax.random.key(2))[0]))
        grads.append(loss(q))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # 60 s (U-Net per-example gradients); the chains' library tests stay default
def test_composed_method_vcl_with_rank1_ewc_penalises_the_posterior_means():
    import jax.numpy as jnp

    from vcl_jax.protocols.vcl_diffusion_setup import sub_run_identity

    cfg = override(PRESETS["smoke"], ["methods=mle,vcl+ewc_rank1,ewc_diag"])
    setup = vcl_diffusion_setup.build(cfg)
    params = setup.init_params(jax.random.key(0))
    method = setup.method("vcl+ewc_rank1", params)
    assert method.name == "vcl+ewc_rank1" and setup.eval_draws(method) == cfg.vcl.eval_samples
    x = np.asarray(jax.random.uniform(jax.random.key(1), (6, 28, 28, 1)))
    q, states = method.begin_task(*method.init(params), 0, 6)
    fisher = setup.fisher_data("vcl+ewc_rank1", x, 0, jax.random.key(4))
    assert fisher["x"].shape[0] == min(cfg.ewc.fisher_samples, 6)
    assert set(fisher["task"].tolist()) == {0}
    assert setup.fisher_data("vcl", x, 0, jax.random.key(4)) is None
    states = method.end_task(q, states, 0, fisher)
    leaf = lambda t: jax.tree.leaves(t)[0]
    np.testing.assert_array_equal(leaf(states[1].anchors)[0], leaf(q.mean))
    assert float(states[1].curvature.scale[0]) > 0
    moved = q._replace(mean=jax.tree.map(lambda a: a + 0.01, q.mean))
    batch = {"x": jnp.asarray(x), "task": jnp.zeros(6, jnp.int32)}
    _, metrics = method.loss(moved, states, batch, jax.random.key(2))
    assert {"loss", "kl", "penalty"} <= set(metrics) and float(metrics["penalty"]) > 0
    # EWC's settings key only the sub-runs that use them
    assert "ewc.ewc_lambda" in sub_run_identity(cfg, "vcl+ewc_rank1", 0)
    assert "ewc.ewc_lambda" not in sub_run_identity(cfg, "vcl", 0)
    assert "vcl.kl_scale" not in sub_run_identity(cfg, "ewc_diag", 0)
    for bad, msg in (("vcl+mle", "at most one trainer"),
                     ("vcl+ewc_kfac", "'ewc_kfac' is not a member"),
                     ("ewc_diag+ewc_diag", "at most one penalty"),
                     ("vcl+coreset_random", "cannot build 'coreset_random'")):
        with pytest.raises(ConfigError, match=msg):
            override(cfg, [f"methods={bad}"]).validate()


@pytest.mark.slow  # ~45 s of sampling and scoring
def test_diagnostics_on_a_smoke_run(smoke_run):
    from vcl_jax.analysis import vcl_diagnostics

    run_dir, _, _ = smoke_run
    rows = vcl_diagnostics.drift(run_dir, 1, "vcl_coreset0")
    assert {r["random"] for r in rows} == {True, False}
    assert all(np.isfinite(r["relative"]) and r["change"] >= 0 for r in rows)
    assert any(r["change"] > 0 for r in rows)  # a task of training moves something
    with pytest.raises(ValueError, match="task ≥ 1"):
        vcl_diagnostics.drift(run_dir, 0, "vcl_coreset0")
    cfg = vcl_diagnostics.load_checkpoint(run_dir, task=0, method="vcl_coreset0").cfg
    spread = vcl_diagnostics.spread(run_dir, 0, "vcl_coreset0")
    assert spread and all(r["log_var_min"] <= r["log_var_mean"] <= r["log_var_max"]
                          and r["sigma_over_rms"] > 0 for r in spread)
    # one task moves the log-variances a little from where the first prior put them
    assert all(abs(r["log_var_mean"] - cfg.vcl.log_var_init) < 1 for r in spread)
    with pytest.raises(ValueError, match="no posterior"):
        vcl_diagnostics.spread(run_dir, 0, "mle_coreset0")
    rows = vcl_diagnostics.noise_effect(run_dir, 1, 1, [-10.0], n=2, draws=2, average=True,
                                        method="mle_coreset0")
    assert [r["n"] for r in rows] == [2, 2, 1]
    assert all(r["uncertainty"] >= 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    # a VCL checkpoint adds draws of its own posterior
    rows = vcl_diagnostics.noise_effect(run_dir, 1, 1, [], n=2, draws=2, method="vcl_coreset0")
    assert [r["weights"] for r in rows] == ["point estimate",
                                            "2 draws, the posterior, one per image"]
    # putting parameter groups back: nothing swapped = the checkpoint; "all" = the source
    loaded = vcl_diagnostics.load_checkpoint(run_dir, task=0, method="vcl_coreset0")
    pre = vcl_diagnostics.pretrained_params(run_dir, loaded)
    post = loaded.restored["eval"].mean
    assert jax.tree.structure(pre) == jax.tree.structure(post)
    assert any(not np.array_equal(a, b)  # one task of VCL moved something
               for a, b in zip(jax.tree.leaves(pre), jax.tree.leaves(post), strict=True))
    rows = vcl_diagnostics.swap_effect(run_dir, 1, 0, [(), ("null", "norms"), ("all",)], n=2,
                                       method="vcl_coreset0")
    assert [r["weights"] for r in rows] == [
        "checkpoint as it is", "null + norms from the MLE pre-training",
        "the MLE pre-training alone"]
    rows = vcl_diagnostics.swap_effect(run_dir, 2, 0, [("all",)], source=0, n=2,
                                       method="mle_coreset0")
    assert rows[0]["weights"] == "task 1's values alone"
    with pytest.raises(ValueError, match="unknown parameter group"):
        vcl_diagnostics.swap_effect(run_dir, 1, 0, [("bogus",)], n=2, method="vcl_coreset0")
    with pytest.raises(FileNotFoundError, match="no saved MLE pre-training"):
        vcl_diagnostics.swap_effect(run_dir, 1, 0, [()], n=2, method="mle_coreset0")


def test_scores_carry_standard_errors_and_rescoring_writes_nothing_over(smoke_run):
    from vcl_jax.analysis.sampling import rescore

    run_dir, cfg, metrics = smoke_run
    h = metrics["runs"]["vcl_coreset0"]["history"][-1]
    assert h["samples_per_class"] == cfg.eval.eval_per_class
    assert sorted(h["per_class_stderr"]) == ["0", "1", "2"] and h["avg_stderr"] > 0
    # the average's SE combines the digits' SEs as independent estimates
    se = np.array(list(h["per_class_stderr"].values()))
    np.testing.assert_allclose(h["avg_stderr"], np.sqrt(np.sum(se ** 2)) / 3, rtol=1e-6)
    assert "±" in open(os.path.join(run_dir, "summary.md")).read()
    before = open(os.path.join(run_dir, "metrics.json")).read()
    out = rescore(run_dir, method="vcl_coreset0", n=2, tasks=[1], weights="mean")
    assert [r["task"] for r in out["history"]] == [1]
    assert sorted(out["history"][0]["per_class"]) == ["0", "1"]
    assert out["history"][0]["samples_per_class"] == 2
    assert open(os.path.join(run_dir, "metrics.json")).read() == before
    with pytest.raises(ValueError, match="unknown weights"):
        rescore(run_dir, weights="median")


def test_smoke_metrics_match_the_golden_file(smoke_run):
    from tests import golden

    _, _, metrics = smoke_run
    golden.check("vcl_diffusion_smoke", {
        name: [{"per_class": h["per_class"], "loss": h["train_final"]["loss"]}
               for h in r["history"]]
        for name, r in metrics["runs"].items()})


def test_seeds_summary_and_targets(tmp_path, capsys):
    from experiments import seeds

    def metrics(seed, mle, vcl, scores):
        hist = lambda avgs: {"history": [{"avg_uncertainty": a, "sample_accuracy": 0.5}
                                         for a in avgs]}
        cont = lambda f, r: {"forgetting": f, "right_after": r}
        return {"config": {"run": {"seed": seed}}, "runs": {"mle_coreset0": hist(mle),
                                                    "vcl_coreset0": hist(vcl)},
                "continual": {"mle_coreset0": cont(*scores[0]), "vcl_coreset0": cont(*scores[1])}}

    runs = []
    for seed, vcl4 in ((0, 2.0), (1, 3.5)):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        m = metrics(seed, [0.1, 3.0, 3.0, 4.0, 5.0], [0.2, 2.0, 2.0, vcl4, 2.5],
                    ((6.0, 0.2), (1.5 + seed, 0.25)))
        (d / "metrics.json").write_text(json.dumps(m))
        runs.append(str(d))
    out = seeds.main(runs + ["--out", str(tmp_path / "s.json")])
    vcl = out["runs"]["vcl_coreset0"]
    assert vcl["seeds"] == [0, 1]
    mean, se = vcl["after_task"][3]
    assert mean == pytest.approx(2.75) and se == pytest.approx(np.std([2.0, 3.5], ddof=1) / 2 ** .5)
    assert vcl["accuracy_after_task"][3] == (0.5, 0.0)
    t = out["targets"]
    assert [s["below_mle"] for s in t["per_seed"]] == [True, True]
    assert [s["forgetting_ratio"] for s in t["per_seed"]] == [0.25, 2.5 / 6]
    assert t["met"] == {"below_mle_every_seed": True, "forgetting_le_third": False,
                        "right_after_within_1.5x": True}
    assert "vcl_coreset0 / MLE:" in capsys.readouterr().out
    assert json.load(open(tmp_path / "s.json"))["targets"] == t
    with pytest.raises(SystemExit, match="no metrics.json"):
        seeds.main([str(tmp_path)])


@pytest.mark.slow
def test_one_cpu_task_matches_the_golden_file(env, tmp_path):
    """The `cpu` preset's first task, MLE and VCL (with VCL's MLE pre-training), trained
    exactly as the preset does (at log-variance −12), compared with recorded values.

    Run as a researcher runs it: the command line in a process of its own, compiled at XLA's
    default optimisation (this suite's level 1 gets the 16-channel U-Net's gradient wrong
    by 3%: ``benchmarks/xla_opt_levels.py``). Only the training's final loss and KL are
    compared (the evaluation classifier, trained in the process, moves the scores of a few
    samples by more than any tolerance worth having): on the host that recorded them to the
    golden files' tolerance for losses (two processes here give the same bits), elsewhere to
    rtol 1e-2, since the KL at log-variance −12 magnifies the last bits of the means that
    another CPU's kernels round otherwise. A change of the algorithm or its random numbers
    moves the losses and the KL by tens of percent."""
    from tests import golden

    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if "xla_backend_optimization_level" not in f)
    run_dir = str(tmp_path / "run")
    subprocess.run([sys.executable, "-m", "experiments.vcl_diffusion", "--preset", "cpu",
                    "--quiet", "--run-dir", run_dir, "classes=0", "methods=mle,vcl",
                    "log_var_init=-12", "eval_per_class=8", "classifier_epochs=1"],
                   cwd=REPO, env=dict(env, XLA_FLAGS=flags), check=True, capture_output=True,
                   timeout=1500)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    golden.check("vcl_diffusion_cpu_task1", {
        name: [{k: h["train_final"][k] for k in ("loss", "kl") if k in h["train_final"]}
               for h in r["history"]]
        for name, r in metrics["runs"].items()}, other_host_rtol=1e-2)


def test_epochs_run_as_one_rolled_scan_where_our_kernels_cover_the_unet():
    # Our kernels run as fast in a loop as unrolled, XLA's convolutions do not: the `cpu`
    # preset's epochs are one rolled scan with them and calls of `unroll` steps without,
    # both with epochs of a multiple of `unroll` steps (the same training).
    from vcl_jax.kernels import conv3x3

    cpu = PRESETS["cpu"]
    step = lambda state, batch, key: (state, {})
    xla = vcl_diffusion_setup.build(override(cpu, ["conv_impl=xla"]))
    assert [xla.steps_per_call(m) for m in ("mle", "vcl", "vcl_ng")] == [8, 8, 8]
    assert (xla.runner(step, "mle").unroll, xla.runner(step, "mle").multiple) == (8, 8)
    smoke = vcl_diffusion_setup.build(PRESETS["smoke"])  # n_feat 8: not the kernels' width
    assert smoke.steps_per_call("mle") == 1
    if not conv3x3.available()[0]:
        pytest.skip("our CPU convolution kernels do not build here")
    ours = vcl_diffusion_setup.build(cpu)
    assert ours.model.impl == "ffi"
    assert [ours.steps_per_call(m) for m in ("mle", "vcl", "vcl_ng")] == [0, 0, 0]
    assert (ours.runner(step, "vcl").unroll, ours.runner(step, "vcl").multiple) == (0, 8)
