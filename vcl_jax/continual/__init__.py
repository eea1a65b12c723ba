"""Continual-learning methods as small sets of pure functions (optax style)."""

from vcl_jax.continual.base import Method
from vcl_jax.continual.ewc import EWCState, diag_fisher, ewc, per_example_grads
from vcl_jax.continual.mle import mle
from vcl_jax.continual.vcl import VCLState, vcl

__all__ = ["EWCState", "Method", "VCLState", "diag_fisher", "ewc", "mle", "per_example_grads",
           "vcl"]
