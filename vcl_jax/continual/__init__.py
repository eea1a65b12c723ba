"""Continual-learning methods as small sets of pure functions (optax style)."""

from vcl_jax.continual.base import Method, TrainData, View, chain
from vcl_jax.continual.consolidation import FISHERS, EWCState, Rank1, ewc
from vcl_jax.continual.distill import distillation
from vcl_jax.continual.fisher import (
                                      FisherStats,
                                      diag_fisher,
                                      fisher_stats,
                                      gram_analysis,
                                      gram_matrix,
                                      per_example_grads,
)
from vcl_jax.continual.replay import coreset, generative_replay
from vcl_jax.continual.sequential import mle
from vcl_jax.continual.variational import VCLState, vcl, vcl_ng

__all__ = ["FISHERS", "EWCState", "FisherStats", "Method", "Rank1", "TrainData", "VCLState",
           "View", "chain", "coreset", "diag_fisher", "distillation", "ewc", "fisher_stats",
           "generative_replay", "gram_analysis", "gram_matrix", "mle", "per_example_grads", "vcl",
           "vcl_ng"]
