"""Continual-learning methods as small sets of pure functions (optax style)."""

from vcl_jax.continual.base import Method
from vcl_jax.continual.mle import mle
from vcl_jax.continual.vcl import VCLState, vcl

__all__ = ["Method", "VCLState", "mle", "vcl"]
