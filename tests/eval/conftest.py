import pytest

from axpo_jax.demo import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random Qwen3-VL in transformers format (with its processor), shared by the evaluation tests."""
    folder = tmp_path_factory.mktemp("eval_tiny_checkpoint")
    build_tiny_checkpoint(str(folder), seed=0)
    return str(folder)
