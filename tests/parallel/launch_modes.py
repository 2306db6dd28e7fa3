"""launch.py with two test hooks, for tests/parallel/test_multihost_modes.py (run from the repository root):

    python tests/parallel/launch_modes.py --config configs/rl.py --config.algo=axpo_first_right ...

- the advantage estimator "axpo_first_right": AXPO (its selection and forks from the real rewards) whose advantages
  score each group's first rollout, and each selection's first continuation, as right. A policy a few SFT steps
  old answers nothing correctly, so real rewards would make every advantage and the whole policy loss 0; with
  these, the compared losses and gradients depend on the restored weights and optimizer state.
- AXPO_TEST_STOP_AFTER_STEP=1 in a process's environment: that process alone sees a stop request (as if only its
  host got SIGTERM), from the first step boundary on. The modes must still stop every process after the same step.
"""

import dataclasses
import os
import runpy
import sys

import numpy as np

from axpo_jax.algo import registry
from axpo_jax.algo.axpo import AXPOConfig
from axpo_jax.algo.registry import AXPOEstimator
from axpo_jax.train.checkpoints import StopRequest


@dataclasses.dataclass(frozen=True)
class FirstRolloutRight(AXPOEstimator):
    def advantages(self, rewards_qn, selections, resample_rewards_sk, **kwargs):
        pretend = np.zeros_like(rewards_qn)
        pretend[:, 0] = 1
        pretend_sk = np.zeros_like(resample_rewards_sk)
        pretend_sk[:, :1] = 1
        return super().advantages(pretend, selections, pretend_sk, **kwargs)


registry.register("axpo_first_right", FirstRolloutRight, AXPOConfig)

if os.environ.get("AXPO_TEST_STOP_AFTER_STEP") == "1":
    StopRequest.__bool__ = lambda self: True

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv = [os.path.join(root, "launch.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
