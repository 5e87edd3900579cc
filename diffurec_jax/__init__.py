"""diffurec-jax: DiffuRec and DiffuRecSys in JAX/Flax NNX."""

__version__ = "0.1.0"
