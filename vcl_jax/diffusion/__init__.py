"""DDPM diffusion: noise schedule, ε-prediction loss, ancestral and DDIM samplers."""

from vcl_jax.diffusion.loss import example_loss, q_sample
from vcl_jax.diffusion.samplers import ddim_sample, ddpm_sample, guided_eps
from vcl_jax.diffusion.schedule import Schedule, linear_schedule

__all__ = ["Schedule", "ddim_sample", "ddpm_sample", "example_loss", "guided_eps",
           "linear_schedule", "q_sample"]
