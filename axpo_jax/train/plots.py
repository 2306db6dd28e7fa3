"""Learning curves as PNG (matplotlib, no display): what people would rather see than read in a metrics log."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rl_run(path: str, records: list[dict], *, sft_losses: list[float] | None = None,
                evals: dict[str, dict] | None = None) -> str:
    """Panels: the SFT loss (if given), rollout reward / tool use / AXPO recovery per RL step, the policy loss
    and KL, and held-out evaluations by stage (if given)."""
    plt = _pyplot()
    panels = ["rollouts", "loss"] + (["sft"] if sft_losses else []) + (["eval"] if evals else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
    axes = dict(zip(panels, np.atleast_1d(axes)))
    steps = [r["step"] for r in records]
    for key in ("reward", "tool_use_rate", "recovery_rate", "eval/average/pass@1"):
        values = [r.get(key, np.nan) for r in records]
        if not np.all(np.isnan(values)):
            axes["rollouts"].plot(steps, values, marker="o", ms=3, label=key)
    axes["rollouts"].set(title="RL rollouts", xlabel="step", ylim=(-0.05, 1.05))
    axes["rollouts"].legend(fontsize=8)
    for key in ("loss", "kl", "entropy"):
        values = [r.get(key, np.nan) for r in records]
        if not np.all(np.isnan(values)):
            axes["loss"].plot(steps, values, label=key)
    axes["loss"].set(title="update", xlabel="step")
    axes["loss"].legend(fontsize=8)
    if sft_losses:
        axes["sft"].plot(sft_losses)
        axes["sft"].set(title="SFT loss (token NLL)", xlabel="step")
    if evals:
        names = list(evals)
        for i, key in enumerate(("pass@1", "tool_use_rate")):
            axes["eval"].bar(np.arange(len(names)) + 0.4 * i, [evals[n].get(key, np.nan) for n in names],
                             width=0.4, label=key)
        axes["eval"].set_xticks(np.arange(len(names)) + 0.2, names)
        axes["eval"].set(title="held-out evaluation", ylim=(0, 1.05))
        axes["eval"].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
