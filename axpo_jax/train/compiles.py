"""How many XLA compilations a training step ran and how long they took, from jax.monitoring's events.

A step that compiles is not a steady-state step: its time says little about throughput, and compiles after the
first steps mean shapes that are not bucketed. Each step's metrics carry `compiles` and `compile_s`, and the
benchmark record of a run is taken over the steps that compiled nothing (axpo_jax/train/rl_run.py).
"""

from __future__ import annotations

import threading

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_totals = {"compiles": 0, "compile_s": 0.0}
_registered = False


def _on_duration(event: str, duration_s: float, **_) -> None:
    if event == _BACKEND_COMPILE:
        with _lock:
            _totals["compiles"] += 1
            _totals["compile_s"] += duration_s


def _register() -> None:
    """One process-wide listener (jax.monitoring has no public way to remove one, so never more than one)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_duration)


class CompileClock:
    """`take()` returns {"compiles", "compile_s"} since the clock was made or last taken (this thread or any:
    compiles on the agent loop's threads count too)."""

    def __init__(self):
        _register()
        self._last = self._now()

    @staticmethod
    def _now() -> dict:
        with _lock:
            return dict(_totals)

    def take(self) -> dict:
        now = self._now()
        delta = {"compiles": now["compiles"] - self._last["compiles"],
                 "compile_s": round(now["compile_s"] - self._last["compile_s"], 3)}
        self._last = now
        return delta
