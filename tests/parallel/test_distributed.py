"""The single-process side of axpo_jax/parallel/distributed.py (the multi-process side runs in test_multihost.py):
start-up from the environment, the one-process identities, and padding a training batch to shapes other processes
agreed on."""

import importlib.util

import numpy as np
import pytest

from axpo_jax.models import qwen3_vl
from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict
from axpo_jax.parallel import distributed
from axpo_jax.train.batch import batch_shape, make_batch, pad_batch

CONFIG = qwen3_vl.Qwen3VLConfig.from_dict(tiny_config_dict(num_hidden_layers=1, vision_depth=1,
                                                            deepstack_visual_indexes=(0,)))


def test_start_up_modes_and_environment_errors():
    assert distributed.initialize_from_env("off") == distributed.ProcessInfo(0, 1, False)
    if importlib.util.find_spec("libtpu") is None:  # on a TPU VM "auto" asks jax to find the pod
        assert distributed.initialize_from_env("auto", environ={}) == distributed.ProcessInfo(0, 1, False)
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
        distributed.initialize_from_env("auto", environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"})
    with pytest.raises(distributed.DistributedError, match="must be integers"):
        distributed.initialize_from_env("env", environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                                        "JAX_PROCESS_ID": "0"})
    with pytest.raises(distributed.DistributedError, match="needs JAX_COORDINATOR_ADDRESS"):
        distributed.initialize_from_env("env", environ={})
    with pytest.raises(distributed.DistributedError, match="unknown distributed mode"):
        distributed.initialize_from_env("on")


def test_one_process_gathers_are_identities():
    rewards = np.array([[0.25, 1.0], [0.0, 0.5]])
    np.testing.assert_array_equal(distributed.allgather(rewards), rewards[None])
    assert distributed.allgather_json({"cursor": 3}) == [{"cursor": 3}]
    np.testing.assert_array_equal(distributed.concat_shards(rewards, None), rewards)
    np.testing.assert_array_equal(distributed.max_across_processes([3, 1]), [3, 1])
    assert distributed.any_process(True) and not distributed.any_process(False)
    shard = distributed.data_shard(None)
    assert (shard.index, shard.count, shard.rows(8)) == (0, 1, slice(0, 8))
    assert distributed.DataShard(1, 2, positions=2).rows(8) == slice(4, 8)
    assert distributed.DataShard(1, 2, positions=2).round_rows(3) == 4


def _rows(rng, count):
    cfg = CONFIG
    ids, trained = [], []
    for b in range(count):
        head = rng.integers(0, 200, 5).tolist()
        image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id] if b != 1 else []
        tail = rng.integers(0, 200, 7 + b).tolist()
        ids.append(head + image + tail)
        trained.append(np.r_[np.zeros(len(head) + len(image)), np.ones(len(tail))])
    images = count - 1
    grids = np.array([[1, 4, 6]] * images)
    pixels = rng.standard_normal((24 * images, cfg.vision.patch_dim)).astype(np.float32)
    advantages = [np.full(len(t), 0.5 * b) for b, t in enumerate(trained)]
    return ids, trained, pixels, grids, advantages


def test_padding_a_batch_equals_building_it_with_the_larger_buckets():
    """Processes agree on one (tokens, image rows, patches) shape by padding what they built: the padded batch must
    be exactly the batch `make_batch` builds with those buckets, image-token indices into wider rows included."""
    ids, trained, pixels, grids, advantages = _rows(np.random.default_rng(0), 3)
    small = make_batch(CONFIG, ids, trained, pixel_values=pixels, image_grid_thw=grids, advantages=advantages,
                       length=32, num_image_rows=2, patches_per_image=24)
    large = make_batch(CONFIG, ids, trained, pixel_values=pixels, image_grid_thw=grids, advantages=advantages,
                       length=64, num_image_rows=4, patches_per_image=64)
    assert batch_shape(small) == (32, 2, 24) and batch_shape(large) == (64, 4, 64)
    padded = pad_batch(small, length=64, num_image_rows=4, patches_per_image=64,
                       spatial_merge_size=CONFIG.vision.spatial_merge_size)
    for name in ("targets_bt", "loss_mask_bt", "advantages_bt", "sampler_logprobs_bt"):
        np.testing.assert_array_equal(getattr(padded, name), getattr(large, name), err_msg=name)
    for name in large.inputs.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(padded.inputs, name), getattr(large.inputs, name), err_msg=name)
    assert pad_batch(large, length=64, num_image_rows=4, patches_per_image=64, spatial_merge_size=2) is large
    with pytest.raises(ValueError, match="cannot pad"):
        pad_batch(large, length=32, num_image_rows=4, patches_per_image=64, spatial_merge_size=2)
