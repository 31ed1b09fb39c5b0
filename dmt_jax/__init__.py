"""dmt_jax: DMT multi-teacher distillation of self-supervised ViTs in JAX/Flax."""

__version__ = "0.1.0"
