"""scott_jax: SCott (Stochastic Consistency Distillation) in JAX/Flax."""

__version__ = "0.1.0"
