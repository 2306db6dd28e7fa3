"""AXPO (docs/AXPO.md §4): which failed tool calls to resample, and the two-stream advantages. numpy, pure, host side.

One step, as data (Q questions × N rollouts; S selected prefixes × K continuations):

    rewards_qn, used_tool_qn, confidence_qn
        │  select_resamples            §4.1 trigger, §4.2 candidates, §4.3 ranking, §4.4 budget (breadth-first)
        ▼
    selections: [Selection(question, rollout, rank, round, score)] (S of them, in allocation order)
        │  (the sampler forks each selected prefix K ways and rolls the continuations; rewards → resample_rewards_sk)
        ▼
    axpo_advantages                    §4.6 continuation stream + prefix stream; everything else plain GRPO
        ▼
    Advantages (per rollout part)  ──axpo_token_advantages(prefix_end, loss masks)──▶  TokenAdvantages (per token)

Every token is trained from exactly one stream (§4.6), recorded as a stream code per part and per token:
  STREAM_GRPO         plain GRPO advantage over a whole original response (untriggered groups, unselected rollouts)
  STREAM_PREFIX       a selected source's prefix tokens (start of response .. its first `<tool_call>` tag, inclusive)
  STREAM_CONTINUATION a resample's continuation tokens (everything after the shared prefix)
  STREAM_NONE         not trained: a source's original failed continuation, every resample's copy of the prefix,
                      excluded (truncated) rollouts, loss-masked tokens (observations, padding)

Choices where the paper is silent (each a field of `AXPOConfig` or documented where it acts):
- Budget: `max_extra = floor(r·B·N)` continuations per step with B = Q (the questions of this step), so the paper's
  "≤ r·B·N" is never exceeded; prefixes = floor(max_extra / K). (floor, not round: "≤" is a bound.) A 1e-9 slack
  keeps float products like 0.29·100 = 28.999… from losing one. `budget_unit="prefixes"` reads r·B·N as a count of
  prefixes instead (K·r·B·N continuations) — the reading under which the paper's "GRPO with 2× rollouts" baseline
  (N·(1 + r·K) = 2N at r = .25, K = 4) spends the same samples as AXPO; AXPO.md's text says continuations.
- Breadth-first order: round j gives every triggered question its (j+1)-th best candidate; within a round the
  questions go in the order of that candidate's score (lowest confidence first — the ranking rule applied across
  questions too, so when the budget ends mid-round it is the least confident prefixes that got resampled); ties by
  (question index, rollout index). A tool-using rollout with NaN confidence (no tool-call logprobs) ranks after
  every finite one.
- Random ranking: scores are uniform draws from `np.random.default_rng(seed)` over the whole [Q, N] grid (so the
  draw does not depend on which rollouts are candidates), then the same ordering.
- "correct" means reward ≥ `correct_threshold` (1.0: rewards are binary, §1).
- Other members of a triggered group keep their original GRPO advantages (`renormalize_whole_group=False`: the
  paper's "unselected rollouts keep standard GRPO"); True gives them the renormalized statistics. Only questions that
  got ≥ 1 selection change; a triggered question the budget did not reach is plain GRPO.
- Several sources in one question: each source's reward is replaced by its own r_prefix, all at once, and the group
  is renormalized once.
- K-group std = 0 → Â_k = 0 (§4.6).
- `prefix_credit=False`: no prefix stream — the source is trained like any unselected rollout (plain GRPO over its
  whole response, original continuation included), so the ablation removes exactly the prefix credit and leaves
  every token with one stream; the resamples still train their continuations.
- `resample_from="scratch"`: continuations are whole fresh responses (prefix_end = 0), there is no prefix, so no
  prefix credit and nothing of the source is masked (it keeps plain GRPO); `prefix_credit` is ignored.
- `candidates="no_tool"`: the roles of the two subgroups swap: a group triggers when its no-tool subgroup is
  non-empty and has no correct rollout; candidates are those failed no-tool rollouts. A no-tool rollout has no
  `<tool_call>` to branch at, so its resamples are fresh responses, as with `resample_from="scratch"`: no prefix
  credit, nothing of the source masked (`AXPOConfig.resamples_from_scratch`, by which the trainer rolls them out
  too). Its confidence is whatever the caller puts in `confidence_qn` (NaN → index order).
- `merge_into_source_group=True`: a question's group becomes its N originals (sources' rewards replaced by their
  r_prefix when prefix credit applies, as in the unmerged rule) plus all its resamples; one normalization of that
  merged group gives the resamples' continuation advantages and the sources' prefix advantages (no K-group).
  Unselected originals still keep their original advantages unless `renormalize_whole_group`.
- Truncation "exclude" (see grpo.apply_truncation): excluded rollouts/resamples are invisible — not in any
  statistics, not triggers, not candidates, not trained; r_prefix counts only included resamples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from axpo_jax.algo.grpo import GRPOConfig, apply_truncation, check_normalizer, masked_group_normalize

__all__ = [
    "STREAM_CONTINUATION",
    "STREAM_GRPO",
    "STREAM_NAMES",
    "STREAM_NONE",
    "STREAM_PREFIX",
    "AXPOConfig",
    "Advantages",
    "Selection",
    "TokenAdvantages",
    "axpo_advantages",
    "axpo_token_advantages",
    "grpo_equal_budget_group_size",
    "group_size_for_equal_tokens",
    "plain_grpo_advantages",
    "prefix_end_after_first",
    "prepare_rewards",
    "resample_budget",
    "select_resamples",
    "tool_call_confidence",
    "trigger_and_candidates",
]

STREAM_NONE = 0
STREAM_GRPO = 1
STREAM_PREFIX = 2
STREAM_CONTINUATION = 3
STREAM_NAMES = {STREAM_NONE: "none", STREAM_GRPO: "grpo", STREAM_PREFIX: "prefix",
                STREAM_CONTINUATION: "continuation"}


@dataclasses.dataclass(frozen=True)
class AXPOConfig:
    """AXPO's knobs. Defaults = the paper (§4, §5); each ablation of §5 is one switch.

    ratio (r = 0.25), k (K = 4): budget ratio and continuations per selected prefix (§4.4).
    ranking: "confidence" (lowest mean tool-call token probability first, §4.3) | "random" (ablation).
    resample_from: "first_tool_call" (§4.2) | "scratch" (ablation: fresh responses, no prefix credit).
    candidates: "failed_tool" (§4.2) | "no_tool" (ablation: resample the failed no-tool rollouts, from scratch).
    prefix_credit: True (§4.6 prefix stream) | False (ablation: the source keeps plain GRPO).
    merge_into_source_group: False (own K-group, §4.6) | True (ablation: resamples join the source's N-group).
    renormalize_whole_group: False (others keep original advantages) | True (they use the renormalized stats).
    budget_unit: "continuations" (AXPO.md: ≤ r·B·N continuations) | "prefixes" (≤ r·B·N prefixes × K).
    correct_threshold: reward ≥ this counts as correct (1.0; rewards are binary).
    std_normalize, eps, ddof, truncation: the GRPO normalizer and truncation policy shared by every group (see
    grpo.GRPOConfig).
    """

    ratio: float = 0.25
    k: int = 4
    ranking: Literal["confidence", "random"] = "confidence"
    resample_from: Literal["first_tool_call", "scratch"] = "first_tool_call"
    candidates: Literal["failed_tool", "no_tool"] = "failed_tool"
    prefix_credit: bool = True
    merge_into_source_group: bool = False
    renormalize_whole_group: bool = False
    budget_unit: Literal["continuations", "prefixes"] = "continuations"
    correct_threshold: float = 1.0
    std_normalize: bool = True
    eps: float = 1e-6
    ddof: int = 0
    truncation: Literal["keep", "exclude"] = "keep"

    def __post_init__(self):
        choices = {"ranking": ("confidence", "random"), "resample_from": ("first_tool_call", "scratch"),
                   "candidates": ("failed_tool", "no_tool"), "budget_unit": ("continuations", "prefixes")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"AXPOConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        check_normalizer(self)
        if not (self.ratio >= 0 and math.isfinite(self.ratio)):
            raise ValueError(f"AXPOConfig.ratio must be a finite number ≥ 0, got {self.ratio}")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"AXPOConfig.k must be a positive integer, got {self.k}")
        if not math.isfinite(self.correct_threshold):
            raise ValueError(f"AXPOConfig.correct_threshold must be a finite number, got {self.correct_threshold}")

    @property
    def resamples_from_scratch(self) -> bool:
        """Whether resamples are fresh responses to the question rather than forks of a prefix: the "scratch"
        ablation, and the "no_tool" one, whose sources have no `<tool_call>` to branch at. The trainer rolls them
        out by this, and the advantages give no prefix credit by it, so the two cannot disagree."""
        return self.resample_from == "scratch" or self.candidates == "no_tool"

    @property
    def uses_prefix_credit(self) -> bool:
        """Whether sources get the prefix stream (and their original continuation is masked): only when resamples
        are forks of a prefix (a source of fresh responses has no prefix, so its whole response keeps GRPO)."""
        return self.prefix_credit and not self.resamples_from_scratch

    @property
    def grpo(self) -> GRPOConfig:
        return GRPOConfig(std_normalize=self.std_normalize, eps=self.eps, ddof=self.ddof, truncation=self.truncation)


@dataclasses.dataclass(frozen=True)
class Selection:
    """One selected prefix: rollout `rollout` of question `question`.

    rank: position in the allocation order (0 = first selected); round: breadth-first round (0 = its question's
    best candidate); score: the ranking key (confidence, or the random draw), lower = selected earlier.
    """

    question: int
    rollout: int
    rank: int
    round: int = 0
    score: float = float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Inputs the rollout code computes


def tool_call_confidence(logprobs, tool_call_mask) -> np.ndarray:
    """§4.3 score: mean policy probability exp(logprob) over the sampled tool-call tokens (`tool_call_mask`, same
    shape, last axis = tokens). NaN where a row has no tool-call token (a no-tool rollout).

    Which tokens count is the caller's: §4.3 says "the sampled tool-call tokens of τ_src"; we recommend all tokens
    inside `<tool_call>…</tool_call>` spans of all its calls (tags included), which the sampler's logprobs give for
    free. The mean is arithmetic over tokens (not a geometric mean / per-call average): the paper says "mean
    policy probability".
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    m = np.asarray(tool_call_mask, dtype=bool)
    count = m.sum(axis=-1)
    total = np.where(m, np.exp(lp), 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def prefix_end_after_first(token_ids, open_token_id: int) -> np.ndarray:
    """§4.2 prefix boundary: the index right after the first `open_token_id` (the `<tool_call>` token) in each row
    of response token ids (last axis); the prefix is tokens [0, prefix_end). 0 where the row has none (no prefix:
    a resample from such a row is from scratch)."""
    ids = np.asarray(token_ids)
    hit = ids == open_token_id
    first = np.argmax(hit, axis=-1)
    return np.where(hit.any(axis=-1), first + 1, 0)


# ----------------------------------------------------------------------------------------------------------------
# Selection (§4.1–4.4)


def _check_qn(name: str, array, shape: tuple[int, ...], dtype) -> np.ndarray:
    a = np.asarray(array, dtype=dtype)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return a


def _include(include, shape) -> np.ndarray:
    return np.ones(shape, dtype=bool) if include is None else _check_qn("include", include, shape, bool)


def trigger_and_candidates(rewards_qn, used_tool_qn, config: AXPOConfig = AXPOConfig(), *,
                           include_qn=None) -> tuple[np.ndarray, np.ndarray]:
    """§4.1 trigger and §4.2 candidates: (triggered_q bool [Q], candidate_qn bool [Q, N]).

    Default (`candidates="failed_tool"`): the tool-using subgroup = included rollouts with ≥ 1 tool call; a group
    triggers when that subgroup is non-empty and has no correct rollout (no-tool rollouts may be correct); every
    member of a triggered subgroup is a failed tool-using rollout, i.e. a candidate. `candidates="no_tool"` swaps
    the subgroups (see the module docstring).
    """
    r = np.asarray(rewards_qn, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards_qn must be [Q, N], got shape {r.shape}")
    used = _check_qn("used_tool_qn", used_tool_qn, r.shape, bool)
    inc = _include(include_qn, r.shape)
    subgroup = (used if config.candidates == "failed_tool" else ~used) & inc
    correct = r >= config.correct_threshold
    triggered = subgroup.any(axis=1) & ~(subgroup & correct).any(axis=1)
    candidates = subgroup & ~correct & triggered[:, None]
    return triggered, candidates


def resample_budget(num_questions: int, n: int, config: AXPOConfig = AXPOConfig()) -> tuple[int, int]:
    """§4.4 budget: (max extra continuations, max selected prefixes) per step, B = `num_questions`.

    "continuations": floor(r·B·N) continuations, floor(that / K) prefixes. "prefixes": floor(r·B·N) prefixes,
    K× that many continuations. E.g. r = .25, B = 4, N = 8 → 8 continuations → 2 prefixes at K = 4.
    """
    units = math.floor(config.ratio * num_questions * n + 1e-9)
    if config.budget_unit == "prefixes":
        return units * config.k, units
    return (units // config.k) * config.k, units // config.k


def select_resamples(rewards_qn, used_tool_qn, confidence_qn, config: AXPOConfig = AXPOConfig(), *, seed: int = 0,
                     include_qn=None, branchable_qn=None) -> list[Selection]:
    """§4.1–4.4: the prefixes to resample this step, in allocation order.

    rewards_qn [Q, N] (binary), used_tool_qn [Q, N] bool (≥ 1 tool call), confidence_qn [Q, N] (mean probability of
    the sampled tool-call tokens; NaN for no-tool rollouts; see `tool_call_confidence`), `seed` for random ranking,
    `include_qn` (False = excluded by truncation "exclude"), `branchable_qn` (False = a rollout with no prefix to
    branch from, which stays in the trigger's statistics but is never selected; None = every rollout can be).

    Trigger and candidates per `trigger_and_candidates`; ranked lowest score first (score = confidence, or a random
    draw); at most `resample_budget(Q, N)[1]` prefixes (each costs K continuations); breadth-first: round j gives
    each triggered question its (j+1)-th best candidate before any question gets a (j+2)-th; within a round the
    questions go in order of that candidate's score; ties by (question, rollout) index.
    """
    r = np.asarray(rewards_qn, dtype=np.float64)
    triggered, candidates = trigger_and_candidates(r, used_tool_qn, config, include_qn=include_qn)
    if branchable_qn is not None:
        candidates = candidates & _check_qn("branchable_qn", branchable_qn, r.shape, bool)
    q_count, n = r.shape
    if config.ranking == "confidence":
        conf = _check_qn("confidence_qn", confidence_qn, r.shape, np.float64)
        scores = np.where(np.isnan(conf), np.inf, conf)
    else:
        scores = np.random.default_rng(seed).random(r.shape)
    _, max_prefixes = resample_budget(q_count, n, config)

    # each triggered question's candidates, best first
    queues = []
    for q in np.flatnonzero(triggered):
        rollouts = np.flatnonzero(candidates[q])
        order = sorted(rollouts.tolist(), key=lambda i: (scores[q, i], i))
        if order:
            queues.append((int(q), order))

    selections: list[Selection] = []
    round_index = 0
    while len(selections) < max_prefixes:
        this_round = [(scores[q, order[round_index]], q, order[round_index])
                      for q, order in queues if len(order) > round_index]
        if not this_round:
            break
        for score, q, i in sorted(this_round):
            if len(selections) >= max_prefixes:
                break
            selections.append(Selection(question=q, rollout=int(i), rank=len(selections), round=round_index,
                                        score=float(score)))
        round_index += 1
    return selections


# ----------------------------------------------------------------------------------------------------------------
# Advantages (§4.6)


@dataclasses.dataclass(frozen=True)
class Advantages:
    """Per-part advantages of one step; every part carries one stream code (STREAM_*).

    Originals [Q, N]: a response splits at its prefix_end into a prefix part and a continuation part.
      prefix_adv_qn / prefix_stream_qn: advantage and stream of its prefix tokens,
      cont_adv_qn / cont_stream_qn:     advantage and stream of the tokens after the prefix.
      An unselected rollout has the same GRPO advantage on both parts (its split point does not matter); a source
      with prefix credit has STREAM_PREFIX on its prefix and STREAM_NONE (advantage 0) on its continuation.
    Resamples [S, K] (row s = selections[s]): resample_adv_sk / resample_stream_sk for their continuation tokens;
      their copy of the prefix is never trained.
    Diagnostics: grpo_adv_qn (plain GRPO of the originals), r_prefix_s (1 if any continuation of selection s was
    correct), triggered_q, selections, resample_rewards_sk.
    """

    prefix_adv_qn: np.ndarray
    cont_adv_qn: np.ndarray
    prefix_stream_qn: np.ndarray
    cont_stream_qn: np.ndarray
    resample_adv_sk: np.ndarray
    resample_stream_sk: np.ndarray
    grpo_adv_qn: np.ndarray
    r_prefix_s: np.ndarray
    triggered_q: np.ndarray
    selections: tuple[Selection, ...]
    resample_rewards_sk: np.ndarray
    uses_prefix_credit: bool = True

    @property
    def prefix_weight_qn(self) -> np.ndarray:
        """1.0 where an original's prefix part is trained."""
        return (self.prefix_stream_qn != STREAM_NONE).astype(np.float32)

    @property
    def cont_weight_qn(self) -> np.ndarray:
        """1.0 where an original's continuation part is trained (0 for sources with prefix credit)."""
        return (self.cont_stream_qn != STREAM_NONE).astype(np.float32)

    @property
    def resample_weight_sk(self) -> np.ndarray:
        return (self.resample_stream_sk != STREAM_NONE).astype(np.float32)

    def metrics(self) -> dict[str, float]:
        """Scalars for logging: triggered questions, selections, resample accuracy, prefix-credit rate."""
        inc = self.resample_stream_sk != STREAM_NONE
        return {
            "axpo/triggered_frac": float(self.triggered_q.mean()) if self.triggered_q.size else 0.0,
            "axpo/num_triggered": float(self.triggered_q.sum()),
            "axpo/num_selected": float(len(self.selections)),
            "axpo/num_resamples": float(inc.sum()),
            "axpo/resample_reward_mean": float(self.resample_rewards_sk[inc].mean()) if inc.any() else 0.0,
            "axpo/prefix_rescued_frac": float(self.r_prefix_s.mean()) if self.r_prefix_s.size else 0.0,
        }


def plain_grpo_advantages(rewards_qn, config: GRPOConfig | AXPOConfig = GRPOConfig(), *,
                          include_qn=None) -> Advantages:
    """§3 GRPO in the `Advantages` form (no selections): the same GRPO advantage on both parts of every included
    rollout. `axpo_advantages` with no selections returns exactly this."""
    r = np.asarray(rewards_qn, dtype=np.float64)
    inc = _include(include_qn, r.shape)
    base = masked_group_normalize(r, inc, std_normalize=config.std_normalize, eps=config.eps, ddof=config.ddof)
    stream = np.where(inc, STREAM_GRPO, STREAM_NONE).astype(np.int8)
    return Advantages(prefix_adv_qn=base.copy(), cont_adv_qn=base.copy(), prefix_stream_qn=stream,
                      cont_stream_qn=stream.copy(), resample_adv_sk=np.zeros((0, 0)),
                      resample_stream_sk=np.zeros((0, 0), np.int8), grpo_adv_qn=base, r_prefix_s=np.zeros((0,)),
                      triggered_q=np.zeros(r.shape[0], bool), selections=(),
                      resample_rewards_sk=np.zeros((0, 0)), uses_prefix_credit=False)


def axpo_advantages(rewards_qn, selections: Sequence[Selection], resample_rewards_sk,
                    config: AXPOConfig = AXPOConfig(), *, used_tool_qn=None, include_qn=None,
                    resample_include_sk=None) -> Advantages:
    """§4.6 two-stream advantages.

    rewards_qn [Q, N]: the original rollouts' rewards; selections: from `select_resamples` (row s of the resample
    arrays belongs to selections[s]); resample_rewards_sk [S, K]: rewards of the K continuations of each selected
    prefix; `used_tool_qn` only fills `triggered_q` for logging; include masks as in grpo.apply_truncation.

    - Continuation stream: Â_k = (r_k − mean_K) / std_K over the K continuations of one prefix (std = 0 → 0),
      applied to their continuation tokens only.
    - Prefix stream: r_prefix = 1 if any r_k = 1 else 0 replaces the source's reward in its N-group, the group is
      renormalized, and the source's new advantage applies to its PREFIX tokens only; its original continuation
      is masked (STREAM_NONE).
    - Everything else (untriggered groups, unselected rollouts) keeps plain GRPO — including the other members of
      a group with a source, unless `renormalize_whole_group`.
    Ablations (`config`): see the module docstring and `AXPOConfig`.
    """
    r = np.asarray(rewards_qn, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards_qn must be [Q, N], got shape {r.shape}")
    q_count, n = r.shape
    selections = tuple(selections)
    s_count = len(selections)
    rr = np.asarray(resample_rewards_sk, dtype=np.float64)
    if s_count == 0 and rr.size == 0:
        rr = np.zeros((0, config.k))
    if rr.shape != (s_count, config.k):
        raise ValueError(f"resample_rewards_sk has shape {rr.shape}, expected ({s_count}, {config.k}) "
                         f"= (len(selections), K)")
    inc = _include(include_qn, r.shape)
    rinc = _include(resample_include_sk, rr.shape)
    seen = set()
    for sel in selections:
        if not (0 <= sel.question < q_count and 0 <= sel.rollout < n):
            raise ValueError(f"{sel} is outside the [{q_count}, {n}] grid of rollouts")
        if (sel.question, sel.rollout) in seen:
            raise ValueError(f"{sel} selects a rollout twice")
        if not inc[sel.question, sel.rollout]:
            raise ValueError(f"{sel} selects an excluded rollout")
        seen.add((sel.question, sel.rollout))

    norm = dict(std_normalize=config.std_normalize, eps=config.eps, ddof=config.ddof)
    base = masked_group_normalize(r, inc, **norm)
    prefix_adv, cont_adv = base.copy(), base.copy()
    grpo_stream = np.where(inc, STREAM_GRPO, STREAM_NONE).astype(np.int8)
    prefix_stream, cont_stream = grpo_stream.copy(), grpo_stream.copy()

    correct_sk = (rr >= config.correct_threshold) & rinc
    r_prefix = correct_sk.any(axis=1).astype(np.float64)
    resample_stream = np.where(rinc, STREAM_CONTINUATION, STREAM_NONE).astype(np.int8)
    resample_adv = masked_group_normalize(rr, rinc, **norm) if s_count else np.zeros((0, config.k))
    credit = config.uses_prefix_credit

    by_question: dict[int, list[int]] = {}
    for s, sel in enumerate(selections):
        by_question.setdefault(sel.question, []).append(s)

    for q, ss in by_question.items():
        group_r = r[q].copy()
        group_inc = inc[q].copy()
        if credit:
            for s in ss:
                group_r[selections[s].rollout] = r_prefix[s]
        if config.merge_into_source_group:
            group_r = np.concatenate([group_r] + [rr[s] for s in ss])
            group_inc = np.concatenate([group_inc] + [rinc[s] for s in ss])
        group_adv = masked_group_normalize(group_r, group_inc, **norm)
        if config.merge_into_source_group:
            for j, s in enumerate(ss):
                resample_adv[s] = group_adv[n + j * config.k: n + (j + 1) * config.k]
        if config.renormalize_whole_group:
            prefix_adv[q] = np.where(inc[q], group_adv[:n], 0.0)
            cont_adv[q] = prefix_adv[q]
        if credit:
            for s in ss:
                i = selections[s].rollout
                prefix_adv[q, i] = group_adv[i]
                prefix_stream[q, i] = STREAM_PREFIX
                cont_adv[q, i] = 0.0
                cont_stream[q, i] = STREAM_NONE

    resample_adv = np.where(rinc, resample_adv, 0.0)
    if used_tool_qn is not None:
        triggered, _ = trigger_and_candidates(r, used_tool_qn, config, include_qn=inc)
    else:
        triggered = np.zeros(q_count, bool)
        for sel in selections:
            triggered[sel.question] = True
    return Advantages(prefix_adv_qn=prefix_adv, cont_adv_qn=cont_adv, prefix_stream_qn=prefix_stream,
                      cont_stream_qn=cont_stream, resample_adv_sk=resample_adv, resample_stream_sk=resample_stream,
                      grpo_adv_qn=base, r_prefix_s=r_prefix, triggered_q=triggered, selections=selections,
                      resample_rewards_sk=rr, uses_prefix_credit=credit)


# ----------------------------------------------------------------------------------------------------------------
# Per-token arrays


@dataclasses.dataclass(frozen=True)
class TokenAdvantages:
    """Per-token advantages, loss masks and stream codes for the originals [Q, N, T] and the resamples [S, K, T'].

    mask = 1 exactly where stream ≠ STREAM_NONE (a trained token), advantages are 0 where mask = 0. `rows()` stacks
    originals then resamples into [Q·N + S·K, T] for the update (needs T = T').
    """

    advantages_qnt: np.ndarray
    mask_qnt: np.ndarray
    stream_qnt: np.ndarray
    resample_advantages_skt: np.ndarray
    resample_mask_skt: np.ndarray
    resample_stream_skt: np.ndarray

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(advantages, mask, stream), each [Q·N + S·K, T]: originals in (q, n) order, then resamples in (s, k)."""
        t = self.advantages_qnt.shape[-1]
        if self.resample_advantages_skt.size and self.resample_advantages_skt.shape[-1] != t:
            raise ValueError("originals and resamples have different token lengths; pad them to one bucket")

        def cat(a, b):
            return np.concatenate([a.reshape(-1, t), b.reshape(-1, t)], axis=0)

        return (cat(self.advantages_qnt, self.resample_advantages_skt), cat(self.mask_qnt, self.resample_mask_skt),
                cat(self.stream_qnt, self.resample_stream_skt))

    def stream_masks(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name → (bool mask over originals, bool mask over resamples) for each trained stream: a token is in one
        of them at most, and in one exactly when it is trained."""
        return {STREAM_NAMES[c]: (self.stream_qnt == c, self.resample_stream_skt == c)
                for c in (STREAM_GRPO, STREAM_PREFIX, STREAM_CONTINUATION)}


def axpo_token_advantages(advantages: Advantages, *, prefix_end_qn, loss_mask_qnt, resample_loss_mask_skt=None,
                          resample_prefix_end_sk=None, resample_from: str | None = None) -> TokenAdvantages:
    """Maps per-part advantages onto tokens.

    prefix_end_qn [Q, N]: each original's split point, the token index right after its first `<tool_call>` token
    (see `prefix_end_after_first`); tokens [0, prefix_end) are the prefix, [prefix_end, T) the continuation. Only
    sources need a meaningful value (an unselected rollout has one advantage on both parts).
    loss_mask_qnt [Q, N, T]: 1 on policy-generated tokens (§1: observations and padding are 0).
    resample_loss_mask_skt [S, K, T']: the resample rows' loss masks (observations of their tool calls masked).
    resample_prefix_end_sk [S, K]: where each resample's continuation starts in its row. Default: the source's
    prefix_end (rows laid out as prefix copy + continuation), or 0 when `resample_from == "scratch"` (whole fresh
    responses) — pass 0 also when the rows hold only the continuation. Tokens before it are never trained (§4.6:
    "the shared prefix copy inside each resample is masked").
    """
    prefix_end = np.asarray(prefix_end_qn, dtype=np.int64)
    loss_mask = np.asarray(loss_mask_qnt)
    q_count, n = advantages.prefix_adv_qn.shape
    if prefix_end.shape != (q_count, n) or loss_mask.shape[:2] != (q_count, n) or loss_mask.ndim != 3:
        raise ValueError(f"prefix_end_qn {prefix_end.shape} / loss_mask_qnt {loss_mask.shape} do not match "
                         f"[Q, N] = [{q_count}, {n}]")
    t = loss_mask.shape[-1]
    positions = np.arange(t)
    in_prefix = positions[None, None, :] < prefix_end[..., None]
    trained = loss_mask != 0
    stream = np.where(in_prefix, advantages.prefix_stream_qn[..., None], advantages.cont_stream_qn[..., None])
    stream = np.where(trained, stream, STREAM_NONE).astype(np.int8)
    adv = np.where(in_prefix, advantages.prefix_adv_qn[..., None], advantages.cont_adv_qn[..., None])
    mask = (stream != STREAM_NONE)
    adv = np.where(mask, adv, 0.0).astype(np.float32)

    s_count = len(advantages.selections)
    k = advantages.resample_adv_sk.shape[1]
    if s_count:
        if resample_loss_mask_skt is None:
            raise ValueError("resample_loss_mask_skt is required when there are selections")
        rmask = np.asarray(resample_loss_mask_skt)
        if rmask.ndim != 3 or rmask.shape[:2] != (s_count, k):
            raise ValueError(f"resample_loss_mask_skt has shape {rmask.shape}, expected ({s_count}, {k}, T')")
        if resample_prefix_end_sk is None:
            if resample_from == "scratch":
                rend = np.zeros((s_count, k), np.int64)
            else:
                src = np.array([prefix_end[sel.question, sel.rollout] for sel in advantages.selections])
                rend = np.repeat(src[:, None], k, axis=1)
        else:
            rend = np.asarray(resample_prefix_end_sk, dtype=np.int64).reshape(s_count, k)
        rpos = np.arange(rmask.shape[-1])
        in_cont = rpos[None, None, :] >= rend[..., None]
        rtrained = (rmask != 0) & in_cont
        rstream = np.where(rtrained, advantages.resample_stream_sk[..., None], STREAM_NONE).astype(np.int8)
        rmask_out = rstream != STREAM_NONE
        radv = np.where(rmask_out, advantages.resample_adv_sk[..., None], 0.0).astype(np.float32)
    else:
        shape = (0, k, t) if resample_loss_mask_skt is None else np.shape(resample_loss_mask_skt)
        rstream = np.zeros(shape, np.int8)
        rmask_out = np.zeros(shape, bool)
        radv = np.zeros(shape, np.float32)
    return TokenAdvantages(advantages_qnt=adv, mask_qnt=mask.astype(np.float32), stream_qnt=stream,
                           resample_advantages_skt=radv, resample_mask_skt=rmask_out.astype(np.float32),
                           resample_stream_skt=rstream)


# ----------------------------------------------------------------------------------------------------------------
# Equal-budget baselines (§5 "GRPO with 2× rollouts")


def grpo_equal_budget_group_size(n: int, config: AXPOConfig = AXPOConfig()) -> int:
    """The group size N' at which plain GRPO samples as many responses per step as AXPO at full budget:
    N' = N + (max extra continuations per step) / B, i.e. N·(1 + r) with budget_unit="continuations" and
    N·(1 + r·K) with budget_unit="prefixes" (= 2N at the paper's r = .25, K = 4: "GRPO with 2× rollouts").
    An upper bound on AXPO's cost: it uses at most its budget, and its continuations are shorter than whole
    responses (they start after the prefix). Rounded to the nearest integer (half up)."""
    factor = 1 + config.ratio * (config.k if config.budget_unit == "prefixes" else 1)
    return int(math.floor(n * factor + 0.5))


def group_size_for_equal_tokens(n: int, original_tokens: float, resample_tokens: float) -> int:
    """Measured equal-sampled-tokens baseline: N' = round(N · (1 + resample_tokens / original_tokens)), where
    original_tokens is the number of policy-generated tokens of the N-rollout groups and resample_tokens that of
    AXPO's continuations (prefix copies excluded: they are not sampled), summed over the same steps of an AXPO run.
    """
    if original_tokens <= 0:
        raise ValueError("original_tokens must be > 0")
    return int(math.floor(n * (1 + resample_tokens / original_tokens) + 0.5))


def prepare_rewards(rewards_qn, truncated_qn=None, config: AXPOConfig = AXPOConfig()):
    """Convenience: grpo.apply_truncation with the config's mode → (rewards, include_qn)."""
    r = np.asarray(rewards_qn, dtype=np.float64)
    if truncated_qn is None:
        return r, np.ones(r.shape, bool)
    return apply_truncation(r, truncated_qn, config.truncation)
