"""The experiments' configs: one module per experiment (its config, sections and presets)
and the sections they share (:mod:`vcl_jax.configs.sections`)."""
