"""The evaluation settings: how many samples per question, how they are sampled, how long a rollout may run.

The defaults are the paper's (docs/AXPO.md §5 and §1): 4 rollouts per question at temperature 0.7, top-p 0.8,
top-k 20, presence penalty 1.5; at most 5 policy turns and 32,768 tokens per rollout. Pass@1 is the mean over the
4 samples and Pass@4 whether any of them is correct.

"32,768 tokens" is read as the whole trajectory's budget (prompt, every turn and every tool observation), i.e. the
KV-cache capacity of each row; a single turn may use whatever of it is left (`max_new_tokens_per_turn` caps it
further when set lower).
"""

from __future__ import annotations

import dataclasses

from axpo_jax.rollout.sampler import SamplingParams


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    presence_penalty: float = 1.5
    max_turns: int = 5
    max_total_tokens: int = 32768  # per trajectory: the KV-cache capacity of its row
    max_new_tokens_per_turn: int = 32768  # bounded by what is left of max_total_tokens

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_turns < 1 or self.max_total_tokens < 1 or self.max_new_tokens_per_turn < 1:
            raise ValueError("max_turns, max_total_tokens and max_new_tokens_per_turn must be positive")
        self.sampling  # SamplingParams checks temperature, top_p, top_k and the presence penalty

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              presence_penalty=self.presence_penalty)

    @property
    def pass_k(self) -> tuple[int, ...]:
        """The k reported: 1 and num_samples (Pass@1 and Pass@4 with the paper's 4 samples)."""
        return tuple(sorted({1, self.num_samples}))

    @classmethod
    def from_config(cls, config) -> "EvalSettings":
        """The settings named by a config's fields of the same names (configs/eval.py)."""
        return cls(**{field.name: type(field.default)(config[field.name]) for field in dataclasses.fields(cls)})

    def describe(self) -> str:
        return (f"{self.num_samples} samples, temperature {self.temperature:g}, top-p {self.top_p:g}, "
                f"top-k {self.top_k}, presence penalty {self.presence_penalty:g}, {self.max_turns} turns, "
                f"{self.max_total_tokens:,} tokens")


PAPER_EVAL_SETTINGS = EvalSettings()
