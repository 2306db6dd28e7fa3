"""Registry of run modes: `config.mode` -> the function that runs it.

A mode is a function `fn(config) -> dict`; `launch.py` prints the returned dict as one JSON line.

Built-in modes are kept as "module:function" strings and imported only when dispatched, so that
`launch.py` starts fast and a mode's heavy imports (jax, transformers, torch, ...) happen only when
that mode is used, after launch.py has set the environment (JAX_PLATFORMS, XLA_FLAGS).

Add a built-in mode by adding a line to `_MODES`; register an extra one from code with
`register("name")` as a decorator, or `register("name", "package.module:function")`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

ModeFn = Callable[[Any], Mapping[str, Any]]

_MODES: dict[str, str | ModeFn] = {
    "demo": "axpo_jax.demo:run",
    "sft": "axpo_jax.train.sft_run:run",
    "rl": "axpo_jax.train.rl_run:run",
    "bench_forward": "axpo_jax.bench.forward:run",
    "bench_update": "axpo_jax.bench.update:run",
    "bench_sampler": "axpo_jax.bench.sampler:run_sampler",
    "bench_fork": "axpo_jax.bench.sampler:run_fork",
    "bench_decode_window": "axpo_jax.bench.sampler:run_decode_window",
    "bench_tool_overlap": "axpo_jax.bench.sampler:run_tool_overlap",
    "bench_algos": "axpo_jax.bench.algos:run",
    "bench_perception": "axpo_jax.bench.perception:run",
    "memory_plan": "axpo_jax.bench.memory:run",
    "eval": "axpo_jax.eval.run:run",
    "compare": "axpo_jax.bench.compare:run",
}


class ModeError(Exception):
    """A mode cannot be dispatched: unknown name, missing module or function, bad result."""


class UnknownModeError(ModeError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message.
        return str(self.args[0]) if self.args else ""


def available() -> list[str]:
    """Names of the registered modes, sorted."""
    return sorted(_MODES)


def register(name: str, target: str | ModeFn | None = None):
    """Registers a mode.

    `register("name", "pkg.mod:fn")` or `register("name", fn)` register directly;
    `@register("name")` registers the decorated function and returns it unchanged.
    Registering a name twice is an error (use a new name, or edit `_MODES`).
    """

    def _add(t: str | ModeFn):
        if name in _MODES:
            raise ModeError(f"mode {name!r} is already registered (as {_describe(_MODES[name])})")
        if isinstance(t, str) and ":" not in t:
            raise ModeError(f"mode target {t!r} must look like 'package.module:function'")
        _MODES[name] = t
        return t

    if target is not None:
        return _add(target)
    return _add


def _describe(target: str | ModeFn) -> str:
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def resolve(name: str) -> ModeFn:
    """Returns the function registered under `name`, importing its module if needed."""
    if name not in _MODES:
        raise UnknownModeError(
            f"unknown mode {name!r}; registered modes: {', '.join(available()) or '(none)'}"
        )
    target = _MODES[name]
    if not isinstance(target, str):
        return target
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Is it the mode's own module (or a parent package) that is missing, or a dependency of it?
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ModeError(
                f"mode {name!r} is registered as {target} but module {module_name!r} does not exist "
                f"(not implemented yet?)"
            ) from e
        raise ModeError(
            f"mode {name!r}: importing {module_name!r} failed because module {e.name!r} is missing "
            f"(is the package installed? `pip install -e .`)"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModeError(f"mode {name!r} is registered as {target} but {module_name!r} has no function {fn_name!r}")
    return fn


@contextlib.contextmanager
def config_fields(fields: str):
    """Reports a ValueError, TypeError or FileNotFoundError raised while the config's `fields` are read (a mode
    does this before it loads anything) as a one-line ModeError that names them."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise ModeError(f"config ({fields}): {error}") from error


def require_positive_ints(config, *fields: str) -> None:
    """ValueError unless each of the config's `fields` is an int >= 1."""
    for field in fields:
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an int >= 1, got {value!r}")


def is_input_error(error: BaseException) -> bool:
    """Whether `error` says the run's input is wrong (a missing file or folder, a folder that is not a Qwen3-VL
    checkpoint, a data file with no usable record, a benchmark's data in the wrong shape), not the code: launch.py
    reports those in one line, as it does a wrong config field, instead of a traceback."""
    from axpo_jax.data.tasks import DataFileError
    from axpo_jax.eval.benchmarks.base import BenchmarkDataError
    from axpo_jax.models.qwen3_vl.config import CheckpointError

    return isinstance(error, (FileNotFoundError, NotADirectoryError, CheckpointError, DataFileError,
                              BenchmarkDataError))


def run(config) -> dict[str, Any]:
    """Runs the mode named by `config.mode` and returns its result dict."""
    name = config.get("mode") if hasattr(config, "get") else getattr(config, "mode", None)
    if not name:
        raise ModeError(f"the config has no 'mode' field; registered modes: {', '.join(available())}")
    fn = resolve(name)
    result = fn(config)
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        raise ModeError(f"mode {name!r} returned {type(result).__name__}, expected a dict")
    return dict(result)
