"""Random command-line overrides: every experiment's config either validates or fails with
one ConfigError line, never another exception from deeper down."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vcl_jax.analysis.fisher_analysis import FisherAnalysisConfig
from vcl_jax.config import ConfigError, override, section_names
from vcl_jax.configs.rank1_ewc import PRESETS as RANK1
from vcl_jax.configs.split_mnist import PRESETS as SPLIT
from vcl_jax.configs.vcl_diffusion import PRESETS as VCL

CONFIGS = {"vcl_diffusion": VCL["smoke"], "rank1_ewc": RANK1["smoke"],
           "split_mnist": SPLIT["smoke"], "fisher_analysis": FisherAnalysisConfig()}

_number = st.one_of(st.integers(-10**6, 10**6), st.sampled_from(["0", "-1", "1e308", "-0.0"]),
                    st.floats(allow_nan=True, allow_infinity=True))
_value = st.one_of(
    _number.map(str),
    st.sampled_from(["none", "None", "", "true", "no", "paper", "grouped", "vmap", "ddim",
                     "shared", "random", "0,1", "1,1", "0,,2", "(0,1),(2,3)", "9,10,11",
                     "mle,vcl", "rank1+distill", "naive,bogus", "-3,4", "0/1,2/3", "0/1/,/",
                     "1/1"]),
    st.lists(_number.map(str), min_size=0, max_size=4).map(",".join),
    st.text(max_size=8),
)


def _key(cfg) -> st.SearchStrategy[str]:
    sections = section_names(cfg)
    names = [f.name for f in dataclasses.fields(cfg) if f.name not in sections]
    for s in sections:  # each section's fields, written with their section and alone
        names += [k for f in dataclasses.fields(getattr(cfg, s)) for k in (f"{s}.{f.name}", f.name)]
    odd = ["epochz", "model.n_feat", "", "data.classes", "data.groups", "run.seed",
           "model.seed", "x.y.z", ".", "data", "run", "optim.epochs.x"]
    return st.one_of(st.sampled_from(names), st.sampled_from(odd))


def _vcl_build(cfg):
    from vcl_jax.protocols import vcl_diffusion_setup

    setup = vcl_diffusion_setup.build(cfg)
    jax.eval_shape(setup.init_params, jax.random.key(0))


def _rank1_build(cfg):
    from vcl_jax.protocols import rank1_ewc_setup

    setup = rank1_ewc_setup.build(cfg, (28, 28, 1))
    jax.eval_shape(setup.init_params, jax.random.key(0))


# Past validation, what a run builds before it touches data: the model, its parameter shapes
# and the noise schedule (abstractly: no arrays are made).
BUILD = {"vcl_diffusion": _vcl_build, "rank1_ewc": _rank1_build}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_overrides_validate_or_raise_one_config_error_line(name):
    base = CONFIGS[name]
    build = BUILD.get(name, lambda cfg: cfg.validate())

    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(_key(base), _value), min_size=1, max_size=3))
    def check(pairs):
        items = [f"{k}={v}" for k, v in pairs]
        try:
            build(override(base, items))
        except ConfigError as e:
            msg = str(e)
            assert msg and "\n" not in msg, msg

    check()
