"""Suite-wide fixtures."""

import gc

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs_after_each_module():
    """Frees each test module's compiled programs and traces once it is done. The whole suite runs in one process;
    without this it holds every program all ~60 modules compiled, and its peak RSS was 7.8 GB, against 4.4 GB with
    it, at the same wall time (measured on the 2-core box, 2026-11-27). A CI run that crashed inside an XLA compile
    near the suite's end (SIGSEGV in backend_compile_and_load, the last module) is why the headroom matters."""
    yield
    jax.clear_caches()
    gc.collect()
