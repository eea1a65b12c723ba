"""The shared experiment command line."""

from __future__ import annotations

import dataclasses
import os

import pytest

from vcl_jax.cli import experiment_main
from vcl_jax.config import ConfigError, config_text, override, section_names
from vcl_jax.configs.vcl_diffusion import PRESETS


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
    assert (cfg.data.classes, cfg.vcl.kl_scale, cfg.optim.epochs) == ((0,), 0.0, 3)
    assert seen["run_dir"] == run_dir and seen["progress"] is False


def test_unknown_override_is_a_config_error(tmp_path):
    _, run = _capture(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'epochz'"):
        experiment_main(["--run-dir", str(tmp_path), "epochz=3"], doc="", name="x",
                        presets=PRESETS, run=run)


def test_show_config_prints_every_field_by_section_and_runs_nothing(tmp_path, capsys):
    seen, run = _capture(tmp_path)
    experiment_main(["--show-config", "--preset", "cpu", "model.n_feat=32", "seed=3"], doc="",
                    name="x", presets=PRESETS, run=run)
    out = capsys.readouterr().out
    assert not seen  # nothing ran
    assert "[model]\n  n_feat = 32\n" in out and "[run]\n  seed = 3" in out


@pytest.mark.parametrize("module", ["vcl_diffusion", "rank1_ewc",
                                    "split_mnist"])
def test_every_preset_reads_back_from_its_printed_config(module):
    """`config_text` writes each value as an override that parses back to it, under its
    section's heading: the printed config of a run is a command line that repeats it."""
    import dataclasses
    import importlib

    presets = importlib.import_module(f"vcl_jax.configs.{module}").PRESETS
    for cfg in presets.values():
        overrides, section = [], None
        for line in config_text(cfg).splitlines():
            if line.startswith("["):
                section = line.strip("[]")
                assert section in section_names(cfg)
            else:
                key, value = line.strip().split(" = ", 1)
                overrides.append(f"{section}.{key}={value}" if section else f"{key}={value}")
        n_fields = sum(len(dataclasses.fields(getattr(cfg, s))) for s in section_names(cfg))
        assert len(overrides) == n_fields + len(dataclasses.fields(cfg)) - len(section_names(cfg))
        assert override(type(cfg)(), overrides) == cfg


def test_dotted_overrides_name_the_right_section():
    cfg = override(PRESETS["cpu"], ["model.n_feat=32", "vcl.kl_scale=0.5", "epochs=2"])
    assert (cfg.model.n_feat, cfg.vcl.kl_scale, cfg.optim.epochs) == (32, 0.5, 2)
    with pytest.raises(ConfigError, match="seed is in section 'run', not 'model'"):
        override(PRESETS["cpu"], ["model.seed=1"])
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        override(PRESETS["cpu"], ["modle.n_feat=1"])
    with pytest.raises(ConfigError, match="unknown config key 'n_fet' in section 'model'"):
        override(PRESETS["cpu"], ["model.n_fet=1"])


def test_a_task_grouping_is_given_as_slash_joined_classes():
    from vcl_jax.configs.split_mnist import PRESETS as SPLIT

    cfg = override(SPLIT["smoke"], ["data.groups=0/1,2/3,4/5"]).validate()
    assert cfg.data.groups == ((0, 1), (2, 3), (4, 5))
    with pytest.raises(ConfigError, match=r"every class must be in 0\.\.9"):
        override(SPLIT["smoke"], ["groups=0/1,2/12"]).validate()
    with pytest.raises(ConfigError, match="names a class twice"):
        override(SPLIT["smoke"], ["groups=0/1,1/2"]).validate()
    with pytest.raises(ConfigError, match="classes names a class twice"):
        override(PRESETS["cpu"], ["classes=0,1,0"]).validate()


def test_experiments_turn_on_the_persistent_compilation_cache(tmp_path, monkeypatch):
    import jax

    from vcl_jax.cli import COMPILE_CACHE_ENV, enable_compile_cache

    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        monkeypatch.setenv(COMPILE_CACHE_ENV, "0")
        assert enable_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir == before[0]  # left as it was
        monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "jit"))
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        assert enable_compile_cache() == str(tmp_path / "jit")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jit")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
        # without the variable: JAX's own, else the cache root's jit/
        monkeypatch.delenv(COMPILE_CACHE_ENV)
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("VCL_JAX_CACHE_DIR", str(tmp_path / "root"))
        assert enable_compile_cache() == os.path.join(str(tmp_path / "root"), "jit")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_default_run_dir_names_what_differs_from_the_preset(tmp_path, monkeypatch):
    seen, run = _capture(tmp_path)
    monkeypatch.chdir(tmp_path)
    main = lambda *a: experiment_main(list(a), doc="", name="x", presets=PRESETS, run=run)  # noqa: E731
    main("--preset", "cpu", "--quiet")
    assert seen["run_dir"] == os.path.join("runs", "x_cpu")
    main("--preset", "cpu", "seed=1", "coreset_sizes=0,200", "--data-dir", str(tmp_path))
    assert seen["run_dir"] == os.path.join("runs", "x_cpu-coreset_sizes=0,200-seed=1")
    main("--preset", "cpu", "epochs=3")  # the preset's own value: no new directory
    assert seen["run_dir"] == os.path.join("runs", "x_cpu")


def test_a_run_starts_from_another_runs_config(tmp_path, capsys, monkeypatch):
    """--config takes a run's config.json (or its folder) as the base of the overrides;
    the default run directory names the run it came from; another experiment's config, or
    both --preset and --config, are clear errors."""
    from vcl_jax.checkpoint import write_run_config
    from vcl_jax.config import to_dict
    from vcl_jax.configs.rank1_ewc import PRESETS as RANK1

    old = tmp_path / "old_run"
    old.mkdir()
    write_run_config(str(old), to_dict(override(PRESETS["cpu"], ["kl_scale=0.5", "seed=2"])))
    seen, run = _capture(tmp_path)
    monkeypatch.chdir(tmp_path)
    experiment_main(["--config", str(old), "epochs=4"], doc="", name="x", presets=PRESETS,
                    run=run)
    cfg = seen["cfg"]
    assert (cfg.vcl.kl_scale, cfg.run.seed, cfg.optim.epochs) == (0.5, 2, 4)
    assert cfg.model.n_feat == PRESETS["cpu"].model.n_feat
    assert seen["run_dir"] == os.path.join("runs", "x_from-old_run-epochs=4")
    experiment_main(["--config", str(old / "config.json"), "--show-config"], doc="", name="x",
                    presets=PRESETS, run=run)
    assert "kl_scale = 0.5" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not both"):
        experiment_main(["--config", str(old), "--preset", "cpu"], doc="", name="x",
                        presets=PRESETS, run=run)
    with pytest.raises(ConfigError, match="not a Rank1EWCConfig: unknown keys"):
        experiment_main(["--config", str(old)], doc="", name="x", presets=RANK1, run=run)



@dataclasses.dataclass(frozen=True)
class _A:
    steps: int = 1


@dataclasses.dataclass(frozen=True)
class _B:
    steps: int = 2
    width: int = 3


@dataclasses.dataclass(frozen=True)
class _Both:
    name: str = "x"
    a: _A = _A()
    b: _B = _B()


def test_a_key_in_two_sections_must_name_its_section():
    """A field's name alone is accepted only when one section has it."""
    cfg = override(_Both(), ["width=5", "a.steps=7", "name=y"])
    assert (cfg.b.width, cfg.a.steps, cfg.b.steps, cfg.name) == (5, 7, 2, "y")
    with pytest.raises(ConfigError, match="'steps' is in sections a, b: write a.steps"):
        override(_Both(), ["steps=4"])
    with pytest.raises(ConfigError, match="unknown config key 'a'"):
        override(_Both(), ["a=4"])


@pytest.mark.parametrize("module", ["vcl_diffusion", "rank1_ewc",
                                    "split_mnist"])
def test_every_preset_survives_its_config_json(module):
    """`config.json` (nested sections) reads back to the same config; a key of no section,
    or a section's unknown key, is named."""
    import importlib
    import json

    from vcl_jax.config import from_dict, to_dict

    presets = importlib.import_module(f"vcl_jax.configs.{module}").PRESETS
    for cfg in presets.values():
        raw = json.loads(json.dumps(to_dict(cfg)))
        assert from_dict(type(cfg), raw) == cfg
        with pytest.raises(ConfigError, match="unknown keys model.n_fet"):
            from_dict(type(cfg), dict(raw, model=dict(raw["model"], n_fet=1)))
        with pytest.raises(ConfigError, match="unknown keys epochs"):
            from_dict(type(cfg), dict(raw, epochs=3))
