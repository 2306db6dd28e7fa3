"""Rollouts: the KV-cache sampler and the multi-turn agent loop."""
