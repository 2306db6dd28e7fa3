"""AXPO selection and two-stream advantages (axpo_jax/algo/axpo.py) against docs/AXPO.md §4, and the registry."""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from axpo_jax.algo import axpo as A
from axpo_jax.algo import grpo as G
from axpo_jax.algo import registry

NAN = float("nan")
S3 = math.sqrt(3)          # [1,0,0,0]-style groups: std .4330 = √3/4, so ±.75/.433 = ±√3 and ±.25/.433 = ±1/√3

# The worked example used by several tests (Q = 2 questions, N = 4 rollouts):
#   q0: rewards [0, 0, 1, 1], tool [T, T, F, F], confidence [.9, .5, -, -]
#       tool subgroup {0, 1} all wrong (the no-tool rollouts are right) → triggered; candidates {0, 1}; best 1 (.5)
#   q1: rewards [0, 0, 0, 0], tool [T, F, T, F], confidence [.3, -, .2, -]
#       tool subgroup {0, 2} all wrong → triggered; candidates {0, 2}; best 2 (.2)
REWARDS = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], float)
USED = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
CONF = np.array([[0.9, 0.5, NAN, NAN], [0.3, NAN, 0.2, NAN]])
# r = 1: budget floor(1·2·4) = 8 continuations = 2 prefixes at K = 4; round 0 orders q1 (.2) before q0 (.5)
CFG = A.AXPOConfig(ratio=1.0)
SELS = [A.Selection(1, 2, 0, 0, 0.2), A.Selection(0, 1, 1, 0, 0.5)]
# s0 = (q1, rollout 2): continuations [1, 0, 0, 0] → r_prefix 1
# s1 = (q0, rollout 1): continuations [0, 1, 1, 0] → r_prefix 1
RESAMPLE = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], float)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# trigger, candidates, budget, selection


def test_trigger_and_candidates_hand_cases():
    rewards = np.array([
        [1, 1, 0, 0],    # no tool use at all                              → no trigger
        [1, 0, 0, 0],    # tool subgroup {0, 1} has a correct rollout (0)   → no trigger
        [0, 0, 1, 0],    # tool subgroup {0, 1} all wrong, no-tool 2 right  → trigger, candidates {0, 1}
        [0, 0, 0, 0],    # everyone uses tools, all wrong                   → trigger, all four
    ], float)
    used = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    trig, cand = A.trigger_and_candidates(rewards, used)
    np.testing.assert_array_equal(trig, [False, False, True, True])
    np.testing.assert_array_equal(cand, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    # ablation "no_tool": subgroups swap. q0 no-tool {0..3} has correct → no; q1 no-tool {2, 3} all wrong → yes;
    # q2 no-tool {2, 3} has 2 correct → no; q3 has no no-tool rollout → no
    trig, cand = A.trigger_and_candidates(rewards, used, A.AXPOConfig(candidates="no_tool"))
    np.testing.assert_array_equal(trig, [False, True, False, False])
    np.testing.assert_array_equal(cand, [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    # excluded rollouts are invisible: q1 without its correct tool rollout 0 → tool subgroup {1} all wrong
    inc = np.ones((4, 4), bool)
    inc[1, 0] = False
    trig, cand = A.trigger_and_candidates(rewards, used, include_qn=inc)
    np.testing.assert_array_equal(trig, [False, True, True, True])
    np.testing.assert_array_equal(cand[1], [0, 1, 0, 0])


def test_budget_floor_and_units():
    # paper: r = .25, N = 8, B = Q = 4 → r·B·N = 8 continuations → 2 prefixes at K = 4
    assert A.resample_budget(4, 8, A.AXPOConfig()) == (8, 2)
    # r·B·N = .25·3·8 = 6 → floor(6/4) = 1 prefix, 4 continuations (never more than 6)
    assert A.resample_budget(3, 8, A.AXPOConfig()) == (4, 1)
    # 0.29·10·10 = 28.999999999999996 in floats: the 1e-9 slack keeps it 29 → 7 prefixes (28 continuations)
    assert A.resample_budget(10, 10, A.AXPOConfig(ratio=0.29)) == (28, 7)
    # budget_unit="prefixes": r·B·N = 8 prefixes, 32 continuations
    assert A.resample_budget(4, 8, A.AXPOConfig(budget_unit="prefixes")) == (32, 8)
    assert A.resample_budget(4, 8, A.AXPOConfig(ratio=0.0)) == (0, 0)


def test_select_worked_example():
    assert A.select_resamples(REWARDS, USED, CONF, CFG) == SELS
    # default r = .25: floor(.25·2·4) = 2 continuations < K → nothing
    assert A.select_resamples(REWARDS, USED, CONF) == []


def test_select_breadth_first_and_lowest_confidence_first():
    # q0 candidates conf .1, .2, .3; q1 .5, .6; q2 .05; q3 untriggered (its tool rollout is right)
    rewards = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]], float)
    used = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    conf = np.array([[0.3, 0.1, 0.2, NAN], [0.6, 0.5, NAN, NAN], [0.05, NAN, NAN, NAN], [0.01, NAN, NAN, NAN]])
    # r = 1.5, K = 4, Q = N = 4: floor(1.5·16) = 24 continuations → 6 prefixes ≥ all 6 candidates
    sel = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.5))
    got = [(s.question, s.rollout, s.round) for s in sel]
    # round 0 by score: q2 (.05), q0 (.1), q1 (.5); round 1: q0 (.2), q1 (.6); round 2: q0 (.3)
    assert got == [(2, 0, 0), (0, 1, 0), (1, 1, 0), (0, 2, 1), (1, 0, 1), (0, 0, 2)]
    assert [s.rank for s in sel] == list(range(6))
    # r = 1: 16 continuations → 4 prefixes: round 0 complete before anyone's second pick
    sel = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.0))
    assert [(s.question, s.rollout) for s in sel] == [(2, 0), (0, 1), (1, 1), (0, 2)]
    # r = .5: 8 continuations → 2 prefixes: budget ends mid-round; least confident first
    sel = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=0.5))
    assert [(s.question, s.rollout) for s in sel] == [(2, 0), (0, 1)]


def test_select_skips_rollouts_without_a_prefix_to_branch_from():
    # the same step as above; q2's only candidate and q0's least confident one have no <tool_call> token to
    # branch at (the policy spelled the tag in pieces): they still make their groups trigger, but are not picked
    rewards = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]], float)
    used = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    conf = np.array([[0.3, 0.1, 0.2, NAN], [0.6, 0.5, NAN, NAN], [0.05, NAN, NAN, NAN], [0.01, NAN, NAN, NAN]])
    branchable = np.ones((4, 4), bool)
    branchable[2, 0] = branchable[0, 1] = False
    sel = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.5), branchable_qn=branchable)
    assert [(s.question, s.rollout, s.round) for s in sel] == [(0, 2, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1)]
    triggered, _ = A.trigger_and_candidates(rewards, used)
    assert triggered.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="branchable_qn"):
        A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.5), branchable_qn=branchable[:2])


def test_select_ties_and_nan_confidence_are_deterministic():
    rewards = np.zeros((3, 3))
    used = np.ones((3, 3), bool)
    conf = np.array([[0.5, 0.5, NAN], [0.5, NAN, 0.5], [NAN, NAN, NAN]])
    sel = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=3.0, k=1))   # budget 27 ≥ 9 candidates
    # round 0: q0 r0 (.5), q1 r0 (.5) tie → question order; q2 r0 (NaN → last). Round 1: q0 r1, q1 r2, q2 r1.
    # Round 2: q0 r2 (NaN), q1 r1 (NaN), q2 r2.
    assert [(s.question, s.rollout) for s in sel] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 2), (2, 1),
                                                      (0, 2), (1, 1), (2, 2)]


def test_select_random_ranking_is_seeded():
    rewards = np.zeros((6, 8))
    used = np.ones((6, 8), bool)
    conf = np.tile(np.linspace(0.1, 0.9, 8), (6, 1))
    cfg = A.AXPOConfig(ranking="random", ratio=0.5)           # 24 continuations → 6 prefixes
    a = A.select_resamples(rewards, used, conf, cfg, seed=1)
    assert a == A.select_resamples(rewards, used, conf, cfg, seed=1)
    assert a != A.select_resamples(rewards, used, conf, cfg, seed=2)
    assert sorted(s.question for s in a) == list(range(6))     # breadth-first still: one per question
    by_conf = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=0.5))
    assert [s.rollout for s in by_conf] == [0] * 6              # confidence ranking: the .1 rollout everywhere


def test_selection_skips_excluded_and_config_validation():
    rewards = np.zeros((1, 4))
    used = np.ones((1, 4), bool)
    conf = np.array([[0.1, 0.2, 0.3, 0.4]])
    inc = np.array([[False, True, True, True]])
    sel = A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.0), include_qn=inc)
    assert [s.rollout for s in sel] == [1]
    with pytest.raises(ValueError):
        A.AXPOConfig(ranking="entropy")
    with pytest.raises(ValueError):
        A.AXPOConfig(k=0)
    with pytest.raises(ValueError):
        A.select_resamples(rewards, used[:, :3], conf)
    with pytest.raises(ValueError, match="correct_threshold must be a finite number"):
        A.AXPOConfig(correct_threshold=float("nan"))


def test_correct_threshold_decides_which_graded_rewards_count_as_failures():
    """With graded rewards (a caller's own: every `reward_kind` of the trainer is 0/1), "every tool rollout failed"
    depends on the threshold: partial credit 0.6 is a failure at the default (1.0), a success at 0.5, so that group
    is no longer a trigger."""
    rewards = np.array([[0.6, 0.0, 0.0, 0.0]])
    used = np.array([[True, True, False, False]])
    conf = np.array([[0.3, 0.1, 0.2, 0.4]])
    assert [s.rollout for s in A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.0, k=1))] == [1, 0]
    assert A.select_resamples(rewards, used, conf, A.AXPOConfig(ratio=1.0, k=1, correct_threshold=0.5)) == []


# ---------------------------------------------------------------------------------------------------------------
# advantages: hand-computed


def test_advantages_worked_example_default():
    adv = A.axpo_advantages(REWARDS, SELS, RESAMPLE, CFG)
    # plain GRPO: q0 [0,0,1,1] → mean .5 std .5 → [-1,-1,1,1]; q1 all equal → 0
    close(adv.grpo_adv_qn, [[-1, -1, 1, 1], [0, 0, 0, 0]])
    close(adv.r_prefix_s, [1, 1])
    # continuation stream: s0 [1,0,0,0] → [√3, -1/√3, -1/√3, -1/√3]; s1 [0,1,1,0] → mean .5 std .5 → [-1,1,1,-1]
    close(adv.resample_adv_sk, [[S3, -1 / S3, -1 / S3, -1 / S3], [-1, 1, 1, -1]])
    # prefix stream: q0 with source 1 → r_prefix 1: [0,1,1,1] → mean .75 std .433 → source .25/.433 = 1/√3
    #                q1 with source 2 → r_prefix 1: [0,0,1,0] → mean .25 std .433 → source .75/.433 = √3
    # everyone else keeps plain GRPO; the sources' continuations are masked (0)
    close(adv.prefix_adv_qn, [[-1, 1 / S3, 1, 1], [0, 0, S3, 0]])
    close(adv.cont_adv_qn, [[-1, 0, 1, 1], [0, 0, 0, 0]])
    P, C, GR, NO = A.STREAM_PREFIX, A.STREAM_CONTINUATION, A.STREAM_GRPO, A.STREAM_NONE
    np.testing.assert_array_equal(adv.prefix_stream_qn, [[GR, P, GR, GR], [GR, GR, P, GR]])
    np.testing.assert_array_equal(adv.cont_stream_qn, [[GR, NO, GR, GR], [GR, GR, NO, GR]])
    np.testing.assert_array_equal(adv.resample_stream_sk, np.full((2, 4), C))
    np.testing.assert_array_equal(adv.cont_weight_qn, [[1, 0, 1, 1], [1, 1, 0, 1]])
    np.testing.assert_array_equal(adv.prefix_weight_qn, np.ones((2, 4)))
    m = adv.metrics()
    assert m["axpo/num_selected"] == 2 and m["axpo/resample_reward_mean"] == pytest.approx(3 / 8)


def test_advantages_failed_resamples_give_negative_prefix_and_zero_continuations():
    # s1's continuations all wrong → K-group all equal → Â = 0; r_prefix 0 → q0 group unchanged → source keeps -1
    adv = A.axpo_advantages(REWARDS, SELS, np.array([[1, 0, 0, 0], [0, 0, 0, 0]], float), CFG)
    close(adv.resample_adv_sk[1], [0, 0, 0, 0])
    assert adv.r_prefix_s[1] == 0
    assert adv.prefix_adv_qn[0, 1] == pytest.approx(-1.0, rel=1e-5) and adv.cont_adv_qn[0, 1] == 0
    # all four continuations right → also all equal → 0, r_prefix 1
    adv = A.axpo_advantages(REWARDS, SELS, np.array([[1, 1, 1, 1], [1, 1, 1, 1]], float), CFG)
    close(adv.resample_adv_sk, np.zeros((2, 4)))
    close(adv.r_prefix_s, [1, 1])


def test_advantages_renormalize_whole_group():
    adv = A.axpo_advantages(REWARDS, SELS, RESAMPLE, dataclasses.replace(CFG, renormalize_whole_group=True))
    # q0 renormalized [0,1,1,1]: mean .75, std .433 → 0 → -.75/.433 = -√3; 1 → 1/√3
    # q1 renormalized [0,0,1,0]: 0 → -.25/.433 = -1/√3; 1 → √3
    close(adv.prefix_adv_qn, [[-S3, 1 / S3, 1 / S3, 1 / S3], [-1 / S3, -1 / S3, S3, -1 / S3]])
    close(adv.cont_adv_qn, [[-S3, 0, 1 / S3, 1 / S3], [-1 / S3, -1 / S3, 0, -1 / S3]])


def test_advantages_no_prefix_credit_and_scratch():
    # "no_tool": its sources have no tool call to fork at, so their resamples are fresh responses too
    for cfg in (dataclasses.replace(CFG, prefix_credit=False), dataclasses.replace(CFG, resample_from="scratch"),
                dataclasses.replace(CFG, candidates="no_tool")):
        assert cfg.resamples_from_scratch == (cfg.prefix_credit is True)
        adv = A.axpo_advantages(REWARDS, SELS, RESAMPLE, cfg)
        # sources trained like everyone else: plain GRPO on the whole response, nothing masked
        close(adv.prefix_adv_qn, adv.grpo_adv_qn)
        close(adv.cont_adv_qn, adv.grpo_adv_qn)
        assert (adv.prefix_stream_qn == A.STREAM_GRPO).all() and (adv.cont_stream_qn == A.STREAM_GRPO).all()
        close(adv.resample_adv_sk, [[S3, -1 / S3, -1 / S3, -1 / S3], [-1, 1, 1, -1]])   # continuation stream kept
        assert not adv.uses_prefix_credit


def test_advantages_merge_into_source_group():
    adv = A.axpo_advantages(REWARDS, SELS, RESAMPLE, dataclasses.replace(CFG, merge_into_source_group=True))
    # q0 merged: originals with source 1 → r_prefix 1: [0,1,1,1] + resamples [0,1,1,0] = [0,1,1,1,0,1,1,0]
    #   mean 5/8 = .625; var (5·.375² + 3·.625²)/8 = .234375; std .48412
    #   ones → .375/.48412 = .77460; zeros → -.625/.48412 = -1.29099
    hi, lo = 0.375 / math.sqrt(0.234375), -0.625 / math.sqrt(0.234375)
    # q1 merged: [0,0,1,0] + [1,0,0,0]: two ones of 8 → mean .25, std .433 → ones √3, zeros -1/√3
    close(adv.resample_adv_sk, [[S3, -1 / S3, -1 / S3, -1 / S3], [lo, hi, hi, lo]])
    close(adv.prefix_adv_qn, [[-1, hi, 1, 1], [0, 0, S3, 0]])       # unselected originals keep plain GRPO
    close(adv.cont_adv_qn, [[-1, 0, 1, 1], [0, 0, 0, 0]])


def test_advantages_two_sources_in_one_question():
    rewards = np.zeros((1, 4))
    sels = [A.Selection(0, 0, 0), A.Selection(0, 3, 1, round=1)]
    rr = np.array([[0, 0, 1, 0], [0, 0, 0, 0]], float)
    adv = A.axpo_advantages(rewards, sels, rr, A.AXPOConfig(ratio=1.0))
    # r_prefix = [1, 0] replace both at once: [1, 0, 0, 0] → source 0: √3, source 3: -1/√3; others keep 0
    close(adv.prefix_adv_qn, [[S3, 0, 0, -1 / S3]])
    close(adv.cont_adv_qn, [[0, 0, 0, 0]])
    np.testing.assert_array_equal(adv.cont_stream_qn, [[A.STREAM_NONE, A.STREAM_GRPO, A.STREAM_GRPO, A.STREAM_NONE]])


def test_advantages_exclusions():
    # truncation "exclude": resample (s1, k3) excluded → K-group [0, 1, 1] → mean 2/3, std .4714
    #   → [-1.4142, .7071, .7071, 0]; original (q0, 3) excluded → q0 stats over [0, 0, 1] and after r_prefix [0,1,1]
    inc = np.ones((2, 4), bool)
    inc[0, 3] = False
    rinc = np.ones((2, 4), bool)
    rinc[1, 3] = False
    adv = A.axpo_advantages(REWARDS, SELS, RESAMPLE, CFG, include_qn=inc, resample_include_sk=rinc)
    close(adv.resample_adv_sk[1], [-math.sqrt(2), 1 / math.sqrt(2), 1 / math.sqrt(2), 0])
    assert adv.resample_stream_sk[1, 3] == A.STREAM_NONE
    # q0 plain over [0, 0, 1]: mean 1/3, std .4714 → [-.7071, -.7071, 1.4142, 0(excluded)]
    close(adv.grpo_adv_qn[0], [-1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2), 0])
    # source 1 → 1 in [0, 1, 1]: mean 2/3 → (1/3)/.4714 = .7071
    close(adv.prefix_adv_qn[0], [-1 / math.sqrt(2), 1 / math.sqrt(2), math.sqrt(2), 0])
    assert adv.prefix_stream_qn[0, 3] == A.STREAM_NONE and adv.cont_stream_qn[0, 3] == A.STREAM_NONE
    with pytest.raises(ValueError):                       # selecting an excluded rollout is a caller bug
        A.axpo_advantages(REWARDS, [A.Selection(0, 3, 0)], RESAMPLE[:1], CFG, include_qn=inc)


def test_advantages_input_validation():
    with pytest.raises(ValueError):
        A.axpo_advantages(REWARDS, SELS, RESAMPLE[:, :3], CFG)                     # K mismatch
    with pytest.raises(ValueError):
        A.axpo_advantages(REWARDS, SELS + [A.Selection(1, 2, 2)], np.zeros((3, 4)), CFG)   # duplicate
    with pytest.raises(ValueError):
        A.axpo_advantages(REWARDS, [A.Selection(5, 0, 0)], np.zeros((1, 4)), CFG)   # out of range
    adv = A.axpo_advantages(REWARDS, [], np.zeros((0, 4)), CFG)
    close(adv.prefix_adv_qn, adv.grpo_adv_qn)


# ---------------------------------------------------------------------------------------------------------------
# per-token mapping: hand-computed


def test_token_mapping_worked_example():
    adv = A.axpo_advantages(REWARDS, SELS, RESAMPLE, CFG)
    t = 6
    prefix_end = np.array([[2, 3, 0, 0], [1, 0, 2, 0]])       # after the first <tool_call> token (no-tool: 0)
    loss_mask = np.ones((2, 4, t))
    loss_mask[0, 1, 4] = 0                                      # an observation token in the source's continuation
    rmask = np.ones((2, 4, t))
    rmask[0, 0, 5] = 0
    tok = A.axpo_token_advantages(adv, prefix_end_qn=prefix_end, loss_mask_qnt=loss_mask,
                                  resample_loss_mask_skt=rmask)
    # source (q0, 1): prefix tokens 0..2 get 1/√3; continuation 3..5 untrained
    close(tok.advantages_qnt[0, 1], [1 / S3] * 3 + [0, 0, 0])
    np.testing.assert_array_equal(tok.mask_qnt[0, 1], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tok.stream_qnt[0, 1], [A.STREAM_PREFIX] * 3 + [A.STREAM_NONE] * 3)
    # unselected (q0, 0): plain GRPO -1 on all tokens regardless of its prefix_end
    close(tok.advantages_qnt[0, 0], [-1] * t)
    # resamples of s0 (source q1 r2, prefix_end 2): tokens 0, 1 are the prefix copy → untrained
    np.testing.assert_array_equal(tok.resample_mask_skt[0, 0], [0, 0, 1, 1, 1, 0])
    close(tok.resample_advantages_skt[0, 0], [0, 0, S3, S3, S3, 0])
    # resamples of s1 (source q0 r1, prefix_end 3)
    np.testing.assert_array_equal(tok.resample_mask_skt[1, 2], [0, 0, 0, 1, 1, 1])
    adv_rows, mask_rows, stream_rows = tok.rows()
    assert adv_rows.shape == (2 * 4 + 2 * 4, t)
    np.testing.assert_array_equal(mask_rows[:8], tok.mask_qnt.reshape(8, t))
    # scratch: resamples are whole fresh responses → every token of theirs is continuation
    tok = A.axpo_token_advantages(adv, prefix_end_qn=prefix_end, loss_mask_qnt=loss_mask,
                                  resample_loss_mask_skt=rmask, resample_from="scratch")
    np.testing.assert_array_equal(tok.resample_mask_skt[0, 1], np.ones(t))


def test_confidence_and_prefix_end_helpers():
    logprobs = np.log(np.array([[0.5, 0.9, 0.1, 0.3], [0.2, 0.2, 0.2, 0.2]]))
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 0]], bool)
    close(A.tool_call_confidence(logprobs, mask)[0], (0.9 + 0.1) / 2)     # arithmetic mean of probabilities
    assert np.isnan(A.tool_call_confidence(logprobs, mask)[1])
    ids = np.array([[5, 7, 99, 3, 99], [1, 2, 3, 4, 5], [99, 0, 0, 0, 0]])
    np.testing.assert_array_equal(A.prefix_end_after_first(ids, 99), [3, 0, 1])


def test_equal_budget_group_sizes():
    assert A.grpo_equal_budget_group_size(8) == 10                                              # 8·(1 + .25)
    assert A.grpo_equal_budget_group_size(8, A.AXPOConfig(budget_unit="prefixes")) == 16        # 8·(1 + .25·4) = 2N
    assert A.group_size_for_equal_tokens(8, original_tokens=1000, resample_tokens=300) == 10    # 8·1.3 = 10.4
    with pytest.raises(ValueError):
        A.group_size_for_equal_tokens(8, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# a loop-by-loop reference of §4.6 and random properties


def _ref_norm(value, members, cfg):
    if not members or max(members) == min(members):
        return 0.0
    mean = sum(members) / len(members)
    var = sum((m - mean) ** 2 for m in members) / (len(members) - cfg.ddof)
    return (value - mean) / (math.sqrt(var) + cfg.eps) if cfg.std_normalize else value - mean


def reference_advantages(rewards, sels, rr, cfg, inc, rinc):
    """§4.6 restated with Python loops: returns (prefix_adv, cont_adv, cont_trained, resample_adv) as lists."""
    q_count, n = len(rewards), len(rewards[0])
    k = cfg.k
    credit = cfg.prefix_credit and cfg.resample_from == "first_tool_call" and cfg.candidates == "failed_tool"
    r_prefix = [1.0 if any(rinc[s][j] and rr[s][j] >= 1 for j in range(k)) else 0.0 for s in range(len(sels))]
    prefix = [[0.0] * n for _ in range(q_count)]
    cont = [[0.0] * n for _ in range(q_count)]
    cont_trained = [[bool(inc[q][i]) for i in range(n)] for q in range(q_count)]
    res = [[0.0] * k for _ in sels]
    for q in range(q_count):
        plain = [rewards[q][i] for i in range(n) if inc[q][i]]
        for i in range(n):
            if inc[q][i]:
                prefix[q][i] = cont[q][i] = _ref_norm(rewards[q][i], plain, cfg)
    for s in range(len(sels)):
        members = [rr[s][j] for j in range(k) if rinc[s][j]]
        for j in range(k):
            if rinc[s][j]:
                res[s][j] = _ref_norm(rr[s][j], members, cfg)
    for q in range(q_count):
        mine = [s for s, sel in enumerate(sels) if sel.question == q]
        if not mine:
            continue
        replaced = {sels[s].rollout: r_prefix[s] for s in mine} if credit else {}
        group = [replaced.get(i, rewards[q][i]) for i in range(n) if inc[q][i]]
        if cfg.merge_into_source_group:
            group += [rr[s][j] for s in mine for j in range(k) if rinc[s][j]]
            for s in mine:
                for j in range(k):
                    if rinc[s][j]:
                        res[s][j] = _ref_norm(rr[s][j], group, cfg)
        if cfg.renormalize_whole_group:
            for i in range(n):
                if inc[q][i]:
                    prefix[q][i] = cont[q][i] = _ref_norm(replaced.get(i, rewards[q][i]), group, cfg)
        for s in mine:
            i = sels[s].rollout
            if credit:
                prefix[q][i] = _ref_norm(r_prefix[s], group, cfg)
                cont[q][i] = 0.0
                cont_trained[q][i] = False
    return prefix, cont, cont_trained, res


SWITCHES = dict(ranking=["confidence", "random"], resample_from=["first_tool_call", "scratch"],
                candidates=["failed_tool", "no_tool"], prefix_credit=[True, False],
                merge_into_source_group=[False, True], renormalize_whole_group=[False, True],
                budget_unit=["continuations", "prefixes"])


def random_step(rng, cfg):
    q_count, n = int(rng.integers(1, 7)), int(rng.integers(1, 9))
    rewards = (rng.random((q_count, n)) < rng.choice([0.1, 0.3, 0.6])).astype(float)
    used = rng.random((q_count, n)) < rng.choice([0.3, 0.7, 1.0])
    conf = np.where(used, rng.choice([0.2, 0.5, 0.9], (q_count, n)), NAN)   # coarse values → ties happen
    conf[rng.random((q_count, n)) < 0.05] = NAN
    inc = rng.random((q_count, n)) > (0.15 if cfg.truncation == "exclude" else 0.0)
    return rewards, used, conf, inc


def candidate_order(q, cand, scores):
    return sorted(np.flatnonzero(cand[q]).tolist(), key=lambda i: (scores[q, i], i))


def check_breadth_first(sels, cand, scores, max_prefixes):
    counts = {}
    for rank, s in enumerate(sels):
        assert s.rank == rank
        assert cand[s.question, s.rollout], "a selection must be a candidate"
        assert s.round == counts.get(s.question, 0), "round = picks its question already had"
        counts[s.question] = counts.get(s.question, 0) + 1
    keys = [(s.round, s.score, s.question, s.rollout) for s in sels]
    assert keys == sorted(keys), "rounds in order; within a round, lowest score first, ties by index"
    for q in range(cand.shape[0]):
        picked = [s.rollout for s in sels if s.question == q]
        assert picked == candidate_order(q, cand, scores)[:len(picked)], "best-ranked candidates first"
    assert len(sels) <= max_prefixes
    if len(sels) < max_prefixes:
        assert len(sels) == cand.sum(), "budget left → every candidate selected"
    elif sels:
        last_round = sels[-1].round
        for q in range(cand.shape[0]):                    # every earlier round was complete
            assert counts.get(q, 0) >= min(cand[q].sum(), last_round)


@pytest.mark.parametrize("truncation", ["keep", "exclude"])
def test_random_steps_match_reference_and_properties(truncation):
    rng = np.random.default_rng(0 if truncation == "keep" else 1)
    combos = list(itertools.product(*SWITCHES.values()))
    for trial in range(300):
        values = combos[trial % len(combos)]
        cfg = A.AXPOConfig(ratio=float(rng.choice([0.1, 0.25, 0.5, 1.0, 2.0])), k=int(rng.integers(1, 5)),
                           truncation=truncation, ddof=int(rng.choice([0, 1])),
                           **dict(zip(SWITCHES, values)))
        rewards, used, conf, inc = random_step(rng, cfg)
        q_count, n = rewards.shape
        seed = int(rng.integers(1 << 30))
        sels = A.select_resamples(rewards, used, conf, cfg, seed=seed, include_qn=inc)

        # selection: budget, breadth-first, ranking
        trig, cand = A.trigger_and_candidates(rewards, used, cfg, include_qn=inc)
        max_cont, max_prefixes = A.resample_budget(q_count, n, cfg)
        units = math.floor(cfg.ratio * q_count * n + 1e-9)
        assert len(sels) * cfg.k == max_cont or len(sels) < max_prefixes
        assert len(sels) * cfg.k <= (units if cfg.budget_unit == "continuations" else units * cfg.k)
        if cfg.ranking == "confidence":
            scores = np.where(np.isnan(conf), np.inf, conf)
        else:
            scores = np.random.default_rng(seed).random(rewards.shape)
        check_breadth_first(sels, cand, scores, max_prefixes)

        # advantages vs the reference
        rr = (rng.random((len(sels), cfg.k)) < 0.4).astype(float)
        rinc = rng.random(rr.shape) > (0.2 if truncation == "exclude" else 0.0)
        adv = A.axpo_advantages(rewards, sels, rr, cfg, used_tool_qn=used, include_qn=inc, resample_include_sk=rinc)
        prefix, cont, cont_trained, res = reference_advantages(rewards.tolist(), sels, rr.tolist(), cfg,
                                                               inc.tolist(), rinc.tolist())
        close(adv.prefix_adv_qn, prefix)
        close(adv.cont_adv_qn, cont)
        np.testing.assert_array_equal(adv.cont_stream_qn != A.STREAM_NONE, cont_trained)
        if sels:
            close(adv.resample_adv_sk, res)
        np.testing.assert_array_equal(adv.triggered_q, trig)

        # questions without a selection (untriggered, or the budget ran out) are exactly plain GRPO
        plain = G.group_advantages(rewards, include_gn=inc, ddof=cfg.ddof)
        touched = {s.question for s in sels}
        for q in range(q_count):
            if q not in touched:
                close(adv.prefix_adv_qn[q], plain[q])
                close(adv.cont_adv_qn[q], plain[q])
        if not cfg.renormalize_whole_group:           # unselected rollouts keep plain GRPO everywhere
            sources = {(s.question, s.rollout) for s in sels}
            for q, i in zip(*np.nonzero(inc)):
                if (q, i) not in sources:
                    assert adv.prefix_adv_qn[q, i] == pytest.approx(plain[q, i], abs=1e-9)

        # tokens: each trained token in exactly one stream, none outside the loss mask
        t = int(rng.integers(1, 10))
        prefix_end = rng.integers(0, t + 1, (q_count, n))
        loss_mask = (rng.random((q_count, n, t)) < 0.8).astype(np.float32)
        rmask = (rng.random((len(sels), cfg.k, t)) < 0.8).astype(np.float32)
        tok = A.axpo_token_advantages(adv, prefix_end_qn=prefix_end, loss_mask_qnt=loss_mask,
                                      resample_loss_mask_skt=rmask,
                                      resample_from="scratch" if cfg.resamples_from_scratch else None)
        streams = tok.stream_masks()
        for part, mask, lm in ((0, tok.mask_qnt, loss_mask), (1, tok.resample_mask_skt, rmask)):
            total = sum(m[part].astype(int) for m in streams.values())
            assert total.max(initial=0) <= 1
            np.testing.assert_array_equal(total, mask)
            assert (mask <= (lm != 0)).all()
        adv_rows, mask_rows, _ = tok.rows()
        assert (adv_rows[mask_rows == 0] == 0).all()
        for s, sel in enumerate(sels):
            end = 0 if cfg.resamples_from_scratch else prefix_end[sel.question, sel.rollout]
            assert (tok.resample_mask_skt[s, :, :end] == 0).all(), "the prefix copy is never trained"
            if adv.uses_prefix_credit:
                assert (tok.mask_qnt[sel.question, sel.rollout, end:] == 0).all(), "source continuation masked"
                assert (tok.stream_qnt[sel.question, sel.rollout, :end][loss_mask[sel.question, sel.rollout, :end]
                                                                        != 0] == A.STREAM_PREFIX).all()


# ---------------------------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_configs():
    assert registry.available() == ["axpo", "grpo"]
    est = registry.make("axpo", ratio=1.0)
    assert est.name == "axpo" and est.k == 4 and est.config == CFG
    assert est.select(REWARDS, USED, CONF) == SELS
    adv = est.advantages(REWARDS, SELS, RESAMPLE)
    close(adv.prefix_adv_qn, A.axpo_advantages(REWARDS, SELS, RESAMPLE, CFG).prefix_adv_qn)
    est = registry.make("axpo", {"ratio": 1.0, "ranking": "random"}, k=2)
    assert est.config == A.AXPOConfig(ratio=1.0, ranking="random", k=2)
    assert registry.make("axpo", CFG, prefix_credit=False).config.prefix_credit is False

    grpo = registry.make("grpo", ddof=1)
    assert grpo.k == 0 and grpo.select(REWARDS, USED, CONF) == []
    adv = grpo.advantages(REWARDS, [], None)
    close(adv.prefix_adv_qn, G.group_advantages(REWARDS, ddof=1))
    assert (adv.prefix_stream_qn == A.STREAM_GRPO).all()
    with pytest.raises(ValueError):
        grpo.advantages(REWARDS, SELS, RESAMPLE)
    with pytest.raises(ValueError):
        registry.make("ppo")
    with pytest.raises(ValueError):
        registry.make("axpo", ratios=0.5)
    with pytest.raises(ValueError):
        registry.register("grpo", registry.GRPOEstimator, G.GRPOConfig)
