"""The entry point and the mode registry: dispatch, and one-line errors for command-line mistakes.

Fast (no jax): launch.py is run as a subprocess; mode modules are never imported except the
temporary ones registered here.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest

from axpo_jax import modes

ROOT = Path(__file__).resolve().parents[1]


def _launch(*args, prelude=""):
    """Runs launch.py as `python launch.py ARGS`; `prelude` is Python run first in the same process."""
    code = "\n".join(
        [
            "import runpy, sys",
            textwrap.dedent(prelude),
            f"sys.argv = ['launch.py', *{list(args)!r}]",
            "runpy.run_path('launch.py', run_name='__main__')",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def _error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("launch.py: error: "), proc.stderr
    return lines[-1]


# --- the registry -------------------------------------------------------------------------------


def test_builtin_modes_registered():
    assert {"demo", "sft", "rl", "eval", "compare", "bench_forward", "bench_algos", "memory_plan"} <= set(modes.available())
    for name in modes.available():  # every registered mode's module and function exist
        assert callable(modes.resolve(name))


def test_unknown_mode_names_registered_modes():
    with pytest.raises(modes.UnknownModeError) as e:
        modes.run(ml_collections.ConfigDict({"mode": "nosuch"}))
    message = str(e.value)
    assert "nosuch" in message
    for name in ("demo", "bench_forward", "bench_update", "memory_plan"):
        assert name in message


def test_register_decorator_and_run(monkeypatch):
    monkeypatch.setattr(modes, "_MODES", dict(modes._MODES))

    @modes.register("echo_test")
    def echo(config):
        return {"seed": config.seed}

    assert "echo_test" in modes.available()
    assert modes.run(ml_collections.ConfigDict({"mode": "echo_test", "seed": 7})) == {"seed": 7}
    with pytest.raises(modes.ModeError, match="already registered"):
        modes.register("echo_test", echo)


def test_missing_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(modes, "_MODES", dict(modes._MODES))
    modes.register("ghost", "axpo_jax._no_such_module:run")
    with pytest.raises(modes.ModeError, match="'axpo_jax._no_such_module' does not exist"):
        modes.resolve("ghost")
    modes.register("ghost_fn", "axpo_jax.modes:no_such_function")
    with pytest.raises(modes.ModeError, match="no function 'no_such_function'"):
        modes.resolve("ghost_fn")


def test_non_dict_result_is_an_error(monkeypatch):
    monkeypatch.setattr(modes, "_MODES", dict(modes._MODES))
    modes.register("bad_result", lambda config: [1, 2])
    with pytest.raises(modes.ModeError, match="expected a dict"):
        modes.run(ml_collections.ConfigDict({"mode": "bad_result"}))


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, mode",
    [("configs/demo.py", "demo"), ("configs/bench.py:forward", "bench_forward"), ("configs/bench.py:memory", "memory_plan"),
     ("configs/bench.py:update", "bench_update"), ("configs/bench.py:algos", "bench_algos"), ("configs/sft.py", "sft"),
     ("configs/rl.py", "rl"), ("configs/rl.py:8b,v5p-16", "rl"), ("configs/sft.py:32b,v6e-64", "sft"),
     ("configs/eval.py", "eval")],
)
def test_valid_config_parses(spec, mode):
    proc = _launch("--config", spec, "--config.seed=3", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == mode
    assert result["config"]["seed"] == 3


def test_misspelt_override_fails_clearly():
    proc = _launch("--config", "configs/demo.py", "--config.nope=1")
    assert proc.returncode != 0
    assert "nope" in _error_line(proc)

    proc = _launch("--config=configs/bench.py:memory", "--config.mesh.fdsp=2", "--dry_run")
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "mesh.fdsp" in line and "mesh.fsdp" in line  # names the typo and suggests the field


def test_bad_override_value_fails_clearly():
    proc = _launch("--config", "configs/demo.py", "--config.seed=abc")
    assert proc.returncode != 0
    assert "seed" in _error_line(proc)


def test_unknown_mode_on_the_command_line():
    proc = _launch("--config", "configs/demo.py", "--config.mode=nosuch")
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "nosuch" in line and "demo" in line and "memory_plan" in line


def test_bad_config_file_and_arg():
    proc = _launch("--config", "configs/does_not_exist.py")
    assert proc.returncode != 0
    assert "does_not_exist.py" in _error_line(proc)
    proc = _launch("--config", "configs/does_not_exist.py", "--config.steps=3")  # an override met it first
    assert proc.returncode == 2 and "config file 'configs/does_not_exist.py' not found" in _error_line(proc)
    assert "Traceback" not in proc.stderr

    proc = _launch("--config", "configs/bench.py:bogus")
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "bogus" in line and "forward" in line


def test_runs_mode_prints_json_last_and_sets_env(tmp_path):
    config_file = tmp_path / "env_config.py"
    config_file.write_text(
        textwrap.dedent(
            """
            import ml_collections
            def get_config():
                return ml_collections.ConfigDict(
                    dict(mode="echo_env", jax_platforms="cpu", xla_host_device_count=4, seed=0))
            """
        )
    )
    prelude = textwrap.dedent(
        """
        import os
        from axpo_jax import modes
        @modes.register("echo_env")
        def _echo(config):
            print("chatter from the mode")
            return {"seed": config.seed, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "jax_imported": "jax" in sys.modules}
        """
    )
    proc = _launch("--config", str(config_file), "--config.seed=5", prelude=prelude)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "seed": 5,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "jax_imported": False,
    }


@pytest.mark.parametrize("raised, shown", [
    ("FileNotFoundError(\"task file 'q.jsonl' does not exist\")", "task file 'q.jsonl' does not exist"),
    ("CheckpointError('/ckpt is not a folder; expected a Qwen3-VL checkpoint folder')", "/ckpt is not a folder"),
    ("DataFileError(\"task file 'q.jsonl' has no usable task (2 lines skipped: [...])\")", "has no usable task"),
])
def test_a_wrong_path_or_data_file_is_one_line_not_a_traceback(tmp_path, raised, shown):
    config_file = tmp_path / "raise_config.py"
    config_file.write_text(textwrap.dedent(
        """
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict(dict(mode="raise_input_error"))
        """))
    prelude = f"""
        from axpo_jax import modes
        from axpo_jax.data.tasks import DataFileError
        from axpo_jax.models.qwen3_vl.config import CheckpointError
        @modes.register("raise_input_error")
        def _raise(config):
            raise {raised}
        """
    proc = _launch("--config", str(config_file), prelude=prelude)
    assert proc.returncode == 1, proc.stderr
    assert shown in _error_line(proc)


def test_an_error_of_the_code_keeps_its_traceback(tmp_path):
    config_file = tmp_path / "bug_config.py"
    config_file.write_text(textwrap.dedent(
        """
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict(dict(mode="raise_bug"))
        """))
    prelude = """
        from axpo_jax import modes
        @modes.register("raise_bug")
        def _raise(config):
            raise ZeroDivisionError("a bug")
        """
    proc = _launch("--config", str(config_file), prelude=prelude)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError: a bug" in proc.stderr
