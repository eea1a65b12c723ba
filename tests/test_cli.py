"""The shared experiment command line."""

from __future__ import annotations

import os

import pytest

from vcl_jax.cli import experiment_main
from vcl_jax.config import ConfigError
from vcl_jax.protocols.vcl_diffusion_config import PRESETS


def _capture(tmp_path):
    seen = {}

    def run(cfg, run_dir, *, progress):
        seen.update(cfg=cfg, run_dir=run_dir, progress=progress)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "summary.md"), "w") as f:
            f.write("ok\n")
        return {}

    return seen, run


def test_overrides_may_stand_before_between_and_after_the_options(tmp_path):
    seen, run = _capture(tmp_path)
    run_dir = str(tmp_path / "r")
    experiment_main(["--preset", "cpu", "classes=0", "--run-dir", run_dir, "kl_scale=0",
                     "--quiet", "epochs=3"], doc="", name="x", presets=PRESETS, run=run)
    cfg = seen["cfg"]
    assert (cfg.classes, cfg.kl_scale, cfg.epochs) == ((0,), 0.0, 3)
    assert seen["run_dir"] == run_dir and seen["progress"] is False


def test_unknown_override_is_a_config_error(tmp_path):
    _, run = _capture(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'epochz'"):
        experiment_main(["--run-dir", str(tmp_path), "epochz=3"], doc="", name="x",
                        presets=PRESETS, run=run)
