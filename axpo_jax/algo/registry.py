"""Advantage estimators by name, so a config picks the algorithm with a string (tunix style):

    estimator = registry.make("axpo", ratio=0.25, k=4)          # or make("grpo"), make("axpo", AXPOConfig(...))
    selections = estimator.select(rewards_qn, used_tool_qn, confidence_qn, seed=step)
    ... fork each selected prefix estimator.k ways, roll, score -> resample_rewards_sk [S, K] ...
    adv = estimator.advantages(rewards_qn, selections, resample_rewards_sk, used_tool_qn=used_tool_qn)

Every estimator has the same two-phase interface, so the trainer has one code path: GRPO's `select` returns no
selections and its `advantages` is plain GRPO in the same `Advantages` form (one stream, STREAM_GRPO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from axpo_jax.algo.axpo import (AXPOConfig, Advantages, Selection, axpo_advantages, plain_grpo_advantages,
                                select_resamples)
from axpo_jax.algo.grpo import GRPOConfig

__all__ = ["AXPOEstimator", "AdvantageEstimator", "GRPOEstimator", "available", "make", "register"]


class AdvantageEstimator(Protocol):
    name: str
    config: Any

    @property
    def k(self) -> int:
        """Continuations per selected prefix (0: the estimator never resamples)."""

    def select(self, rewards_qn, used_tool_qn, confidence_qn, *, seed: int = 0,
               include_qn=None, branchable_qn=None) -> list[Selection]: ...

    def advantages(self, rewards_qn, selections: Sequence[Selection], resample_rewards_sk, *, used_tool_qn=None,
                   include_qn=None, resample_include_sk=None) -> Advantages: ...


@dataclasses.dataclass(frozen=True)
class GRPOEstimator:
    """§3 GRPO: no resampling."""

    config: GRPOConfig = GRPOConfig()
    name: str = "grpo"

    @property
    def k(self) -> int:
        return 0

    def select(self, rewards_qn, used_tool_qn, confidence_qn, *, seed: int = 0, include_qn=None,
               branchable_qn=None) -> list[Selection]:
        return []

    def advantages(self, rewards_qn, selections: Sequence[Selection] = (), resample_rewards_sk=None, *,
                   used_tool_qn=None, include_qn=None, resample_include_sk=None) -> Advantages:
        if selections or (resample_rewards_sk is not None and np.asarray(resample_rewards_sk).size):
            raise ValueError("GRPO takes no resamples")
        return plain_grpo_advantages(rewards_qn, self.config, include_qn=include_qn)


@dataclasses.dataclass(frozen=True)
class AXPOEstimator:
    """§4 AXPO: `select` = select_resamples, `advantages` = axpo_advantages, both with this config."""

    config: AXPOConfig = AXPOConfig()
    name: str = "axpo"

    @property
    def k(self) -> int:
        return self.config.k

    def select(self, rewards_qn, used_tool_qn, confidence_qn, *, seed: int = 0, include_qn=None,
               branchable_qn=None) -> list[Selection]:
        return select_resamples(rewards_qn, used_tool_qn, confidence_qn, self.config, seed=seed,
                                include_qn=include_qn, branchable_qn=branchable_qn)

    def advantages(self, rewards_qn, selections: Sequence[Selection], resample_rewards_sk, *, used_tool_qn=None,
                   include_qn=None, resample_include_sk=None) -> Advantages:
        return axpo_advantages(rewards_qn, selections, resample_rewards_sk, self.config, used_tool_qn=used_tool_qn,
                               include_qn=include_qn, resample_include_sk=resample_include_sk)


# name -> (estimator class, config class)
_ESTIMATORS: dict[str, tuple[Callable[..., AdvantageEstimator], type]] = {
    "grpo": (GRPOEstimator, GRPOConfig),
    "axpo": (AXPOEstimator, AXPOConfig),
}


def register(name: str, estimator_cls: Callable[..., AdvantageEstimator], config_cls: type) -> None:
    """Adds an estimator: `estimator_cls(config=config_cls(...), name=name)`. A name registers once."""
    if name in _ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} is already registered")
    _ESTIMATORS[name] = (estimator_cls, config_cls)


def available() -> list[str]:
    """Registered estimator names, sorted."""
    return sorted(_ESTIMATORS)


def make(name: str, config: Any = None, **overrides) -> AdvantageEstimator:
    """The estimator registered as `name`, configured by `config` (its config dataclass, or a mapping of its
    fields, e.g. an ml-collections ConfigDict's `.to_dict()`), with keyword `overrides` on top.

    Unknown names and unknown config fields are errors (ValueError) naming what is accepted.
    """
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; available: {available()}")
    estimator_cls, config_cls = _ESTIMATORS[name]
    if config is None:
        fields = {}
    elif isinstance(config, Mapping):
        fields = dict(config)
    elif isinstance(config, config_cls):
        fields = dataclasses.asdict(config)
    else:
        raise ValueError(f"config for {name!r} must be a {config_cls.__name__} or a mapping, got {type(config)}")
    fields.update(overrides)
    allowed = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown}; accepted: {sorted(allowed)}")
    return estimator_cls(config=config_cls(**fields), name=name)
