"""Natural-gradient VCL on the diffusion U-Net, end to end on the smoke preset (a file of its
own so that the test runner can give it to the worker without the smoke run of
``test_vcl_diffusion.py``)."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from vcl_jax.config import ConfigError, override
from vcl_jax.configs.vcl_diffusion import PRESETS
from vcl_jax.protocols import vcl_diffusion


def test_natural_gradient_vcl_learns_its_variances_and_resumes(env, tmp_path):
    # vcl_ng on two smoke digits: its posterior's log-variances leave the value each task
    # starts from (the prior's precision + λ·h₀), the checkpoints restore (its optimizer
    # state is the natural-gradient one) and a re-run resumes without training
    from vcl_jax.analysis.sampling import load_checkpoint

    cfg = override(PRESETS["smoke"], ["methods=vcl_ng", "classes=0,1", "likelihood=sum",
                                      "ng_b2=0.5"])
    run_dir = str(tmp_path / "ng")
    metrics = vcl_diffusion.run(cfg, run_dir, progress=False)
    hist = metrics["runs"]["vcl_ng_coreset0"]["history"]
    assert [h["task"] for h in hist] == [0, 1]
    assert all(np.isfinite(h["avg_uncertainty"]) for h in hist)
    loaded = load_checkpoint(run_dir, task=1, method="vcl_ng_coreset0")
    q = loaded.restored["train"].trainable
    lv = np.concatenate([np.ravel(a) for a, r in zip(
        jax.tree.leaves(q.log_var), jax.tree.leaves(loaded.setup.mask(q.mean)), strict=True)
        if r])
    assert np.std(lv) > 0.1  # one value per weight, not the common start
    assert loaded.setup.likelihood_scale == 28 * 28
    start = time.perf_counter()
    assert vcl_diffusion.run(cfg, run_dir, progress=False)["runs"] == metrics["runs"]
    assert time.perf_counter() - start < 60
    with pytest.raises(ConfigError, match="at most one trainer"):
        override(cfg, ["methods=vcl+vcl_ng"]).validate()
    with pytest.raises(ConfigError, match="kl_scale > 0"):
        override(cfg, ["kl_scale=0"]).validate()
    with pytest.raises(ConfigError, match="unknown likelihood 'max'"):
        override(cfg, ["likelihood=max"]).validate()
