"""bench_update on the micro preset: the jitted RL update step against the same loss + AdamW in torch."""

import ml_collections
import numpy as np
import pytest

from axpo_jax.bench import update


def test_update_bench_micro_agrees_with_torch():
    pytest.importorskip("torch")
    config = ml_collections.ConfigDict(
        dict(mode="bench_update", seed=0, preset="micro", batch=2, seq_len=32, num_images=1, image_size=32,
             repeats=1, kl_coef=0.0)
    )
    record = update.run(config)
    expected = {"jax_compile_s", "torch_median_s", "jax_median_s", "torch_tokens_per_s", "jax_tokens_per_s",
                "torch_trained_tokens_per_s", "jax_trained_tokens_per_s", "jax_over_torch_tokens_per_s",
                "loss_rel_diff", "grad_norm_rel_diff", "max_abs_old_logprob_diff", "agreement_ok", "host_loaded",
                "host", "num_params"}
    assert expected <= set(record)
    assert record["tokens"] == 64 and record["trained_tokens"] == 2 * 15
    assert record["agreement_ok"] and record["loss_rel_diff"] < 1e-4
    assert record["grad_norm_rel_diff"] < 1e-3 and record["max_abs_old_logprob_diff"] < 1e-4
    assert record["jax_median_s"] > 0 and record["torch_median_s"] > 0
    assert record["jax_skipped_updates"] == 0


def test_rl_arrays_layout():
    ids = np.arange(20).reshape(2, 10)
    rl = update.rl_arrays(ids, seed=0)
    assert rl["targets_bt"].tolist()[0] == list(range(1, 10)) + [0]
    mask = rl["loss_mask_bt"]
    assert mask[:, 5:9].all() and not mask[:, :5].any() and not mask[:, 9].any()
    adv = rl["advantages_bt"]
    assert (adv[:, :5] == 0).all() and (adv[:, 9] == 0).all()
    assert all(len(set(row[5:9].tolist())) == 1 for row in adv)  # one advantage per row
