"""The project's config files (configs/<name>.py) loaded the way launch.py reads them: by path, not as a package."""

import importlib.util
import os
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str, *arg):
    """`get_config(*arg)` of configs/<name>.py (a config's argument is what follows ':' on the command line)."""
    return config_module(name).get_config(*arg)
