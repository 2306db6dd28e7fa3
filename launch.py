#!/usr/bin/env python3
"""The single entry point of axpo-jax.

    python launch.py --config configs/<name>.py[:arg] [--config.a.b=value ...] [--dry_run]

Loads the config (ml_collections config_flags, locked: an override of a field the config does not
have is an error), applies `config.jax_platforms` / `config.xla_host_device_count` to the environment
before jax is imported, logs the resolved config to stderr, runs the mode named by `config.mode`
(see axpo_jax/modes.py) and prints the dict it returns as one JSON line, the last line of stdout.

`--dry_run` stops after loading: it prints {"dry_run": true, "mode": ..., "config": {...}} instead
of running the mode (checks a config and its overrides without importing jax).

Command-line and config mistakes end with a one-line `launch.py: error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

# Nothing here imports jax: the mode's module (and, just before it, jax.distributed's start-up) does, after
# _apply_env has run.

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/demo.py or configs/bench.py:forward; override fields with --config.a.b=v.",
    lock_config=True,
)
flags.mark_flag_as_required("config")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Load and print the resolved config as JSON; do not run the mode.")

_PROG = "launch.py"
_OVERRIDE_RE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _fail(message: str, code: int = 2):
    print(f"{_PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(message: str) -> str:
    """Squeezes a (possibly traceback-laden) error message into one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if "Traceback (most recent call last):" in lines:
        # Keep what was being parsed and the final exception, drop the frames.
        head = lines[0] if lines[0] != "Traceback (most recent call last):" else ""
        return f"{head} {lines[-1]}".strip()
    return " ".join(lines)


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_file_problem(spec: str | None) -> str | None:
    if not spec:
        return None
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"config file {path!r} not found (from --config={spec})"
    return None


def _load_config_file(spec: str):
    """Loads `path[:arg]` the way config_flags does (get_config(arg)), for error diagnosis only."""
    import importlib.util

    path, *arg = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("_launch_diagnose_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*arg)


def _diagnose_overrides(argv: list[str]) -> str | None:
    """Names the first `--config.x.y` override whose path the config does not have."""
    spec = _config_arg(argv)
    if not spec or _config_file_problem(spec):
        return _config_file_problem(spec)
    try:
        config = _load_config_file(spec)
    except Exception:  # noqa: BLE001 - diagnosis only; the caller falls back to the raw message.
        return None
    for arg in argv:
        m = _OVERRIDE_RE.match(arg)
        if not m:
            continue
        node, walked = config, []
        for part in m.group(1).split("."):
            if not isinstance(node, (config_dict.ConfigDict, dict)):
                where = ".".join(walked)
                return (
                    f"unknown config field {m.group(1)!r} in {arg.split('=', 1)[0]}: "
                    f"config.{where} has type {type(node).__name__}, not a sub-config"
                )
            keys = list(node.keys())
            if part not in keys:
                where = "config" + "".join("." + w for w in walked)
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f" (did you mean {'.'.join(walked + [close[0]])!r}?)" if close else ""
                return (
                    f"unknown config field {m.group(1)!r} in {arg.split('=', 1)[0]}{hint}; "
                    f"fields of {where}: {', '.join(sorted(keys))}"
                )
            node = node[part]
            walked.append(part)
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of tracebacks."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_config_file_problem(_config_arg(argv)) or _diagnose_overrides(argv) or _one_line(str(e)))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # config_flags lets a missing field's AttributeError/KeyError escape flag parsing.
        _fail(_diagnose_overrides(argv) or _one_line(f"{type(e).__name__}: {e}"))
    except OSError as e:  # a config file that cannot be loaded, met first by an override of one of its fields
        _fail(_config_file_problem(_config_arg(argv)) or _one_line(f"{type(e).__name__}: {e}"))
    raise AssertionError("unreachable")


def _apply_env(config) -> None:
    """Applies config fields that must be in the environment before jax is imported."""
    platforms = config.get("jax_platforms")
    count = config.get("xla_host_device_count")
    if (platforms or count) and "jax" in sys.modules:
        logging.warning("jax was imported before the config was applied; jax_platforms/xla_host_device_count may not take effect")
    if platforms:
        os.environ["JAX_PLATFORMS"] = str(platforms)
    if count:
        xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{xla_flags.strip()} --xla_force_host_platform_device_count={int(count)}".strip()


def _flatten(config, prefix: str = "") -> list[str]:
    items = []
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, (config_dict.ConfigDict, dict)):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append(f"{prefix}{key}={value!r}")
    return items


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, config_dict.ConfigDict):
        return obj.to_dict()
    return str(obj)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    try:
        mode = config.get("mode")
    except Exception as e:  # noqa: BLE001 - config_flags defers load errors until first access.
        _fail(_config_file_problem(_config_arg(sys.argv)) or _one_line(str(e)))

    from axpo_jax import modes  # light: no jax

    if not mode:
        _fail(f"the config has no 'mode' field; registered modes: {', '.join(modes.available())}")
    if mode not in modes.available():
        _fail(f"unknown mode {mode!r} (config.mode); registered modes: {', '.join(modes.available())}")

    _apply_env(config)
    logging.info("config (mode=%s): %s", mode, ", ".join(_flatten(config)))
    # Libraries log through absl too (orbax: several INFO lines per checkpoint); modes report progress themselves.
    logging.set_verbosity(logging.WARNING)

    if _DRY_RUN.value:
        result = {"dry_run": True, "mode": mode, "config": config.to_dict()}
    else:
        # ---- multi-host (issue 6): join jax.distributed before the mode starts jax, on every host of a pod -------
        # config.distributed: "auto" (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set, else
        # jax's TPU-pod / SLURM detection, else one process) | "env" | "off". See axpo_jax/parallel/distributed.py.
        from axpo_jax.parallel import distributed

        try:
            process = distributed.initialize_from_env(config.get("distributed", "auto"))
        except (distributed.DistributedError, ValueError, RuntimeError) as e:
            _fail(f"jax.distributed: {_one_line(str(e))}", code=1)
        if process.process_count > 1:
            print(f"[{_PROG}] jax.distributed: {process.describe()}", file=sys.stderr, flush=True)
        # ---- end multi-host ------------------------------------------------------------------------------------
        try:
            result = modes.run(config)
        except modes.ModeError as e:
            _fail(str(e), code=1)
        except Exception as e:  # noqa: BLE001 - a wrong path or data file is one line; anything else, a traceback
            if not modes.is_input_error(e):
                raise
            _fail(_one_line(str(e)), code=1)
    print(json.dumps(result, default=_jsonable), flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=_parse_flags)
