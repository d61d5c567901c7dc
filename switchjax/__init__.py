"""switchjax: Switch Transformers (sparse Mixture-of-Experts) in JAX/Flax."""
__version__ = "0.1.0"
