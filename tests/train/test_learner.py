"""The update step and checkpoints: SFT learns, micro-batching equals one big batch, the RL loss moves log-probs
the way the advantages say, non-finite gradients are skipped, and a restored run continues bit-identically."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from axpo_jax.models import qwen3_vl
from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict
from axpo_jax.train.batch import make_batch
from axpo_jax.train.checkpoints import Checkpointer
from axpo_jax.train.learner import Learner, LossConfig
from axpo_jax.train.optimizer import consecutive_skipped_updates, make_optimizer

CONFIG = qwen3_vl.Qwen3VLConfig.from_dict(tiny_config_dict(num_hidden_layers=2, vision_depth=1,
                                                            deepstack_visual_indexes=(0,)))


def fresh_model(seed=0):
    return qwen3_vl.Qwen3VL(CONFIG, rngs=nnx.Rngs(seed))


def rows(seed=0, count=4, with_image=True):
    rng = np.random.default_rng(seed)
    cfg = CONFIG
    ids, trained = [], []
    for b in range(count):
        head = rng.integers(0, 200, 5).tolist()
        image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id] if (
            with_image and b % 2 == 0) else []
        tail = rng.integers(0, 200, 10 + b).tolist()
        ids.append(head + image + tail)
        trained.append(np.r_[np.zeros(len(head) + len(image)), np.ones(len(tail))])
    images = sum(1 for b in range(count) if with_image and b % 2 == 0)
    grids = np.array([[1, 4, 6]] * images) if images else None
    pixels = rng.standard_normal((24 * images, CONFIG.vision.patch_dim)).astype(np.float32) if images else None
    return ids, trained, pixels, grids


def sft_batch(seed=0, **kw):
    ids, trained, pixels, grids = rows(seed, **kw)
    return make_batch(CONFIG, ids, trained, pixel_values=pixels, image_grid_thw=grids, length=32)


def tx(steps=10):
    return make_optimizer(learning_rate=3e-3, total_steps=steps, warmup_steps=0)


def test_sft_loss_goes_down():
    learner = Learner(fresh_model(), tx(), LossConfig(kind="sft"))
    batch = sft_batch()
    losses = [learner.step([batch])["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] * 0.9, losses


def test_micro_batches_sum_to_the_full_batch_gradient():
    ids, trained, _, _ = rows(1, count=4, with_image=False)
    full = make_batch(CONFIG, ids, trained, length=32)
    halves = [make_batch(CONFIG, ids[:2], trained[:2], length=32), make_batch(CONFIG, ids[2:], trained[2:], length=32)]
    # plain SGD at rate 1 (with the finite guard the Learner reads): each weight moves by minus its summed gradient.
    # (Adam's first step moves a weight by ~lr * sign(g), which for a gradient near Adam's eps turns a summation-
    # order difference of 1e-9 into 1e-5 of weight.)
    sgd = lambda: optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1)  # noqa: E731
    a, b = Learner(fresh_model(), sgd(), LossConfig(kind="sft")), Learner(fresh_model(), sgd(), LossConfig(kind="sft"))
    start = [np.asarray(p) for _, p in qwen3_vl.named_parameters(fresh_model())]
    ma, mb = a.step([full]), b.step(halves)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    moved = 0.0
    for w, (_, x), (_, y) in zip(start, qwen3_vl.named_parameters(a.model), qwen3_vl.named_parameters(b.model)):
        _assert_moved_alike(y, x, w, atol=1e-7)
        moved = max(moved, float(np.abs(np.asarray(x) - w).max()))
    assert moved > 1e-3  # the gradients compared are not all ~0


def _assert_moved_alike(y, x, w, atol: float):
    """y - w equals x - w within 1e-4 relative, atol, and one float32 spacing of w: each updated weight is
    rounded to float32 (a norm weight of 1.0 to steps of 1.2e-7), so summation orders that differ in the last
    bit of a gradient may land a weight one step apart."""
    y_moved, x_moved = np.asarray(y) - w, np.asarray(x) - w
    bound = 1e-4 * np.abs(x_moved) + atol + np.spacing(np.abs(w).astype(np.float32))
    worst = int(np.argmax(np.abs(y_moved - x_moved) - bound))
    assert np.all(np.abs(y_moved - x_moved) <= bound), (worst, y_moved.flat[worst], x_moved.flat[worst])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_rl_aggregations_by_hand_and_over_micro_batches(aggregation):
    """`LossConfig.aggregation` (the paper is silent): on the first update ρ = 1, so the loss is minus the
    aggregated advantages, computed here by hand from each row's advantage A_b and trained tokens T_b; split into
    two micro-batches the update takes the same loss and moves every weight the same (plain SGD, as above)."""
    ids, trained, _, _ = rows(3, count=4, with_image=False)
    adv_b = np.array([1.0, -1.0, 0.5, 2.0])
    tokens_b = np.array([t.sum() for t in trained])  # 10, 11, 12, 13
    expected = {"token-mean": -(adv_b * tokens_b).sum() / tokens_b.sum(), "seq-mean-token-mean": -adv_b.mean(),
                "seq-mean-token-sum": -(adv_b * tokens_b).mean()}[aggregation]
    advantages = [np.where(t > 0, a, 0.0) for a, t in zip(adv_b, trained)]

    def batch(part):
        return make_batch(CONFIG, [ids[i] for i in part], [trained[i] for i in part],
                          advantages=[advantages[i] for i in part], length=32)

    sgd = lambda: optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1)  # noqa: E731
    loss = LossConfig(kind="rl", kl_coef=0.0, aggregation=aggregation)
    a, b = Learner(fresh_model(), sgd(), loss), Learner(fresh_model(), sgd(), loss)
    start = [np.asarray(p) for _, p in qwen3_vl.named_parameters(fresh_model())]
    ma, mb = a.step([batch([0, 1, 2, 3])]), b.step([batch([0, 1]), batch([2, 3])])
    assert ma["loss"] == pytest.approx(expected, rel=1e-5) and mb["loss"] == pytest.approx(expected, rel=1e-5)
    assert ma["trained_tokens"] == mb["trained_tokens"] == tokens_b.sum()
    for w, (_, x), (_, y) in zip(start, qwen3_vl.named_parameters(a.model), qwen3_vl.named_parameters(b.model)):
        moved = np.asarray(x) - w  # token sums move weights ~12x further than means: rounding scales with that
        _assert_moved_alike(y, x, w, atol=max(1e-7, 1e-5 * np.abs(moved).max()))


def test_an_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        LossConfig(aggregation="sequence-mean")


def test_rl_update_follows_the_advantages():
    ids, trained, pixels, grids = rows(2)
    advantages = [np.where(t > 0, 1.0 if b % 2 == 0 else -1.0, 0.0) for b, t in enumerate(trained)]
    model = fresh_model()
    learner = Learner(model, tx(), LossConfig(kind="rl", kl_coef=0.0))
    batch = make_batch(CONFIG, ids, trained, pixel_values=pixels, image_grid_thw=grids, advantages=advantages,
                       length=32)
    before = np.asarray(learner.logprobs(jax.tree.map(jnp.asarray, batch)))
    batch = batch.replace(sampler_logprobs_bt=before)
    metrics = learner.step([batch])
    after = np.asarray(learner.logprobs(jax.tree.map(jnp.asarray, batch)))
    mask = batch.loss_mask_bt > 0
    delta = (after - before)
    assert delta[0][mask[0]].mean() > 0 and delta[1][mask[1]].mean() < 0  # up for A > 0, down for A < 0
    assert metrics["sampler_trainer_logprob_gap"] < 1e-5 and metrics["clip_frac"] == 0.0
    # a near-uniform random policy over the vocabulary: entropy close to, and never above, log V
    assert 0.9 * np.log(CONFIG.text.vocab_size) < metrics["entropy"] <= np.log(CONFIG.text.vocab_size) + 1e-4


def test_rl_log_probs_are_the_sampling_temperatures():
    """At a rollout temperature T the loss scores softmax(logits / T), the policy the sampler drew from and whose
    log-probs it reported: π_old, the trained log-probs and the sampler/trainer gap all use it."""
    ids, trained, pixels, grids = rows(4)
    model = fresh_model()
    batch = make_batch(CONFIG, ids, trained, pixel_values=pixels, image_grid_thw=grids,
                       advantages=[np.where(t > 0, 1.0, 0.0) for t in trained], length=32)
    device = jax.tree.map(jnp.asarray, batch)
    logits_btv = np.asarray(jax.jit(lambda m, inputs: m.forward(inputs))(model, device.inputs), np.float64)
    targets = np.asarray(batch.targets_bt)[..., None]
    by_hand = {t: np.take_along_axis(jax.nn.log_softmax(logits_btv / t, axis=-1), targets, -1)[..., 0]
               for t in (1.0, 0.6)}
    mask = batch.loss_mask_bt > 0
    assert np.abs(by_hand[0.6] - by_hand[1.0])[mask].max() > 1e-2  # the temperature matters for this model
    learner = Learner(model, tx(), LossConfig(kind="rl", kl_coef=0.0, temperature=0.6))
    np.testing.assert_allclose(np.asarray(learner.logprobs(device))[mask], by_hand[0.6][mask], atol=2e-5)
    metrics = learner.step([batch.replace(sampler_logprobs_bt=by_hand[0.6].astype(np.float32))])
    assert metrics["sampler_trainer_logprob_gap"] < 2e-5
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LossConfig(temperature=0.0)


def test_non_finite_gradients_skip_the_update():
    """However long the streak: optax.apply_if_finite applies the update after `max_consecutive_errors` skips in a
    row, which would write NaN into the weights and Adam's state for good (the runs stop on a streak themselves)."""
    learner = Learner(fresh_model(), tx(), LossConfig(kind="rl", kl_coef=0.0))
    ids, trained, _, _ = rows(3, with_image=False)
    bad = make_batch(CONFIG, ids, trained, advantages=[np.full(len(t), np.nan) for t in trained], length=32)
    before = [np.asarray(p) for _, p in qwen3_vl.named_parameters(learner.model)]
    for streak in range(1, 13):
        metrics = learner.step([bad])
        assert metrics["skipped_updates"] == consecutive_skipped_updates(learner.optimizer.opt_state) == streak
    for x, (_, y) in zip(before, qwen3_vl.named_parameters(learner.model)):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(nnx.state(learner.optimizer)))
    good = make_batch(CONFIG, ids, trained, advantages=[np.ones(len(t)) for t in trained], length=32)
    assert learner.step([good])["skipped_updates"] == 12  # a finite update ends the streak and is applied
    assert consecutive_skipped_updates(learner.optimizer.opt_state) == 0
    after = [np.asarray(p) for _, p in qwen3_vl.named_parameters(learner.model)]
    assert any(not np.array_equal(x, y) for x, y in zip(before, after))


def test_restore_continues_exactly(tmp_path):
    batches = [sft_batch(seed) for seed in range(4)]
    straight = Learner(fresh_model(), tx(), LossConfig(kind="sft"))
    expected = [straight.step([b])["loss"] for b in batches]

    first = Learner(fresh_model(), tx(), LossConfig(kind="sft"))
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for step, b in enumerate(batches[:2], start=1):
        first.step([b])
        checkpointer.save(step, first.model, first.optimizer, rng=jax.random.key(step), extra={"data": step})
    checkpointer.close()

    resumed = Learner(fresh_model(seed=9), tx(), LossConfig(kind="sft"))  # different init: all of it is restored
    restored = Checkpointer(str(tmp_path / "ckpt")).restore(resumed.model, resumed.optimizer)
    step, rng, extra = restored
    assert step == 2 and extra == {"data": 2}
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(2)))
    losses = [resumed.step([b])["loss"] for b in batches[2:]]
    assert losses == expected[2:]


def test_remat_gives_the_same_gradients():
    """Rematerialized decoder layers and vision blocks change memory, not math: the same loss and gradients
    (the vision tower's included: the batch has images)."""
    from axpo_jax.train.learner import _grads

    batch = jax.tree.map(jnp.asarray, sft_batch(seed=2))
    model = fresh_model()
    zeros = jnp.zeros_like(batch.loss_mask_bt)
    denominator = batch.loss_mask_bt.sum()
    out = {remat: _grads(model, batch, zeros, zeros, denominator, LossConfig(kind="sft", remat=remat))
           for remat in (False, True)}
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
    grads = [jax.tree.leaves(out[remat][2]) for remat in (False, True)]
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    graphdef, state = nnx.split(model)
    forward = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).hidden_states(batch.inputs, remat=True))(state)
    rematerialized = [e for e in forward.jaxpr.eqns if e.primitive.name.startswith(("remat", "checkpoint"))]
    assert len(rematerialized) == CONFIG.text.num_hidden_layers + CONFIG.vision.depth


def rl_batch(seed, length=32):
    ids, trained, pixels, grids = rows(seed)
    advantages = [np.where(t > 0, 1.0 if b % 2 == 0 else -1.0, 0.0) for b, t in enumerate(trained)]
    return make_batch(CONFIG, ids, trained, pixel_values=pixels, image_grid_thw=grids, advantages=advantages,
                      length=length)


def test_one_update_a_step_runs_no_forward_for_pi_old(monkeypatch):
    """π_old of the step's only update is the policy being trained: the loss and gradients equal those with its
    log-probs computed by a separate forward (what the update did before), without running that forward."""
    from axpo_jax.train import learner as learner_module

    batch = jax.tree.map(jnp.asarray, rl_batch(4))
    model = fresh_model()
    cfg = LossConfig(kind="rl", kl_coef=0.0)
    old = learner_module._logprobs(model, batch, cfg.logprob_chunk, cfg.temperature)
    denominator = batch.loss_mask_bt.sum()
    explicit = learner_module._grads(model, batch, old, None, denominator, cfg)
    implicit = learner_module._grads(model, batch, None, None, denominator, cfg)
    np.testing.assert_allclose(implicit[0], explicit[0], rtol=1e-6)
    assert implicit[1]["ratio_max"] == implicit[1]["ratio_min"] == 1.0
    for a, b in zip(jax.tree.leaves(explicit[2]), jax.tree.leaves(implicit[2])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)

    forwards = []
    monkeypatch.setattr(Learner, "logprobs", lambda self, *a, **k: forwards.append(1))
    metrics = Learner(fresh_model(), tx(), cfg).step([rl_batch(4)])
    assert forwards == [] and metrics["updates"] == 1 and metrics["clip_frac"] == 0.0


def test_later_updates_use_the_sampling_policy_as_pi_old():
    """updates=2 over two micro-batches: the first update trains on micro-batch 0; the second on micro-batch 1 with
    π_old = the log-probs before the first update (hand-made here with a second learner), so after a large first
    update its ratios leave [1 - ε_low, 1 + ε_high] and the clip binds."""
    first, second = rl_batch(5), rl_batch(6)
    cfg = LossConfig(kind="rl", kl_coef=0.0)

    def big_steps():
        return make_optimizer(learning_rate=3e-2, total_steps=10, warmup_steps=0)

    both = Learner(fresh_model(), big_steps(), cfg)
    metrics = both.step([first, second], updates=2)

    by_hand = Learner(fresh_model(), big_steps(), cfg)
    old_second = by_hand.logprobs(jax.tree.map(jnp.asarray, second))
    m1 = by_hand.step([first])
    m2 = by_hand._update([jax.tree.map(jnp.asarray, second)], [old_second])
    for (_, x), (_, y) in zip(qwen3_vl.named_parameters(both.model), qwen3_vl.named_parameters(by_hand.model)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert int(both.optimizer.step[...]) == 2
    assert metrics["updates"] == 2 and metrics["trained_tokens"] == m1["trained_tokens"] + m2["trained_tokens"]
    assert m2["ratio_max"] > 1.4 or m2["ratio_min"] < 0.8  # the first update moved the policy
    assert m2["clip_frac"] > 0 and metrics["clip_frac"] > 0
    assert metrics["ratio_max"] == max(m1["ratio_max"], m2["ratio_max"])
    with pytest.raises(ValueError, match="equal runs"):
        both.step([first, second, first], updates=2)


def test_combine_updates_by_hand():
    from axpo_jax.train.learner import combine_updates

    a = dict(loss=1.0, grad_norm=2.0, trained_tokens=30.0, skipped_updates=0, clip_frac=0.0, ratio_max=1.0,
             ratio_min=1.0, sampler_trainer_logprob_gap=1e-6)
    b = dict(loss=3.0, grad_norm=4.0, trained_tokens=10.0, skipped_updates=1, clip_frac=0.4, ratio_max=1.7,
             ratio_min=0.6, sampler_trainer_logprob_gap=2e-6)
    out = combine_updates([a, b])
    assert out == pytest.approx(dict(loss=1.5, grad_norm=3.0, trained_tokens=40.0, skipped_updates=1,
                                     clip_frac=0.1, ratio_max=1.7, ratio_min=0.6, sampler_trainer_logprob_gap=2e-6,
                                     updates=2))


def test_image_rows_are_padded_to_this_process_share_of_the_batch_devices(monkeypatch):
    """Hosts of 8 devices with micro-batches of 2 images: the image rows split over the batch axes like the token
    rows, so each process pads them to a multiple of its 8 batch positions (else the update refuses the layout).
    The process layout is faked: the multi-host tests run 2 processes of 2 devices, where 2 rows already divide."""
    from axpo_jax.parallel import distributed

    learner = Learner(fresh_model(), tx(), LossConfig(kind="sft"))
    monkeypatch.setattr(distributed, "data_shard", lambda mesh: distributed.DataShard(0, 2, positions=8))
    (agreed,) = learner._agreed([sft_batch()])  # 2 of its 4 rows have an image
    assert agreed.inputs.pixel_patches_nlp.shape[0] == 8
    assert agreed.targets_bt.shape == sft_batch().targets_bt.shape  # the token rows are rounded where they are made
