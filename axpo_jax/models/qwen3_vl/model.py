"""Qwen3-VL (dense) in Flax NNX: vision tower, DeepStack, and the interleaved-MRoPE text decoder, in one file.

Module and parameter names follow transformers' `Qwen3VLForConditionalGeneration` one to one, and every weight
is stored in torch's layout ([out, in] for linear layers), so a checkpoint maps onto this tree by name alone and
a round trip is bit-exact. The forward takes `ModelInputs` (fixed shapes, prepared on the host by
`inputs.prepare_inputs`), so it can be jitted and sharded without any data-dependent shapes.

Shape letters: B batch, T tokens, S key positions, D hidden, H heads, K kv heads, G = H / K, E head dim,
N image rows, L patches per row, M merged tokens per row (L / merge^2), V vocab.
"""

from __future__ import annotations

import contextlib
import contextvars

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from axpo_jax.models.qwen3_vl.config import Qwen3VLConfig, TextConfig, VisionConfig
from axpo_jax.models.qwen3_vl.inputs import ModelInputs
from axpo_jax.parallel.sharding import BATCH_AXES, constrain_batch, shard_axes

_NEG_INF = -1e30  # finite, so an all-masked row (padding) gives a uniform softmax instead of NaNs


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values of every row's tokens so far, in slots [0, length_b).

    A row's slots are contiguous from 0 (prompts are right-padded when prefilled), so "slot < length" is the
    whole validity mask. Rope positions are tracked apart from slots because an image advances the position by
    max(h, w) / merge while it fills h * w / merge^2 slots.
    """

    # Laid out so that both attention products are plain matmuls per (row, kv head) with no transpose of the cache
    # on a decode step: scores = q [G, E] @ keys [E, S], out = probs [G, S] @ values [S, E]. (A [B, S, K, E] cache
    # costs a copy of every layer's keys and values per token; keys stored [S, E] make XLA:CPU's score product
    # ~2x slower.)
    keys: tuple  # per layer [B, K, E, S]
    values: tuple  # per layer [B, K, S, E]
    length_b: jax.Array  # int32, filled slots per row
    next_position_b: jax.Array  # int32, rope position of the row's next token (largest position so far + 1)

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, capacity: int, dtype=jnp.float32) -> "KVCache":
        k, e, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
        keys = tuple(jnp.zeros((batch, k, e, capacity), dtype) for _ in range(layers))
        values = tuple(jnp.zeros((batch, k, capacity, e), dtype) for _ in range(layers))
        return cls(keys, values, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.values[0].shape[2]

    def first_slots(self, slots: int) -> "KVCache":
        """The cache cut to its first `slots` slots (a decode loop that needs no more attends over fewer)."""
        return self.replace(keys=tuple(k[..., :slots] for k in self.keys),
                            values=tuple(v[:, :, :slots] for v in self.values))

    def with_first_slots(self, part: "KVCache") -> "KVCache":
        """This cache with its first slots (and lengths, positions) replaced by `part`'s (from `first_slots`)."""
        slots = part.capacity
        return KVCache(tuple(k.at[..., :slots].set(p) for k, p in zip(self.keys, part.keys)),
                       tuple(v.at[:, :, :slots].set(p) for v, p in zip(self.values, part.values)),
                       part.length_b, part.next_position_b)

    def take_rows(self, rows_r) -> "KVCache":
        """A cache whose row r is row rows_r[r] of this one: forking a prefix K ways copies its row K times."""
        return jax.tree.map(lambda x: jnp.take(x, rows_r, axis=0), self)


def _write_rows(cache, new, start_b, slot_axis: int):
    """Writes each row's new entries (`new` is shaped like `cache` but for its T slots along `slot_axis`) at the
    row's own slot offset. Entries that would land past the last slot are dropped (they are chunk padding:
    callers check that real tokens fit), never shifted back over earlier slots as a clamped dynamic_update_slice
    would."""
    slots_t = jnp.arange(new.shape[slot_axis])
    where = (slice(None),) * (slot_axis - 1)  # index of a row's array: the batch axis is gone under vmap
    return jax.vmap(lambda c, n, i: c.at[where + (i + slots_t,)].set(n, mode="drop"))(cache, new, start_b)


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """y = x W^T + b with W stored [out, in] as torch stores it ([in, out] in a `Qwen3VL.for_decoding` copy)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        self.in_out = False  # weight layout: [in, out] if True

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o" if self.in_out else "...i,oi->...o", x, self.weight[...])
        return y if self.bias is None else y + self.bias[...]

    def transpose_(self):
        """Stores the weight in the other layout (same y)."""
        self.weight = nnx.Param(self.weight[...].T)
        self.in_out = not self.in_out

    @classmethod
    def side_by_side(cls, linears: list["Linear"]) -> "Linear":
        """One Linear whose output is the outputs of `linears` (same input) laid side by side, weight [in, out]:
        one product instead of several, for a decode step where each product of a few rows costs a pass over
        its weight plus a fixed dispatch cost."""
        weight = linears[0].weight[...]
        fused = cls(1, 1, bias=linears[0].bias is not None, dtype=weight.dtype, rngs=nnx.Rngs(0))  # shapes below
        fused.weight = nnx.Param(jnp.concatenate([l.weight[...] if l.in_out else l.weight[...].T for l in linears], 1))
        if fused.bias is not None:
            fused.bias = nnx.Param(jnp.concatenate([l.bias[...] for l in linears]))
        fused.in_out = True
        return fused


class Embedding(nnx.Module):
    def __init__(self, num: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (num, features), dtype))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, features: int, eps: float = 1e-6, *, dtype):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * self.weight[...] + self.bias[...]


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def attention(q_bthe, k_bkes, v_bkse, mask_bts):
    """Softmax attention with grouped kv heads; keys come transposed, [B, K, E, S], as the KV cache holds them;
    `mask_bts` True where a query may attend to a key."""
    b, t, h, e = q_bthe.shape
    k = k_bkes.shape[1]
    if t == 1:
        # A decode step: without the unit query axis both products are plain batched matmuls over (b, k), which
        # XLA:CPU runs ~2x faster than the general form below (there the t axis makes it pick a transposed
        # output and an Eigen batch dot for probs @ V).
        q_bkge = q_bthe.reshape(b, k, h // k, e)
        scores_bkgs = jnp.einsum("bkge,bkes->bkgs", q_bkge, k_bkes, preferred_element_type=jnp.float32) * (e**-0.5)
        scores_bkgs = jnp.where(mask_bts[:, :, None], scores_bkgs, _NEG_INF)
        probs_bkgs = jax.nn.softmax(scores_bkgs, axis=-1).astype(v_bkse.dtype)
        return jnp.einsum("bkgs,bkse->bkge", probs_bkgs, v_bkse).reshape(b, 1, h * e)
    q_btkge = q_bthe.reshape(b, t, k, h // k, e)
    scores_bkgts = jnp.einsum("btkge,bkes->bkgts", q_btkge, k_bkes, preferred_element_type=jnp.float32)
    scores_bkgts = scores_bkgts * (e**-0.5)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _NEG_INF)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bkse.dtype)
    out_btkge = jnp.einsum("bkgts,bkse->btkge", probs_bkgts, v_bkse)
    return out_btkge.reshape(b, t, h * e)


def fused_causal_attention(q_bthe, k_btke, v_btke, kv_len_b, implementation: str):
    """Causal attention of right-padded rows over themselves by `jax.nn.dot_product_attention` ("cudnn": cuDNN's
    flash attention, which never materialises the [T, S] scores and skips the masked half; "xla": XLA's own, the
    form tests check the arguments with on the CPU), or "splash": `splash_causal_attention`. Query t sees keys
    s <= t with s < kv_len_b, the einsum path's mask for every real token; a padding query (t >= kv_len_b) still
    sees keys, so it stays finite."""
    if implementation == "splash":
        return splash_causal_attention(q_bthe, k_btke, v_btke, kv_len_b)
    b, t, h, e = q_bthe.shape
    out_bthe = jax.nn.dot_product_attention(q_bthe, k_btke, v_btke, is_causal=True,
                                            key_value_seq_lengths=jnp.maximum(kv_len_b, 1).astype(jnp.int32),
                                            implementation=implementation)
    return out_bthe.reshape(b, t, h * e)


_SPLASH_BLOCK = 128  # the kernel's query and key tiles (its minimum: a TPU lane's width)
_SPLASH_FOR_TPU = contextvars.ContextVar("splash_for_tpu", default=False)


@contextlib.contextmanager
def splash_traced_for_tpu():
    """Within this context splash kernels are traced as the TPU's Mosaic kernels, not interpreted, whatever the
    backend: for exporting a TPU program (`jax.export.export(..., platforms=["tpu"])`) from a machine without a
    TPU. Pallas picks the interpreted form while tracing, before any platform is known, so it cannot tell."""
    token = _SPLASH_FOR_TPU.set(True)
    try:
        yield
    finally:
        _SPLASH_FOR_TPU.reset(token)


def splash_causal_attention(q_bthe, k_btke, v_btke, kv_len_b):
    """Causal attention of right-padded rows through Pallas' TPU splash kernel: flash attention over a block-sparse
    causal mask, never the [T, S] scores. Each kv head's query group is one MQA call, rows and kv heads are
    vmapped, and under a mesh each device runs its own rows and heads in a shard_map (XLA cannot partition a
    Pallas call). T pads to the kernel's 128-wide tiles; real tokens are segment 1 and padding segment 0, so a
    real query sees only its row's real keys and a padding query padding keys. Off a TPU the kernel runs
    interpreted (the tests' CPU form) unless traced for one (`splash_traced_for_tpu`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    t, _, e = q_bthe.shape[1:]
    padded = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK

    def local(q_bthe, k_btke, v_btke, kv_len_b):
        b, _, local_h, _ = q_bthe.shape
        local_k = k_btke.shape[2]
        group = local_h // local_k
        kernel = splash.make_splash_mqa_single_device(
            masks.MultiHeadMask([masks.CausalMask((padded, padded))] * group),
            block_sizes=splash.BlockSizes(*[_SPLASH_BLOCK] * 8),
            interpret=jax.default_backend() != "tpu" and not _SPLASH_FOR_TPU.get())
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q_bkgte = jnp.pad(q_bthe * e**-0.5, pad).astype(q_bthe.dtype).reshape(
            b, padded, local_k, group, e).transpose(0, 2, 3, 1, 4)
        k_bkte, v_bkte = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k_btke, v_btke))
        segment_bt = (jnp.arange(padded)[None] < kv_len_b[:, None]).astype(jnp.int32)

        def row(q_kgte, k_kte, v_kte, segment_t):
            ids = splash.SegmentIds(q=segment_t, kv=segment_t)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_kgte, k_kte, v_kte)

        out_bkgte = jax.vmap(row)(q_bkgte, k_bkte, v_bkte, segment_bt)
        return out_bkgte.transpose(0, 3, 1, 2, 4).reshape(b, padded, local_h * e)[:, :t]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {*BATCH_AXES, "tensor"} <= set(mesh.axis_names):  # not this project's mesh
        return local(q_bthe, k_btke, v_btke, kv_len_b)
    # split as constrain_batch and the q/k/v weights split them: whole where the devices do not divide them
    rows, heads = shard_axes(mesh, BATCH_AXES, q_bthe.shape[0]), shard_axes(mesh, "tensor", k_btke.shape[2])
    qkv = P(rows, None, heads, None)
    return jax.shard_map(local, in_specs=(qkv, qkv, qkv, P(rows)), out_specs=P(rows, None, heads),
                         check_vma=False)(q_bthe, k_btke, v_btke, kv_len_b)


def causal_attention(q_bthe, k_bkes, v_bkse, mask_bts, query_block: int):
    """`attention` of a sequence over itself (key s is the token at query position s, and `mask_bts` is causal), in
    blocks of `query_block` queries, each against the keys up to its own end only: the same result (the keys it
    skips are masked for all of its queries), with half the products and a score block that stays in cache. On the
    CPU, for the demo's training shapes (4 x 1024 tokens, 4 heads of 16), one layer's forward and backward take
    ~60 ms in blocks of 64 vs ~210 ms in one piece. `query_block` 0 (or >= T): one piece."""
    t = q_bthe.shape[1]
    if query_block <= 0 or t <= query_block:
        return attention(q_bthe, k_bkes, v_bkse, mask_bts)
    blocks = []
    for start in range(0, t, query_block):
        end = min(start + query_block, t)
        blocks.append(attention(q_bthe[:, start:end], k_bkes[..., :end], v_bkse[:, :, :end],
                                mask_bts[:, start:end, :end]))
    return jnp.concatenate(blocks, axis=1)


_QUERY_BLOCK = contextvars.ContextVar("causal_query_block", default=None)


@contextlib.contextmanager
def causal_query_blocks(block: int | None):
    """Within this context, programs traced use query blocks of `block` (0: one piece; None: the backend's
    default), e.g. the memory plan, which compiles on the CPU what an accelerator will run."""
    token = _QUERY_BLOCK.set(block)
    try:
        yield
    finally:
        _QUERY_BLOCK.reset(token)


def causal_query_block(t: int) -> int:
    """The query block `causal_attention` uses for a T-token sequence: on the CPU at most 16 blocks of >= 64 queries
    (few enough that the unrolled blocks compile quickly); elsewhere one piece (accelerators: not measured here)."""
    if _QUERY_BLOCK.get() is not None:
        return _QUERY_BLOCK.get()
    if jax.default_backend() != "cpu":
        return 0
    return max(64, -(-t // 16))


ATTENTION_SETTINGS = ("auto", "einsum", "cudnn", "xla", "splash")


def fused_attention_for(setting: str, dtype, backend: str | None = None) -> str | None:
    """A config's `attention` as `use_fused_attention_`'s argument. "auto": cuDNN's flash attention on a GPU in
    bf16/fp16 (cuDNN takes no fp32), else the einsum attention (XLA:CPU and TPU: not measured with a fused kernel
    here); "einsum": always the einsum attention; "cudnn" / "xla": that `jax.nn.dot_product_attention`; "splash":
    Pallas' TPU flash kernel for the decoder (`splash_causal_attention`; interpreted on a CPU, for tests; not run on
    a TPU yet, so "auto" does not pick it). `backend`: where it will run (default: here; the memory plan asks for a
    machine it plans from elsewhere)."""
    if setting not in ATTENTION_SETTINGS:
        raise ValueError(f"attention must be one of {ATTENTION_SETTINGS}, not {setting!r}")
    if backend is None:  # here: a GPU counts when it is NVIDIA's (cuDNN); ROCm's is a "gpu" backend too
        backend = jax.default_backend()
        if backend == "gpu" and "nvidia" not in jax.devices()[0].device_kind.lower():
            backend = "gpu (not NVIDIA)"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    on_gpu = backend == "gpu"
    if setting == "auto":
        return "cudnn" if on_gpu and half else None
    if setting == "cudnn" and not (on_gpu and half):
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU and bfloat16/float16 weights (backend "
                         f"{backend!r}, dtype {jnp.dtype(dtype).name}); use 'auto' or 'einsum'")
    if setting == "splash" and backend not in ("tpu", "cpu"):
        raise ValueError(f"attention='splash' is a TPU kernel (interpreted on a CPU), not for backend {backend!r}; "
                         f"use 'auto' or 'einsum'")
    return None if setting == "einsum" else setting


# ----------------------------------------------------------------------------------------------- vision tower


class VisionPatchEmbed(nnx.Module):
    """The Conv3d whose kernel equals its stride, i.e. one matmul per flattened (C, Tp, P, P) patch."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.proj = _Conv3dParams(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, patches_nlp):
        w = self.proj.weight[...]
        y = jnp.einsum("nlp,dp->nld", patches_nlp.astype(w.dtype), w.reshape(w.shape[0], -1))
        return y + self.proj.bias[...]


class _Conv3dParams(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.weight = nnx.Param(_normal(rngs, shape, dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x_nld, cos_nle, sin_nle, valid_nl, implementation: str | None = None):
        """`implementation`: attend through `jax.nn.dot_product_attention` (each row's valid patches are a prefix,
        so a length per row is its mask); None: the einsum attention, which holds every head's L x L scores."""
        n, l, d = x_nld.shape
        qkv = self.qkv(x_nld).reshape(n, l, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = cos_nle[:, :, None], sin_nle[:, :, None]
        # The rotation is done in float32 whatever the weights' dtype, as transformers does.
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        q = (q32 * cos + rotate_half(q32) * sin).astype(q.dtype)
        k = (k32 * cos + rotate_half(k32) * sin).astype(k.dtype)
        # Each row is one image: attention never crosses images, and padding patches are never attended to.
        if implementation is not None:
            # a padding row (no image) keeps one key so that its output stays finite; it is never read
            kv_len_n = jnp.maximum(valid_nl.sum(axis=1, dtype=jnp.int32), 1)
            out_nlhe = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len_n,
                                                    implementation=implementation)
            return self.proj(out_nlhe.reshape(n, l, d))
        mask_nll = jnp.broadcast_to(valid_nl[:, None, :], (n, l, l))
        return self.proj(attention(q, k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask_nll))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.approximate_gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x):
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=self.approximate_gelu))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, dtype=dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_nld, cos_nle, sin_nle, valid_nl, implementation: str | None = None):
        x_nld = x_nld + self.attn(self.norm1(x_nld), cos_nle, sin_nle, valid_nl, implementation)
        return x_nld + self.mlp(self.norm2(x_nld))


class PatchMerger(nnx.Module):
    """Concatenates each merge block of m^2 patches and projects it to the text width."""

    def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool, dtype, rngs: nnx.Rngs):
        self.unit = cfg.spatial_merge_size**2
        merged = cfg.hidden_size * self.unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(merged if postshuffle_norm else cfg.hidden_size, dtype=dtype)
        self.linear_fc1 = Linear(merged, merged, bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(merged, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x_nld):
        n, l, d = x_nld.shape
        if self.postshuffle_norm:
            x_nmf = self.norm(x_nld.reshape(n, l // self.unit, d * self.unit))
        else:
            x_nmf = self.norm(x_nld).reshape(n, l // self.unit, d * self.unit)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x_nmf), approximate=False))


class VisionModel(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = VisionPatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.pos_embed = Embedding(cfg.num_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle_norm=False, dtype=dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle_norm=True, dtype=dtype, rngs=rngs) for _ in cfg.deepstack_visual_indexes]
        )
        # as TextModel.fused_attention: a high-resolution image's L x L scores per head (16k patches: 1 GiB each in
        # fp32) are what a fused kernel never holds
        self.fused_attention: str | None = None

    def rope(self, rope_hw_nl2):
        """Axial 2D rope: the first half of each head's frequencies follow the row, the second the column."""
        spatial = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
        freqs_nl2f = rope_hw_nl2[..., None].astype(jnp.float32) * inv_freq
        freqs_nlf = freqs_nl2f.reshape(*freqs_nl2f.shape[:2], -1)
        emb_nle = jnp.concatenate([freqs_nlf, freqs_nlf], axis=-1)
        return jnp.cos(emb_nle), jnp.sin(emb_nle)

    def __call__(self, inputs: ModelInputs, remat: bool = False):
        """Merged image tokens [N, M, D_text] and one [N, M, D_text] DeepStack feature per level. `remat`: as the
        decoder's, each block recomputed in the backward pass from its input."""
        x_nld = self.patch_embed(inputs.pixel_patches_nlp)
        taps_nl4d = self.pos_embed(inputs.patch_pos_index_nl4)
        pos_nld = jnp.sum(taps_nl4d * inputs.patch_pos_weight_nl4[..., None].astype(taps_nl4d.dtype), axis=2)
        x_nld = x_nld + pos_nld.astype(x_nld.dtype)
        cos_nle, sin_nle = self.rope(inputs.patch_rope_hw_nl2)
        deepstack = []
        run = nnx.remat(_run_vision_block, static_argnums=(5,)) if remat else _run_vision_block
        for layer, block in enumerate(self.blocks):
            x_nld = constrain_batch(run(block, constrain_batch(x_nld), cos_nle, sin_nle, inputs.patch_valid_nl,
                                        self.fused_attention))
            if layer in self.cfg.deepstack_visual_indexes:
                level = self.cfg.deepstack_visual_indexes.index(layer)
                deepstack.append(self.deepstack_merger_list[level](x_nld))
        return self.merger(x_nld), deepstack


def _run_vision_block(block, x_nld, cos_nle, sin_nle, valid_nl, implementation):
    return block(x_nld, cos_nle, sin_nle, valid_nl, implementation)


# ----------------------------------------------------------------------------------------------- text decoder


def mrope_cos_sin(cfg: TextConfig, position_ids_3bt, dtype):
    """Interleaved multimodal rope: frequency j follows the height axis if j % 3 == 1 (within 3*section[1]),
    the width axis if j % 3 == 2 (within 3*section[2]), and the temporal axis otherwise."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    freqs_3btf = position_ids_3bt[..., None].astype(jnp.float32) * inv_freq
    j = jnp.arange(half)
    _, sec_h, sec_w = cfg.mrope_section
    axis_f = jnp.where((j % 3 == 1) & (j < 3 * sec_h), 1, jnp.where((j % 3 == 2) & (j < 3 * sec_w), 2, 0))
    freqs_btf = jnp.take_along_axis(freqs_3btf, axis_f[None, None, None, :], axis=0)[0]
    emb_bte = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    return jnp.cos(emb_bte).astype(dtype), jnp.sin(emb_bte).astype(dtype)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        e, bias = cfg.head_dim, cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, cfg.num_attention_heads * e, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_key_value_heads * e, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_key_value_heads * e, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_attention_heads * e, cfg.hidden_size, bias=bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(e, cfg.rms_norm_eps, dtype=dtype)  # per head, before the rotation
        self.k_norm = RMSNorm(e, cfg.rms_norm_eps, dtype=dtype)
        self.qkv_proj = None  # q, k and v as one product, in a decoding copy (`fuse_projections_`)

    def fuse_projections_(self):
        self.qkv_proj = nnx.data(Linear.side_by_side([self.q_proj, self.k_proj, self.v_proj]))
        self.q_proj = self.k_proj = self.v_proj = None

    def project(self, x_btd):
        if self.qkv_proj is None:
            return self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        q_size = self.cfg.num_attention_heads * self.cfg.head_dim
        kv_size = self.cfg.num_key_value_heads * self.cfg.head_dim
        return jnp.split(self.qkv_proj(x_btd), [q_size, q_size + kv_size], axis=-1)

    def __call__(self, x_btd, cos_bte, sin_bte, mask_bts, kv=None, write_at_b=None, query_block: int = 0,
                 fused: tuple | None = None):
        """Without `kv`, attends within x. With `kv` = (keys, values) of a cache, writes x's keys and values at
        slots write_at_b + [0, T) and attends over all cache slots; returns the updated (keys, values) too.
        `query_block` > 0: key slot s holds token s (no cache, or an empty one), so `causal_attention`'s blocks.
        `fused` = (implementation, kv_len_b): x's right-padded rows attend over themselves only (no cache, or an
        empty one) through `fused_causal_attention`; `mask_bts` is unused."""
        b, t, _ = x_btd.shape
        e = self.cfg.head_dim
        q_btd, k_btd, v_btd = self.project(x_btd)
        q_bthe = self.q_norm(q_btd.reshape(b, t, -1, e))
        k_btke = self.k_norm(k_btd.reshape(b, t, -1, e))
        v_btke = v_btd.reshape(b, t, -1, e)
        cos, sin = cos_bte[:, :, None], sin_bte[:, :, None]
        q_bthe = q_bthe * cos + rotate_half(q_bthe) * sin
        k_btke = k_btke * cos + rotate_half(k_btke) * sin
        k_bket, v_bkte = k_btke.transpose(0, 2, 3, 1), v_btke.swapaxes(1, 2)
        if kv is not None:
            k_bket = _write_rows(kv[0], k_bket.astype(kv[0].dtype), write_at_b, slot_axis=3)
            v_bkte = _write_rows(kv[1], v_bkte.astype(kv[1].dtype), write_at_b, slot_axis=2)
            kv = (k_bket, v_bkte)
        if fused is not None:
            implementation, kv_len_b = fused
            return self.o_proj(fused_causal_attention(q_bthe, k_btke, v_btke, kv_len_b, implementation)), kv
        return self.o_proj(causal_attention(q_bthe, k_bket, v_bkte, mask_bts, query_block)), kv


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)
        self.gate_up_proj = None  # gate and up as one product, in a decoding copy (`fuse_projections_`)

    def fuse_projections_(self):
        self.gate_up_proj = nnx.data(Linear.side_by_side([self.gate_proj, self.up_proj]))
        self.gate_proj = self.up_proj = None

    def __call__(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = TextAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = TextMLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x_btd, cos_bte, sin_bte, mask_bts, kv=None, write_at_b=None, query_block: int = 0,
                 fused: tuple | None = None):
        attn_btd, kv = self.self_attn(self.input_layernorm(x_btd), cos_bte, sin_bte, mask_bts, kv, write_at_b,
                                      query_block, fused)
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), kv


def _run_layer(decoder_layer, x_btd, cos_bte, sin_bte, mask_bts, query_block: int, implementation, kv_len_b):
    fused = None if implementation is None else (implementation, kv_len_b)
    return decoder_layer(x_btd, cos_bte, sin_bte, mask_bts, query_block=query_block, fused=fused)


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        # jax.nn.dot_product_attention's implementation for a whole-sequence forward of right-padded rows (training,
        # scoring, a prompt into an empty cache); None: this file's einsum attention (`Qwen3VL.use_fused_attention_`)
        self.fused_attention: str | None = None

    def __call__(self, x_btd, position_ids_3bt, attention_mask_bt, vision_index_bt, deepstack_rows_md,
                 cache: KVCache | None = None, remat: bool = False, empty_cache: bool = False):
        """Final-norm hidden states [B, T, D], and the cache with these tokens appended when one is given.

        With a cache, x holds each row's new tokens right-padded (attention_mask_bt marks the real ones); a new
        token attends to the row's cached slots and to the new tokens up to itself. `remat` (training, no cache)
        keeps only each layer's input for the backward pass and recomputes the layer's insides from it.
        `empty_cache` (static): every row's cache is empty (a prompt), so attention can skip future slots in
        causal query blocks as without a cache.
        """
        cos_bte, sin_bte = mrope_cos_sin(self.cfg, position_ids_3bt, x_btd.dtype)
        b, t, _ = x_btd.shape
        query_block = causal_query_block(t) if cache is None or empty_cache else 0
        fused_impl = self.fused_attention if cache is None or empty_cache else None
        kv_len_b = attention_mask_bt.sum(axis=1, dtype=jnp.int32) if fused_impl else None
        fused = None if fused_impl is None else (fused_impl, kv_len_b)
        if fused is not None:
            mask_bts = None  # the fused kernel takes each row's length instead of a [T, S] mask
            write_at_b = None if cache is None else cache.length_b
        elif cache is None:
            causal_tt = jnp.tril(jnp.ones((t, t), bool))
            mask_bts = causal_tt[None] & (attention_mask_bt[:, None, :] > 0)
            write_at_b = None
        else:
            write_at_b = cache.length_b
            visible_bt = write_at_b[:, None] + jnp.arange(t)[None, :] + 1
            mask_bts = jnp.arange(cache.capacity)[None, None, :] < visible_bt[..., None]
        is_vision_bt1 = (vision_index_bt >= 0)[..., None]
        gather_bt = jnp.maximum(vision_index_bt, 0)
        keys, values = [], []
        for layer, decoder_layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[layer], cache.values[layer])
            if remat and cache is None:
                x_btd, kv = nnx.remat(_run_layer, static_argnums=(5, 6))(
                    decoder_layer, constrain_batch(x_btd), cos_bte, sin_bte, mask_bts, query_block, fused_impl,
                    kv_len_b)
            else:
                x_btd, kv = decoder_layer(constrain_batch(x_btd), cos_bte, sin_bte, mask_bts, kv, write_at_b,
                                          query_block, fused)
            x_btd = constrain_batch(x_btd)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
            if layer < len(deepstack_rows_md):
                # DeepStack: features of an earlier vision layer are added to the image tokens' hidden states.
                x_btd = x_btd + jnp.where(is_vision_bt1, deepstack_rows_md[layer][gather_bt], 0).astype(x_btd.dtype)
        if cache is not None:
            real_bt = attention_mask_bt > 0
            last_position_b = jnp.max(jnp.where(real_bt[None], position_ids_3bt, -1), axis=(0, 2))
            cache = KVCache(
                tuple(keys), tuple(values),
                cache.length_b + real_bt.sum(axis=1, dtype=jnp.int32),
                jnp.maximum(cache.next_position_b, last_position_b + 1),
            )
        return self.norm(x_btd), cache


class Qwen3VLModel(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs: nnx.Rngs):
        self.visual = VisionModel(cfg.vision, dtype=dtype, rngs=rngs)
        self.language_model = TextModel(cfg.text, dtype=dtype, rngs=rngs)

    def __call__(self, inputs: ModelInputs, cache: KVCache | None = None, remat: bool = False,
                 empty_cache: bool = False):
        merged_nmd, deepstack_nmd = self.visual(inputs, remat=remat)
        d = merged_nmd.shape[-1]
        vision_rows_md = merged_nmd.reshape(-1, d)
        x_btd = self.language_model.embed_tokens(inputs.input_ids_bt)
        vision_index_bt = inputs.vision_token_index_bt
        from_vision_btd = vision_rows_md[jnp.maximum(vision_index_bt, 0)].astype(x_btd.dtype)
        x_btd = jnp.where((vision_index_bt >= 0)[..., None], from_vision_btd, x_btd)
        deepstack_rows_md = [f.reshape(-1, d) for f in deepstack_nmd]
        return self.language_model(
            x_btd, inputs.position_ids_3bt, inputs.attention_mask_bt, vision_index_bt, deepstack_rows_md, cache,
            remat=remat, empty_cache=empty_cache,
        )

    def decode_step(self, token_ids_bt, cache: KVCache, active_b):
        """Appends text tokens (no images) to the active rows; their positions continue from next_position_b.
        Inactive rows (finished ones) compute but neither advance nor disturb their cache."""
        b, t = token_ids_bt.shape
        x_btd = self.language_model.embed_tokens(token_ids_bt)
        positions_bt = cache.next_position_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        positions_3bt = jnp.broadcast_to(positions_bt[None], (3, b, t))
        no_vision_bt = jnp.full((b, t), -1, jnp.int32)
        mask_bt = jnp.broadcast_to(active_b[:, None], (b, t)).astype(jnp.int32)
        return self.language_model(x_btd, positions_3bt, mask_bt, no_vision_bt, [], cache)


class Qwen3VL(nnx.Module):
    """`Qwen3VLForConditionalGeneration`: the multimodal model plus the (possibly tied) LM head."""

    def __init__(self, cfg: Qwen3VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Qwen3VLModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def lm_head_weight_vd(self):
        if self.lm_head is None:
            return self.model.language_model.embed_tokens.weight[...]
        return self.lm_head.weight[...].T if self.lm_head.in_out else self.lm_head.weight[...]

    def for_decoding(self) -> "Qwen3VL":
        """A copy (new arrays, nothing written back to this model) whose text decoder and LM head hold their
        Linear weights [in, out], with q/k/v and gate/up each fused into one product, so a decode loop multiplies
        by weights laid out once, not on every step.

        A decode step multiplies a few rows by every weight; XLA:CPU's dot does x @ W about 1.5x faster than
        x @ W^T at batch 8, fewer, wider products cost ~15% less than the same work split, and the whole step is
        mostly these products. Same math (layouts only).
        """
        copy = nnx.merge(*nnx.split(self))
        for layer in copy.model.language_model.layers:
            layer.self_attn.fuse_projections_()
            layer.mlp.fuse_projections_()
        for _, module in nnx.iter_modules(copy.model.language_model):
            if isinstance(module, Linear) and not module.in_out:
                module.transpose_()
        if copy.lm_head is not None and not copy.lm_head.in_out:
            copy.lm_head.transpose_()
        return copy

    def use_fused_attention_(self, implementation: str | None):
        """Whole-sequence forwards (training, scoring, prompts into an empty cache) and the vision tower (every
        image) attend through `jax.nn.dot_product_attention(implementation=...)` from now on ("splash": the
        decoder through `splash_causal_attention`); None: this file's einsum attention. Text rows must be
        right-padded, as the trainer's batches and the sampler's chunks are."""
        if implementation not in (None, "xla", "cudnn", "splash"):
            raise ValueError(f"fused attention implementation must be None, 'xla', 'cudnn' or 'splash', not "
                             f"{implementation!r}")
        self.model.language_model.fused_attention = implementation
        # splash is the decoder's causal kernel; the vision tower (bidirectional, head dims of 64-72) keeps einsums
        self.model.visual.fused_attention = None if implementation == "splash" else implementation
        return self

    def hidden_states(self, inputs: ModelInputs, remat: bool = False):
        """Final-norm hidden states [B, T, D] (`remat`: decoder layers and vision blocks recomputed in the backward
        pass)."""
        return self.model(inputs, remat=remat)[0]

    def extend(self, inputs: ModelInputs, cache: KVCache, empty_cache: bool = False):
        """Appends a multimodal chunk (a prompt, or a tool observation with new images) to each row's cache.

        `inputs` holds each row's new tokens right-padded, with rope positions starting at the row's
        next_position (prepare_inputs(..., position_offset_b=cache.next_position_b)). Returns the logits of
        each row's last new token [B, V] (float32) and the cache. A row with no new tokens keeps its cache.
        `empty_cache` (static, a prompt into an empty cache): the same result, attended in causal query blocks.
        """
        h_btd, cache = self.model(inputs, cache, empty_cache=empty_cache)
        last_b = jnp.maximum(inputs.attention_mask_bt.sum(axis=1) - 1, 0)
        h_bd = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)[:, 0]
        return self.logits(h_bd), cache

    def decode_step(self, token_ids_b, cache: KVCache, active_b=None):
        """One sampled token per row in, next-token logits [B, V] (float32) and the cache out."""
        active_b = jnp.ones(token_ids_b.shape, bool) if active_b is None else active_b
        h_btd, cache = self.model.decode_step(token_ids_b[:, None], cache, active_b)
        return self.logits(h_btd[:, 0]), cache

    def logits(self, h_xd):
        if self.lm_head is not None and self.lm_head.in_out:
            return jnp.einsum("...d,dv->...v", h_xd, self.lm_head.weight[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,vd->...v", h_xd, self.lm_head_weight_vd(), preferred_element_type=jnp.float32)

    def forward(self, inputs: ModelInputs):
        """Logits [B, T, V]."""
        h_btd = self.hidden_states(inputs)
        return jnp.einsum("btd,vd->btv", h_btd, self.lm_head_weight_vd())

    def token_logprobs(self, inputs: ModelInputs, targets_bt, *, chunk_size: int = 256, with_entropy: bool = False,
                       remat: bool = False, temperature: float = 1.0):
        """log p(targets_bt[b, t] | tokens <= t), float32 [B, T], without holding [B, T, V] logits (and the
        entropy of p(. | tokens <= t) too, without gradient, when `with_entropy`). p = softmax(logits /
        temperature): the policy a sampler at that temperature draws from, and the log-prob it reports.

        The vocabulary projection and log-softmax run over chunks of positions, each rematerialized in the
        backward pass, so peak memory holds one chunk's logits [B, chunk, V] instead of the whole sequence's.
        With `remat`, the decoder layers are rematerialized too (activations: one layer's at a time).
        """
        h_btd = self.hidden_states(inputs, remat=remat)
        return chunked_token_logprobs(h_btd, self.lm_head_weight_vd(), targets_bt, chunk_size=chunk_size,
                                      with_entropy=with_entropy, temperature=temperature)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, **processor_outputs):
        """Logits [B, T, V] straight from what transformers' Qwen3-VL processor returns (jitted forward)."""
        from axpo_jax.models.qwen3_vl.inputs import prepare_inputs

        inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                                mm_token_type_ids, **processor_outputs)
        return _jitted_forward(self, jax.tree.map(jnp.asarray, inputs))


@jax.jit  # the model as a pytree: nnx.jit's graph mode would walk the module graph on every call
def _jitted_forward(model: Qwen3VL, inputs: ModelInputs):
    return model.forward(inputs)


def chunked_token_logprobs(h_btd, w_vd, targets_bt, *, chunk_size: int = 256, with_entropy: bool = False,
                           temperature: float = 1.0):
    """Per-token log-probs [B, T] of softmax(logits / temperature) (and, with_entropy, that policy's entropy at
    each position, no gradient)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, d = h_btd.shape
    chunk = min(chunk_size, t)
    padded = -(-t // chunk) * chunk
    h_cbkd = jnp.pad(h_btd, ((0, 0), (0, padded - t), (0, 0))).reshape(b, padded // chunk, chunk, d)
    y_cbk = jnp.pad(targets_bt, ((0, 0), (0, padded - t))).reshape(b, padded // chunk, chunk)

    @jax.checkpoint
    def one_chunk(args):
        h_bkd, y_bk = args
        logits_bkv = jnp.einsum("bkd,vd->bkv", h_bkd, w_vd, preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits_bkv = logits_bkv / temperature
        log_z_bk = jax.nn.logsumexp(logits_bkv, axis=-1)
        picked_bk = jnp.take_along_axis(logits_bkv, y_bk[..., None], axis=-1)[..., 0] - log_z_bk
        if not with_entropy:
            return picked_bk
        logits_bkv = jax.lax.stop_gradient(logits_bkv)
        probs_bkv = jax.nn.softmax(logits_bkv, axis=-1)
        entropy_bk = jax.lax.stop_gradient(log_z_bk) - jnp.sum(probs_bkv * logits_bkv, axis=-1)
        return picked_bk, entropy_bk

    out = jax.lax.map(one_chunk, (jnp.moveaxis(h_cbkd, 1, 0), jnp.moveaxis(y_cbk, 1, 0)))
    unchunk = lambda x_cbk: jnp.moveaxis(x_cbk, 0, 1).reshape(b, padded)[:, :t]  # noqa: E731
    return tuple(unchunk(x) for x in out) if with_entropy else unchunk(out)
