"""The demo's workdir: what it builds there is tied to the settings it was built with, and its SFT data's system
prompt lists the tools RL and evaluation use."""

import json
import os

import pytest

from axpo_jax import demo
from axpo_jax.modes import ModeError
from tests.config_files import load_config


def test_the_sft_stage_shows_the_rl_stage_tools():
    config = load_config("demo")
    config.rl.tools = ("image_zoom_in", "python")
    sft, rl = demo.stage_configs(config)
    assert tuple(sft.tools) == tuple(rl.tools) == ("image_zoom_in", "python")


def test_a_workdir_built_with_another_task_is_refused_before_anything_runs(tmp_path):
    config = load_config("demo")
    config.workdir = str(tmp_path / "demo")
    os.makedirs(config.workdir)
    recorded = demo.demo_settings(config)
    recorded["task"] = {**recorded["task"], "ask": "cell"}
    with open(os.path.join(config.workdir, "demo_config.json"), "w") as f:
        json.dump(recorded, f)
    with pytest.raises(ModeError, match=r"other settings \(task: .*'ask': 'cell'.* -> .*'ask': 'place'"):
        demo.run(config)
    recorded = demo.demo_settings(config)
    recorded["sft"]["steps"] += 1  # the SFT policy of another recipe, which a rerun would not retrain
    with open(os.path.join(config.workdir, "demo_config.json"), "w") as f:
        json.dump(recorded, f)
    with pytest.raises(ModeError, match=r"other settings \(sft: "):
        demo.run(config)
    assert os.listdir(config.workdir) == ["demo_config.json"]  # nothing was built, evaluated or trained
