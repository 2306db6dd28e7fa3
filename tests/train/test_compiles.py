import jax
import jax.numpy as jnp

from axpo_jax.train.compiles import CompileClock


def test_counts_new_shapes_only():
    clock = CompileClock()
    double = jax.jit(lambda x: x * 2 + 1)
    x3, x5 = jnp.arange(3.0), jnp.arange(5.0)
    clock.take()  # the arrays' own creation compiled too
    double(x3).block_until_ready()
    first = clock.take()
    assert first["compiles"] == 1 and first["compile_s"] > 0
    double(x3).block_until_ready()
    assert clock.take() == {"compiles": 0, "compile_s": 0.0}  # cached: steady state
    double(x5).block_until_ready()
    assert clock.take()["compiles"] == 1  # a new shape compiles again
    other = CompileClock()  # clocks are independent
    jax.jit(lambda x: x - 1)(x3).block_until_ready()
    assert other.take()["compiles"] == 1 and clock.take()["compiles"] == 1
