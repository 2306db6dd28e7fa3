"""Benchmarks run through launch.py: `bench_forward` (Flax vs transformers forward on CPU) and `memory_plan`
(per-device memory of a sharded 8B/32B forward, compiled against abstract weights)."""
