"""dynroute_jax: dynamic routing networks (DRNet, CoDiNet) in JAX/Flax."""

__version__ = "0.1.0"
