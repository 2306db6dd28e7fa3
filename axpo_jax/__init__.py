"""axpo-jax: AXPO reinforcement learning for Qwen3-VL agents in JAX/Flax."""

__version__ = "0.0.1"
