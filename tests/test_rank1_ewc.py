"""The rank-1 EWC experiment and the Fisher analysis end to end on the smoke preset."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcl_jax.analysis import fisher_analysis
from vcl_jax.checkpoint import ConfigMismatchError
from vcl_jax.config import ConfigError, override
from vcl_jax.configs.rank1_ewc import PRESETS, parse_method
from vcl_jax.diffusion.loss import example_loss_at, timestep_examples
from vcl_jax.diffusion.samplers import ddim_sample
from vcl_jax.diffusion.schedule import linear_schedule
from vcl_jax.models.unet import ContextUNet
from vcl_jax.protocols import rank1_ewc, rank1_ewc_setup


@pytest.fixture(scope="module")
def smoke_run(env, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("rank1"))
    cfg = override(PRESETS["smoke"], ["dataset=mnist", "data_variant=5k",
                                      "methods=mle,ewc_rank1+distill,ewc_diag+replay"])
    metrics = rank1_ewc.run(cfg, run_dir, progress=False)
    return run_dir, cfg, metrics


def test_smoke_writes_every_output(smoke_run):
    run_dir, cfg, metrics = smoke_run
    for f in ("config.json", "metrics.json", "summary.md", "fd.png", "log.jsonl"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    assert metrics["provenance"]["versions"]["flax"] and metrics["provenance"]["cpu"]
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        kinds = [json.loads(ln)["kind"] for ln in f]
    assert kinds.count("task") == 2 * len(cfg.methods) and kinds.count("epoch") > 0
    for name in cfg.methods:
        d = parse_method(name).dir
        assert os.path.isfile(os.path.join(run_dir, f"grid_{d}.png"))
        rec = metrics["runs"][name]
        assert [h["task"] for h in rec["history"]] == [0, 1]
        assert len(rec["history"][1]["fd"]) == 2
        assert all(np.isfinite(v) and v >= -1e-6 for h in rec["history"] for v in h["fd"])
        assert rec["forgetting"][0] == pytest.approx(
            rec["history"][1]["fd"][0] - rec["history"][0]["fd"][0])
        with np.load(os.path.join(run_dir, d, "samples_task1.npz")) as z:
            assert z["images"].shape == (4 * cfg.eval.eval_per_class, 28, 28)  # cropped back to 28
            assert 0 <= z["images"].min() and z["images"].max() <= 1
            assert sorted(set(z["labels"].tolist())) == [0, 1, 2, 3]
    # EWC methods spent time computing a Fisher (ending a task); mle did not. Every phase
    # of the task loop is timed once per task.
    secs = {n: metrics["runs"][n]["seconds"] for n in cfg.methods}
    assert secs["mle"]["end"] < 1e-3 < secs["ewc_rank1+distill"]["end"]
    per_task = metrics["runs"]["ewc_diag+replay"]["task_seconds"]
    assert set(per_task) == {"prepare", "train", "end", "tune", "eval"}
    assert all(len(v) == 2 for v in per_task.values())
    assert "distill" in metrics["runs"]["ewc_rank1+distill"]["history"][1]["train_final"]
    assert "penalty" in metrics["runs"]["ewc_diag+replay"]["history"][1]["train_final"]
    assert "distill" not in metrics["runs"]["ewc_diag+replay"]["history"][1]["train_final"]
    summary = open(os.path.join(run_dir, "summary.md")).read()
    assert "ewc_rank1+distill" in summary and "FD-classifier" in summary


def test_rerun_resumes_and_other_config_is_refused(smoke_run):
    run_dir, cfg, metrics = smoke_run
    start = time.perf_counter()
    again = rank1_ewc.run(cfg, run_dir, progress=False)
    assert time.perf_counter() - start < 60
    for name in cfg.methods:
        assert again["runs"][name]["history"] == metrics["runs"][name]["history"]
    ckpts = os.path.join(run_dir, "mle", "checkpoints")
    before = sorted(os.listdir(ckpts))
    with pytest.raises(ConfigMismatchError, match="learning_rate"):
        rank1_ewc.run(override(cfg, ["learning_rate=0.5"]), run_dir, progress=False)
    assert sorted(os.listdir(ckpts)) == before
    # A setting that only matters to EWC leaves the other methods' checkpoints usable.
    rank1_ewc.check_run_dir(run_dir, override(cfg, ["ewc_lambda=5", "methods=mle"]))
    with pytest.raises(ConfigMismatchError, match="ewc_lambda"):
        rank1_ewc.check_run_dir(run_dir, override(cfg, ["ewc_lambda=5"]))


@pytest.mark.slow  # the analysis tool on a checkpoint; `make test-all` (keeps `make test` < 10 min)
def test_fisher_analysis_on_a_checkpoint(smoke_run, tmp_path):
    run_dir, _, _ = smoke_run
    setup, tasks, params, method, task = fisher_analysis.load_run(run_dir, "mle")
    assert (method, task) == ("mle", 1)
    cfg = fisher_analysis.FisherAnalysisConfig(n_timesteps=3, n_samples=6, chunk=4)
    res = fisher_analysis.analyse(setup, params, tasks[task], cfg, progress=False)
    assert res["timesteps"] == [1, 10, 20] and len(res["per_t"]) == 3
    for row in res["per_t"]:
        assert len(row["cos"]) == 6 and all(0 <= c <= 1 + 1e-6 for c in row["cos"])
        assert 0 <= row["ratio21"] <= 1 and len(row["eigenvalues"]) == 5
        assert row["rel_err_best_rank1"] <= row["rel_err_rank1"] + 1e-9
    mu_cos = np.asarray(res["mu_cosine"])
    np.testing.assert_allclose(np.diag(mu_cos), 1.0, rtol=1e-6)
    fisher_analysis.write(str(tmp_path), res, "smoke")
    for f in ("analysis.json", "fisher_analysis.png", "summary.md"):
        assert os.path.isfile(tmp_path / f)
    with pytest.raises(ConfigError, match="not in this run"):
        fisher_analysis.load_run(run_dir, "ewc_rank1")
    with pytest.raises(ConfigError, match="checkpoints after tasks"):
        fisher_analysis.load_run(run_dir, "mle", task=7)
    with pytest.raises(ConfigError, match="not a rank1_ewc run"):
        fisher_analysis.load_run(str(tmp_path))
    # a run directory without the method's checkpoints: refused, and no folder is created
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    with pytest.raises(ConfigError, match="no checkpoints in"):
        fisher_analysis.load_run(str(bare), "mle")
    assert os.listdir(bare) == ["config.json"]


def test_bad_settings_are_clear_errors(env, tmp_path):
    for bad, match in (("methods=mle,rank2", "unknown method 'rank2'"),
                       ("methods=ewc_diag+ewc_rank1", "at most one penalty"),
                       ("classes=0,1,2", "even number"),
                       ("fisher_t_min=30", "fisher_t_min"),
                       ("eval_split=train", "eval_split"),
                       ("eval_eta=1.5", "eval_eta"),
                       ("eval_split=validation", "validation_per_class"),
                       ("validation_per_class=100000", "leaves no training image")):
        with pytest.raises(ConfigError, match=match):
            rank1_ewc.run(override(PRESETS["smoke"], ["dataset=mnist", "data_variant=5k", bad]),
                          str(tmp_path),
                          progress=False)
    assert not os.listdir(tmp_path)  # nothing written for a refused config
    assert parse_method("ewc_rank1_unit+replay").fisher == "rank1_unit"


def test_validation_split_is_held_out_of_training(env):
    cfg = override(PRESETS["smoke"], ["dataset=mnist", "data_variant=5k", "validation_per_class=5",
                                      "eval_split=validation", "max_per_class=none"])
    tasks, shape = rank1_ewc_setup.load_tasks(cfg)
    assert shape == (28, 28, 1)
    t0 = tasks[0]
    assert len(t0.reference) == 10 and sorted(set(t0.reference_labels.tolist())) == [0, 1]
    train = (t0.x[:, 2:30, 2:30, :] + 1) / 2  # back to [0, 1] at 28×28
    ref = t0.reference.reshape(len(t0.reference), -1)
    diffs = np.abs(train.reshape(len(train), 1, -1) - ref[None]).max(-1)
    assert diffs.min() > 0  # no validation image is among the training images
    assert t0.x.shape[1:] == (32, 32, 1) and t0.x.min() == -1.0


def test_joint_reference_in_unit_range_without_padding(env, tmp_path):
    cfg = override(PRESETS["smoke"], ["dataset=mnist", "data_variant=5k", "methods=joint",
                                      "pixel_range=unit", "image_size=28", "context=film",
                                      "weight_init=pytorch"])
    tasks, _ = rank1_ewc_setup.load_tasks(cfg)
    assert tasks[0].x.shape[1:] == (28, 28, 1) and tasks[0].x.min() == 0.0
    assert tasks[0].x.max() == 1.0
    metrics = rank1_ewc.run(cfg, str(tmp_path), progress=False)
    rec = metrics["runs"]["joint"]
    # one evaluation of every class, restricted to the tasks seen "after task d"
    assert [h["task"] for h in rec["history"]] == [0, 1]
    assert rec["history"][1]["fd"][0] == rec["history"][0]["fd"][0]
    assert rec["forgetting"] == [0.0, 0.0]
    with np.load(os.path.join(tmp_path, "joint", "samples_task0.npz")) as z:
        assert sorted(set(z["labels"].tolist())) == [0, 1, 2, 3]
        assert z["images"].shape == (4 * cfg.eval.eval_per_class, 28, 28)
    assert not os.path.exists(os.path.join(tmp_path, "joint", "samples_task1.npz"))
    # as many steps as a sequential method over the stream: epochs over the union
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        epochs = [json.loads(ln) for ln in f if '"epoch"' in ln]
    n = sum(len(t.x) for t in tasks)
    opt = cfg.optim
    assert len(epochs) == opt.epochs and epochs[-1]["step"] == opt.epochs * -(-n // opt.batch_size)
    assert os.path.isfile(os.path.join(tmp_path, "grid_joint.png"))


def test_unet_at_32x32x3_and_timestep_examples():
    model = ContextUNet(n_feat=8, n_tasks=10, channels=3, embed_dim=8)
    x = jnp.zeros((2, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones(2), jnp.zeros(2, jnp.int32),
                                 jnp.ones(2, bool))["params"]
    out = jax.jit(model.apply)({"params": params}, x, jnp.ones(2), jnp.zeros(2, jnp.int32),
                               jnp.ones(2, bool))
    assert out.shape == (2, 32, 32, 3)
    sched = linear_schedule(50)
    ex = timestep_examples(jax.random.key(1), x, jnp.array([3, 4]), T=50, t_min=40, t_max=45)
    assert ((ex["t"] >= 40) & (ex["t"] <= 45)).all()
    eps_fn = lambda x, t, d, keep: model.apply({"params": params}, x, t, d, keep)
    one = jax.tree.map(lambda a: a[0], ex)
    loss = jax.jit(lambda one: example_loss_at(eps_fn, sched, one))
    # t and noise come with the example: the loss is the ε-error at exactly that x_t
    ab = sched.alpha_bar[one["t"] - 1]
    xt = jnp.sqrt(ab) * one["x"] + jnp.sqrt(1 - ab) * one["noise"]
    pred = jax.jit(eps_fn)(xt[None], (one["t"] / 50)[None], one["task"][None],
                           jnp.ones(1, bool))[0]
    np.testing.assert_allclose(loss(one), jnp.mean((pred - one["noise"]) ** 2), rtol=1e-5)
    other = dict(one, noise=-one["noise"])
    assert abs(float(loss(other)) - float(loss(one))) > 1e-3  # another draw, another loss
    with pytest.raises(ValueError, match="t_min"):
        timestep_examples(jax.random.key(1), x, jnp.array([3, 4]), T=50, t_min=0)


def test_ddim_with_the_exact_score_recovers_the_data_point():
    # For data concentrated on one point x*, ε(x_t) = (x_t − √ᾱ_t x*)/√(1−ᾱ_t) exactly;
    # deterministic DDIM then lands on x* for any number of steps.
    sched = linear_schedule(100)
    target = jnp.linspace(-1, 1, 16).reshape(4, 4, 1)

    def eps_fn(x, t, d, keep):
        ab = sched.alpha_bar[jnp.round(t * sched.T).astype(int) - 1][:, None, None, None]
        return (x - jnp.sqrt(ab) * target[None]) / jnp.sqrt(1 - ab)

    for steps in (5, 50):
        x = ddim_sample(eps_fn, sched, jax.random.key(0), jnp.zeros(3, jnp.int32), (4, 4, 1),
                        steps=steps, guidance=0.0, clip=(-1.0, 1.0))
        np.testing.assert_allclose(x, jnp.broadcast_to(target, x.shape), atol=1e-5)


def test_metrics_json_round_trips(smoke_run):
    run_dir, cfg, metrics = smoke_run
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert saved["config"]["methods"] == list(cfg.methods)
    assert saved["runs"]["mle"]["avg_forgetting"] == metrics["runs"]["mle"]["avg_forgetting"]


def test_smoke_metrics_match_the_golden_file(smoke_run):
    from tests import golden

    _, _, metrics = smoke_run
    golden.check("rank1_ewc_smoke", {
        name: [{"fd": h["fd"], "accuracy": h["accuracy"], "loss": h["train_final"]["loss"]}
               for h in r["history"]]
        for name, r in metrics["runs"].items()})


def test_seeds_table_of_rank1_runs(smoke_run, tmp_path):
    """experiments.seeds reads rank-1 runs: per-method means and SEs over seeds, and the
    paired differences of forgetting, computed from the runs' histories."""
    import copy

    from experiments import seeds

    run_dir, _, metrics = smoke_run
    other = copy.deepcopy(metrics)
    other["config"]["run"]["seed"] = 1
    rec = other["runs"]["ewc_rank1+distill"]
    rec["history"][1]["accuracy"][0] -= 0.5  # seed 1 forgets half its first task's samples
    rec["forgetting"][0] += 10.0
    d1 = tmp_path / "s1"
    d1.mkdir()
    (d1 / "metrics.json").write_text(json.dumps(other))
    out = seeds.main([run_dir, str(d1), "--markdown", str(tmp_path / "t.md")])
    assert out["seeds"] == [0, 1]
    r0 = metrics["runs"]["ewc_rank1+distill"]
    h = r0["history"]
    forget0 = h[0]["accuracy"][0] - h[1]["accuracy"][0]
    mean, se = out["runs"]["ewc_rank1+distill"]["accuracy_forgetting"]
    assert mean == pytest.approx(forget0 + 0.25) and se == pytest.approx(0.25)
    mean, se = out["runs"]["ewc_rank1+distill"]["fd_forgetting"]
    assert mean == pytest.approx(r0["forgetting"][0] + 5.0) and se == pytest.approx(5.0)
    naive = out["runs"]["mle"]["fd_forgetting"]
    assert naive[1] == pytest.approx(0.0)  # the same numbers in both seeds
    assert "ewc_rank1+distill" in (tmp_path / "t.md").read_text()
