"""GRPO advantages and the clipped policy loss (axpo_jax/algo/grpo.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axpo_jax.algo import grpo as G

PAD = (6, 12)


@functools.cache
def _jitted_loss(aggregation: str, kl_kind: str):
    return jax.jit(functools.partial(G.policy_loss, aggregation=aggregation, kl_kind=kl_kind))


def loss_and_metrics(logp_new, logp_old, adv, mask, *, logp_ref=None, kl_coef=0.0, aggregation="token-mean",
                     kl_kind="low_var_kl", eps_low=0.2, eps_high=0.4):
    """G.policy_loss through one jitted function of one padded shape per (aggregation, kl_kind), so the tests pay
    a handful of compiles instead of one per call. Padding is masked, so it changes no value."""
    def pad(x):
        x = np.asarray(x, np.float32)
        out = np.zeros(PAD, np.float32)
        out[:x.shape[0], :x.shape[1]] = x
        return out

    logp_ref = logp_new if logp_ref is None else logp_ref
    return _jitted_loss(aggregation, kl_kind)(pad(logp_new), pad(logp_old), pad(adv), pad(mask),
                                              logp_ref_bt=pad(logp_ref), kl_coef=kl_coef, eps_low=eps_low,
                                              eps_high=eps_high)


# ---------------------------------------------------------------------------------------------------------------
# group advantages


def test_group_advantages_hand_computed():
    # [1, 0, 0, 0]: mean .25; centered [.75, -.25, -.25, -.25]; population var (.5625 + 3·.0625)/4 = .1875,
    # std .4330 → A = [.75/.4330, -.25/.4330, ...] = [1.7321, -.5774, -.5774, -.5774]
    # [0, 0, 1, 1]: mean .5, std .5 → [-1, -1, 1, 1];  [1, 1, 1, 1]: all equal → exactly 0
    a = G.group_advantages(np.array([[1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], float))
    s3 = math.sqrt(3)
    np.testing.assert_allclose(a[0], [s3, -1 / s3, -1 / s3, -1 / s3], rtol=1e-5)
    np.testing.assert_allclose(a[1], [-1, -1, 1, 1], rtol=1e-5)
    assert (a[2] == 0).all()


def test_group_advantages_eps_is_added_to_std():
    a = G.group_advantages(np.array([[0.0, 1.0]]), eps=0.5)
    # mean .5, std .5 → (±.5)/(.5 + .5) = ±.5
    np.testing.assert_allclose(a, [[-0.5, 0.5]])


def test_group_advantages_sample_std_and_no_std():
    r = np.array([[1, 0, 0, 0]], float)
    # ddof=1: var = .75/3 = .25, std .5 → [1.5, -.5, -.5, -.5]  (verl's torch.std)
    np.testing.assert_allclose(G.group_advantages(r, ddof=1), [[1.5, -0.5, -0.5, -0.5]], rtol=1e-5)
    # std_normalize=False: r − mean = [.75, -.25, -.25, -.25]
    np.testing.assert_allclose(G.group_advantages(r, std_normalize=False), [[0.75, -0.25, -0.25, -0.25]])


def test_group_advantages_degenerate_groups():
    assert (G.group_advantages(np.array([[1.0]])) == 0).all()          # a group of one
    assert (G.group_advantages(np.array([[1.0, 0.0]]), ddof=1, include_gn=[[True, False]]) == 0).all()
    assert (G.group_advantages(np.full((2, 3), 0.3)) == 0).all()       # float all-equal → exactly 0, no 0/eps
    assert (G.group_advantages(np.zeros((2, 4)), include_gn=np.zeros((2, 4), bool)) == 0).all()


def test_group_advantages_include_mask():
    # included [1, 0, 0]: mean 1/3, var ((2/3)² + 2(1/3)²)/3 = 2/9, std .4714 → [1.4142, -.7071, -.7071]; excluded → 0
    a = G.group_advantages(np.array([[1, 0, 0, 1]], float), include_gn=np.array([[1, 1, 1, 0]], bool))
    np.testing.assert_allclose(a, [[math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2), 0]], rtol=1e-5)


def test_apply_truncation():
    r = np.array([[1, 0, 1, 0]], float)
    t = np.array([[False, True, True, False]])
    kept, inc = G.apply_truncation(r, t, "keep")
    np.testing.assert_array_equal(kept, [[1, 0, 0, 0]])       # a truncated rollout scores 0 and stays
    assert inc.all()
    same, inc = G.apply_truncation(r, t, "exclude")
    np.testing.assert_array_equal(same, r)
    np.testing.assert_array_equal(inc, ~t)
    with pytest.raises(ValueError):
        G.apply_truncation(r, t, "drop")


def test_token_advantages_numpy_and_jax():
    adv = np.array([2.0, -1.0, 3.0])
    mask = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]], np.float32)
    a, m = G.token_advantages(adv, mask)
    np.testing.assert_array_equal(a, [[2, 2, 0], [0, -1, -1], [3, 0, 0]])
    np.testing.assert_array_equal(m, mask)
    a, m = G.token_advantages(jnp.asarray(adv), jnp.asarray(mask), include_b=np.array([True, True, False]))
    assert isinstance(a, jax.Array)
    np.testing.assert_array_equal(a, [[2, 2, 0], [0, -1, -1], [0, 0, 0]])
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 1], [0, 0, 0]])


# ---------------------------------------------------------------------------------------------------------------
# KL


def test_kl_estimators_hand_computed():
    # logp_new = -1, logp_ref = -2: d = logp_ref - logp_new = -1
    # k1 = -d = 1; k2 = d²/2 = .5; k3 = e^d - d - 1 = .36788 + 1 - 1 = .36788
    new, ref = jnp.array([-1.0]), jnp.array([-2.0])
    assert float(G.kl_penalty(new, ref, "k1")[0]) == pytest.approx(1.0)
    assert float(G.kl_penalty(new, ref, "k2")[0]) == pytest.approx(0.5)
    assert float(G.kl_penalty(new, ref, "k3")[0]) == pytest.approx(math.exp(-1), rel=1e-5)
    assert float(G.kl_penalty(new, ref, "low_var_kl")[0]) == pytest.approx(math.exp(-1), rel=1e-5)
    # identical policies → all estimators 0
    for kind in G.KL_KINDS:
        assert float(G.kl_penalty(ref, ref, kind)[0]) == 0.0
    # d = 30: k3 = e^30 - 31 ≈ 1.07e13; low_var_kl clamps d to 20 and the value to 10
    assert float(G.kl_penalty(jnp.array([-40.0]), jnp.array([-10.0]), "low_var_kl")[0]) == 10.0
    with pytest.raises(ValueError):
        G.kl_penalty(new, ref, "k4")


def test_k3_is_unbiased_for_kl():
    # samples from p, KL(p‖q) for two categoricals: mean of k3 over many samples ≈ exact KL
    rng = np.random.default_rng(0)
    p, q = np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.3, 0.4])
    x = rng.choice(3, size=200_000, p=p)
    est = float(jnp.mean(G.kl_penalty(jnp.log(p[x]), jnp.log(q[x]), "k3")))
    assert est == pytest.approx(float(np.sum(p * np.log(p / q))), rel=0.02)


# ---------------------------------------------------------------------------------------------------------------
# aggregation and loss


def test_aggregation_hand_computed():
    # row 0: tokens 1, 2 trained; row 1: token 4 trained; row 2: padding (nothing trained)
    values = jnp.array([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    aggregate = jax.jit(G.aggregate, static_argnames="mode")
    assert float(aggregate(values, mask, mode="token-mean")) == pytest.approx(7 / 3)            # (1+2+4)/3
    assert float(aggregate(values, mask, mode="seq-mean-token-mean")) == pytest.approx(2.75)    # (1.5 + 4)/2
    assert float(aggregate(values, mask, mode="seq-mean-token-sum")) == pytest.approx(3.5)      # (3 + 4)/2
    assert float(aggregate(values, mask, mode="token-mean", denominator=7.0)) == pytest.approx(1.0)
    assert float(aggregate(values, jnp.zeros_like(mask), mode="token-mean")) == 0.0              # empty → 0, no NaN
    with pytest.raises(ValueError):
        G.aggregate(values, mask, "sum")


def test_policy_loss_single_tokens_hand_computed():
    def loss(ratio, adv):
        l, _ = loss_and_metrics(np.log([[ratio]]), np.zeros((1, 1)), [[adv]], np.ones((1, 1)))
        return float(l)

    assert loss(1.5, 1.0) == pytest.approx(-1.4)     # min(1.5·1, clip(1.5,.8,1.4)·1 = 1.4) = 1.4 → loss -1.4
    assert loss(1.3, 1.0) == pytest.approx(-1.3)     # inside the clip
    assert loss(0.5, 1.0) == pytest.approx(-0.5)     # min(.5, .8) = .5 (low clip never helps a positive A)
    assert loss(0.5, -1.0) == pytest.approx(0.8)     # min(-.5, -.8) = -.8 → loss .8
    assert loss(2.0, -1.0) == pytest.approx(2.0)     # min(-2, -1.4) = -2 → loss 2 (no upper clip for A < 0)


def test_clip_fractions_on_crafted_ratios():
    # token:  ratio  adv   binds?
    #   0     0.5   -1    low  (ρ < .8, A < 0)
    #   1     0.5   +1    no
    #   2     1.5   +1    high (ρ > 1.4, A > 0)
    #   3     1.3   +1    no
    #   4     0.9   -1    no
    #   5     2.0   -1    no   (ρA = -2 < clipped -1.4: min keeps ρA)
    #   6     0.1   -1    low
    #   7     3.0   +1    masked out → not counted
    ratio = np.array([[0.5, 0.5, 1.5, 1.3, 0.9, 2.0, 0.1, 3.0]])
    adv = np.array([[-1, 1, 1, 1, -1, -1, -1, 1]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0]])
    _, m = loss_and_metrics(np.log(ratio), np.zeros_like(ratio), adv, mask)
    assert float(m["clip_frac_low"]) == pytest.approx(2 / 7)
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 7)
    assert float(m["clip_frac"]) == pytest.approx(3 / 7)
    assert float(m["ratio_mean"]) == pytest.approx((0.5 + 0.5 + 1.5 + 1.3 + 0.9 + 2.0 + 0.1) / 7, rel=1e-6)
    assert float(m["ratio_max"]) == pytest.approx(2.0) and float(m["ratio_min"]) == pytest.approx(0.1)
    assert float(m["n_tokens"]) == 7
    expected_kl = np.mean([(r - 1) - math.log(r) for r in [0.5, 0.5, 1.5, 1.3, 0.9, 2.0, 0.1]])
    assert float(m["approx_kl"]) == pytest.approx(expected_kl, rel=1e-5)


def reference_loss(logp_new, logp_old, adv, mask, eps_low, eps_high, aggregation, logp_ref=None, kl_coef=0.0,
                   kl_kind="k3"):
    """Straightforward per-token loops in float64."""
    b, t = logp_new.shape
    per_tok = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            ratio = math.exp(logp_new[i, j] - logp_old[i, j])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            value = -min(ratio * adv[i, j], clipped * adv[i, j])
            if logp_ref is not None:
                d = logp_ref[i, j] - logp_new[i, j]
                kl = {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[kl_kind]
                value += kl_coef * kl
            per_tok[i, j] = value
    if aggregation == "token-mean":
        return (per_tok * mask).sum() / max(mask.sum(), 1)
    rows = [i for i in range(b) if mask[i].sum() > 0]
    if aggregation == "seq-mean-token-mean":
        return sum((per_tok[i] * mask[i]).sum() / mask[i].sum() for i in rows) / max(len(rows), 1)
    return sum((per_tok[i] * mask[i]).sum() for i in rows) / max(len(rows), 1)


@pytest.mark.parametrize("aggregation", G.AGGREGATIONS)
def test_policy_loss_matches_numpy_reference(aggregation):
    rng = np.random.default_rng(1)
    b, t = PAD            # ragged lengths and padding rows come from the mask
    for trial in range(20):
        logp_old = -rng.exponential(1.0, (b, t))
        logp_new = logp_old + rng.normal(0, 0.4, (b, t))
        logp_ref = logp_old + rng.normal(0, 0.3, (b, t))
        adv = rng.normal(0, 1, (b, 1)) * np.ones((b, t))
        mask = (rng.random((b, t)) < 0.7).astype(np.float32)
        mask *= np.arange(t)[None, :] < rng.integers(0, t + 1, (b, 1))
        if trial % 5 == 0:
            mask[0] = 0                                   # a padding row
        got, _ = loss_and_metrics(logp_new, logp_old, adv, mask, logp_ref=logp_ref, kl_coef=0.05, kl_kind="k3",
                                  aggregation=aggregation)
        want = reference_loss(logp_new, logp_old, adv, mask, 0.2, 0.4, aggregation, logp_ref, 0.05, "k3")
        assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)
        got, _ = loss_and_metrics(logp_new, logp_old, adv, mask, kl_kind="k3", aggregation=aggregation,
                                  eps_low=0.1, eps_high=0.3)
        want = reference_loss(logp_new, logp_old, adv, mask, 0.1, 0.3, aggregation)
        assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_policy_loss_gradient_is_cut_where_the_clip_binds():
    # token-mean over 4 trained tokens; d loss / d logp_new = -ρA/4 where the unclipped branch is active, else 0
    ratio = np.array([[0.5, 1.0, 1.6, 0.5]])
    adv = np.array([[-1.0, 2.0, 1.0, 1.0]])
    grad = jax.jit(jax.grad(lambda lp: G.policy_loss(lp, jnp.zeros((1, 4)), adv, jnp.ones((1, 4)))[0]))(
        jnp.log(ratio))
    #   token 0: ρ=.5 < .8, A<0 → clipped (binds) → 0;  token 1: inside → -1·2/4 = -.5
    #   token 2: ρ=1.6 > 1.4, A>0 → 0;                  token 3: ρ=.5, A>0 → unclipped → -.5·1/4 = -.125
    np.testing.assert_allclose(grad, [[0.0, -0.5, 0.0, -0.125]], rtol=1e-5)


def test_policy_loss_kl_term_and_metrics():
    lp = np.array([[-1.0, -2.0]])
    ref = np.array([[-2.0, -2.0]])
    loss, m = loss_and_metrics(lp, lp, np.zeros((1, 2)), np.ones((1, 2)), logp_ref=ref, kl_coef=1e-3, kl_kind="k1")
    # A = 0 → surrogate 0; k1 = [1, 0] → token-mean .5; loss = 1e-3 · .5
    assert float(loss) == pytest.approx(5e-4)
    assert float(m["kl"]) == pytest.approx(0.5) and float(m["pg_loss"]) == 0.0
    assert float(m["approx_kl"]) == 0.0 and float(m["ratio_mean"]) == 1.0


def test_policy_loss_empty_batch_and_extreme_ratios_are_finite():
    loss, m = loss_and_metrics(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)), np.zeros((2, 3)))
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())
    loss, m = loss_and_metrics([[0.0, -200.0]], [[-200.0, 0.0]], [[1.0, -1.0]], np.ones((1, 2)),
                               logp_ref=[[-300.0, 0.0]], kl_coef=1.0)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())


def test_policy_loss_is_jittable_with_static_options():
    f = jax.jit(G.policy_loss, static_argnames=("aggregation", "kl_kind"))
    x = jnp.zeros((2, 3))
    loss, m = f(x, x, jnp.ones((2, 3)), jnp.ones((2, 3)), aggregation="seq-mean-token-sum", eps_low=0.1)
    assert float(loss) == pytest.approx(-3.0)    # ρ = 1, A = 1 → -1 per token, 3 tokens per row, mean over rows
