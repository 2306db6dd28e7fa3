"""The forward (einsum and splash attention) and the sampler on a simulated 8-device CPU mesh (data x fsdp x
tensor = 2 x 2 x 2) equal the 1-device ones; the splash forward also exports as an 8-chip TPU program.

The mesh needs XLA_FLAGS before jax starts, so the check runs in a fresh interpreter (this file as a script).
"""

import os
import subprocess
import sys

import numpy as np


def _check(folder: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from axpo_jax.models import qwen3_vl
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict, write_random_checkpoint
    from axpo_jax.parallel.mesh import make_mesh
    from axpo_jax.parallel.sharding import shard_model_inputs

    assert jax.device_count() == 8, jax.devices()
    config_dict = tiny_config_dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    write_random_checkpoint(folder, config_dict, seed=3)

    rng = np.random.default_rng(0)
    cfg = qwen3_vl.Qwen3VLConfig.from_dict(config_dict)
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id]
    ids = np.stack([np.r_[rng.integers(0, 200, 4), image, rng.integers(0, 200, 6)] for _ in range(4)])
    grids = np.array([[1, 4, 6]] * 4)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), image_grid_thw=grids,
                 pixel_values=rng.standard_normal((96, cfg.vision.patch_dim)).astype(np.float32))
    inputs = qwen3_vl.prepare_inputs(cfg, **batch)
    targets = jnp.asarray(np.roll(ids, -1, 1), jnp.int32)

    @nnx.jit
    def run(model, inputs, targets):
        return model.forward(inputs), model.token_logprobs(inputs, targets, chunk_size=8)

    single = qwen3_vl.from_pretrained(folder)
    logits_1, logp_1 = run(single, jax.tree.map(jnp.asarray, inputs), targets)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = qwen3_vl.from_pretrained(folder, mesh=mesh)
    q_proj = sharded.model.language_model.layers[0].self_attn.q_proj.weight[...]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), q_proj.sharding
    assert len(q_proj.addressable_shards) == 8 and q_proj.addressable_shards[0].data.shape == (32, 32)
    with jax.set_mesh(mesh):
        logits_8, logp_8 = run(sharded, shard_model_inputs(inputs, mesh), targets)
    assert len(logits_8.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits_8), np.asarray(logits_1), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logp_8), np.asarray(logp_1), atol=2e-5, rtol=0)
    # the splash kernel (interpreted here) runs each device's rows and heads in a shard_map: the same log-probs
    sharded.use_fused_attention_("splash")
    with jax.set_mesh(mesh):
        _, logp_splash = run(sharded, shard_model_inputs(inputs, mesh), targets)
    np.testing.assert_allclose(np.asarray(logp_splash), np.asarray(logp_1), atol=2e-5, rtol=0)
    # and exported for an 8-chip TPU (lowered, not compiled): the kernel inside the shard_map's manual region
    from axpo_jax.models.qwen3_vl.model import splash_traced_for_tpu

    graph, params = nnx.split(sharded)

    def logprobs(params, inputs, targets):
        return nnx.merge(graph, params).token_logprobs(inputs, targets, chunk_size=8)

    with jax.set_mesh(mesh), splash_traced_for_tpu():
        tpu_program = jax.export.export(jax.jit(logprobs), platforms=["tpu"])(
            params, shard_model_inputs(inputs, mesh), targets)
    module = tpu_program.mlir_module()
    assert tpu_program.nr_devices == 8 and "manual_computation" in module
    assert 'kernel_name = "splash_mqa_fwd_segmented_no_residuals"' in module
    sharded.use_fused_attention_(None)

    # The sampler's cache rows split over the mesh too; greedy rollouts are the same tokens as on one device.
    from axpo_jax.rollout.sampler import Sampler, SamplingParams

    greedy = SamplingParams(temperature=0.0)
    one = Sampler(single, batch_size=4, capacity=64)
    logits, cache = one.extend(batch)
    expected, _, _ = one.decode(logits, cache, jax.random.key(0), greedy, 12)
    with jax.set_mesh(mesh):
        eight = Sampler(sharded, batch_size=4, capacity=64, mesh=mesh)
        logits, cache = eight.extend(batch)
        assert len(cache.keys[0].sharding.device_set) == 8
        got, _, _ = eight.decode(logits, cache, jax.random.key(0), greedy, 12)
    np.testing.assert_array_equal(got.tokens_bn, expected.tokens_bn)
    print("SHARDED_FORWARD_OK")


def test_eight_device_mesh_matches_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "SHARDED_FORWARD_OK" in result.stdout, result.stdout + result.stderr


if __name__ == "__main__":
    _check(sys.argv[1])
