"""Mean-field variational inference over parameter pytrees."""

from vcl_jax.vi.mean_field import MeanField, init_from_params, kl, num_variational, prior, sample

__all__ = ["MeanField", "init_from_params", "kl", "num_variational", "prior", "sample"]
