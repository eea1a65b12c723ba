"""The method grammar (vcl_jax.continual.methods): one spelling per method, clear errors,
and the builder's chain order."""

import jax.numpy as jnp
import pytest

from vcl_jax.config import ConfigError
from vcl_jax.configs import rank1_ewc as rank1_ewc_config
from vcl_jax.configs import split_mnist as split_mnist_config
from vcl_jax.configs import vcl_diffusion as vcl_diffusion_config
from vcl_jax.continual import methods, mle
from vcl_jax.continual.base import Method, keep_begin, keep_end, point_draws
from vcl_jax.continual.methods import MethodError, Spec, build, parse


@pytest.mark.parametrize("name, spec", [
    ("mle", Spec()),
    ("vcl", Spec("vcl")),
    ("vcl_ng+coreset_kcenter", Spec("vcl_ng", coreset="coreset_kcenter")),
    ("ewc_rank1", Spec(penalty="ewc_rank1")),
    ("ewc_rank1+distill", Spec(penalty="ewc_rank1", replay="distill")),
    ("vcl+ewc_diag+coreset_random", Spec("vcl", "ewc_diag", coreset="coreset_random")),
    ("distill", Spec(replay="distill")),
    ("joint", Spec(joint=True)),
])
def test_names_parse_to_their_spec_and_back(name, spec):
    assert parse(name) == spec
    assert spec.name == name
    assert spec.dir == name.replace("+", "-")


def test_spec_properties():
    spec = parse("vcl_ng+ewc_rank1_unit+coreset_kcenter")
    assert spec.variational and spec.fisher == "rank1_unit" and spec.coreset_kind == "kcenter"
    assert not parse("ewc_diag").variational and parse("mle").fisher is None


@pytest.mark.parametrize("name, message", [
    ("rank1", "'rank1' is not a member"),
    ("vcl+vcl_ng", "at most one trainer"),
    ("ewc_diag+ewc_rank1", "at most one penalty"),
    ("replay+distill", "at most one replay"),
    ("vcl+distill", "takes no trainer"),
    ("mle+ewc_rank1", "write it 'ewc_rank1'"),
    ("distill+ewc_rank1", "write it 'ewc_rank1\\+distill'"),
    ("coreset_random+vcl", "write it 'vcl\\+coreset_random'"),
    ("vcl+vcl", "at most one trainer"),
    ("", "'' is not a member"),
])
def test_names_outside_the_grammar_are_refused_saying_why(name, message):
    with pytest.raises(MethodError, match=message):
        parse(name)


def test_each_experiment_refuses_the_members_it_cannot_build():
    with pytest.raises(ConfigError, match="cannot build 'vcl'"):
        rank1_ewc_config.parse_method("vcl+ewc_rank1")
    with pytest.raises(ConfigError, match="cannot build 'distill'"):
        split_mnist_config.parse_method("distill")
    with pytest.raises(ConfigError, match="cannot build 'coreset_random'"):
        vcl_diffusion_config.parse_method("vcl+coreset_random")
    with pytest.raises(ConfigError, match="'joint' is not one of"):
        split_mnist_config.parse_method("joint")
    assert rank1_ewc_config.parse_method("ewc_rank1+distill").replay == "distill"


def _member(name):
    """A Method that adds nothing, named ``name`` (the chain's name shows the order)."""
    return Method(name, lambda p: (p, ()), keep_begin,
                  lambda p, s, b, k: (jnp.zeros(()), {}), keep_end, point_draws)


def test_build_chains_the_members_in_the_grammar_order():
    made = []

    def factory(name):
        def make():
            made.append(name)
            return _member(name)
        return make

    factories = {m: factory(m) for m in methods.MEMBERS}
    assert build(parse("vcl+ewc_rank1+coreset_random"), factories).name == \
        "vcl+ewc_rank1+coreset_random"
    # distill trains in the trainer's place and replays with the replay member's pools
    assert build(parse("ewc_diag+distill"), factories).name == "distill+ewc_diag+replay"
    assert "mle" not in made  # only the members named are built
    assert build(parse("mle"), {"mle": lambda: mle(lambda p, b, k: 0.0)}).name == "mle"
    assert build(parse("joint"), factories).name == "mle"
