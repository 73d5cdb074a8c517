"""v4jax: DeepSeek-V4 in JAX."""
