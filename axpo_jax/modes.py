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
import json
import math
import os
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
    require_ints_at_least(config, 1, *fields)


def require_ints_at_least(config, minimum: int, *fields: str) -> None:
    """ValueError unless each of the config's `fields` is an int >= minimum."""
    for field in fields:
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


def require_number(config, field: str, *, above: float | None = None, at_least: float | None = None,
                   at_most: float | None = None) -> None:
    """ValueError unless the config's `field` is a finite number in the given range: a NaN or negative learning
    rate trains (it climbs the loss, or writes NaN weights) instead of failing."""
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    for ok, bound in ((above is None or value > above, f"> {above}"), (at_least is None or value >= at_least,
                      f">= {at_least}"), (at_most is None or value <= at_most, f"<= {at_most}")):
        if not ok:
            raise ValueError(f"{field} must be {bound}, got {value!r}")


def checked_attention(config, dtype) -> str | None:
    """The config's `attention` as the model's fused-attention implementation (`qwen3_vl.fused_attention_for`),
    a ModeError naming the field when it is unknown or cannot run here."""
    from axpo_jax.models.qwen3_vl import fused_attention_for

    with config_fields("attention"):
        return fused_attention_for(config.attention, dtype)


def checked_processor(config):
    """The `checkpoint` folder's processor with the config's `max_image_pixels` applied: a folder without one is
    its own one-line CheckpointError, a limit below the processor's smallest image area a ModeError naming the
    field."""
    from axpo_jax.data.processor import limit_image_pixels, load_processor

    processor = load_processor(config.checkpoint)
    if config.max_image_pixels:
        with config_fields("max_image_pixels"):
            limit_image_pixels(processor, config.max_image_pixels)
    return processor


def require_optimizer_fields(config) -> None:
    """learning_rate > 0, warmup_fraction in [0, 1], weight_decay >= 0, max_grad_norm > 0 (the clip's norm:
    0 would zero every update)."""
    require_number(config, "learning_rate", above=0)
    require_number(config, "warmup_fraction", at_least=0, at_most=1)
    require_number(config, "weight_decay", at_least=0)
    require_number(config, "max_grad_norm", above=0)


def require_workdir(path: str) -> None:
    """ValueError when `path` exists and is not a folder (checkpoints, metrics and the result go inside it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} exists and is not a folder")


def check_run_settings(path: str, settings: dict, *, write: bool, holds: str, option: str,
                       compare: bool = True) -> None:
    """The settings a folder's work was made with must be this run's: a resumed run refuses other settings.

    `path` is the folder's JSON record of them; when it exists (and `compare`: the folder holds work to go on
    from) its settings are compared with `settings` and any difference is a one-line ModeError naming it
    (`holds` says what the folder holds, `option` the config field that picks another folder); otherwise the
    process that may `write` records `settings`, atomically.
    """
    folder = os.path.dirname(path)
    settings = json.loads(json.dumps(settings, default=str))  # as the file holds them: tuples as lists
    if compare and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as file:
                previous = json.load(file)
            if not isinstance(previous, dict):
                raise ValueError(f"expected a JSON object, got {type(previous).__name__}")
        except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError: a damaged file
            raise ModeError(f"{path} is unreadable ({error}); it records the settings of the {holds} in {folder}: "
                            f"restore it, or delete it if this run's settings are those the {holds} were made "
                            f"with (it is then written again), or use a new --config.{option}") from None
        changed = [f"{key}: {previous.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if previous.get(key) != value]
        if changed:
            raise ModeError(f"{folder} holds {holds} of a run with other settings ({'; '.join(changed)}); use a new "
                            f"--config.{option}, or delete that one to start over")
        return
    if write:
        os.makedirs(folder, exist_ok=True)
        partial = path + ".partial"  # renamed into place once whole: a crash never leaves half a file
        with open(partial, "w", encoding="utf-8") as file:
            json.dump(settings, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)


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
