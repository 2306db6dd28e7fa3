"""The jitted update: SFT (masked token NLL) and RL (the clipped policy loss of every stream, + KL).

A step takes a list of micro-batches of one shape and makes one or more optimizer updates over runs of them. Within
an update, gradients of each micro-batch are computed by one compiled function and summed, with every loss
normalised by the *update's* trained-token count (or, for an RL loss aggregated per sequence, its trained rows),
so accumulation gives exactly the gradient of that whole batch; the optimizer applies the sum once (skipping it
when it is not finite).

RL: π_old of the clipped ratio is the policy that sampled the rows, i.e. the weights before the step's first update.
During the first update those are the weights being trained, so ρ = exp(logp - stop_gradient(logp)) = 1 and no
extra forward runs; the later updates' micro-batches get their π_old log-probs from one no-grad forward each before
the first update, and only there can the clip bind.

Multi-host: each process passes its own rows; they are assembled into global arrays over the mesh, so the loss,
the token-count denominator and every metric are the global batch's (what one process with every row computes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from axpo_jax.algo.grpo import AGGREGATIONS, KL_KINDS, policy_loss
from axpo_jax.parallel import distributed
from axpo_jax.train.batch import TrainBatch, batch_shape, device_batch, pad_batch
from axpo_jax.train.optimizer import skipped_updates


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = "rl"  # "rl" | "sft"
    eps_low: float = 0.2
    eps_high: float = 0.4
    kl_coef: float = 1e-3  # β; the KL term needs reference log-probs in the batch
    kl_kind: str = "low_var_kl"
    # RL: how per-token losses make the batch's loss (grpo.aggregate; the paper is silent): "token-mean" (DAPO:
    # every trained token of the update weighs the same), "seq-mean-token-mean" (each response weighs the same),
    # "seq-mean-token-sum". Over every micro-batch of an update, as if it were one batch.
    aggregation: str = "token-mean"
    logprob_chunk: int = 256
    remat: bool = False  # recompute each decoder layer and vision block in the backward pass (memory: one layer's)
    # RL: the rollouts' sampling temperature. Every log-prob of the loss (π, π_old, the reference) is of
    # softmax(logits / temperature), the policy the rows were drawn from and whose log-probs the sampler reports;
    # at 1.0 it is the model's own. (verl scales the actor's and the reference's logits the same way.)
    temperature: float = 1.0

    def __post_init__(self):
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"LossConfig.kl_kind must be one of {KL_KINDS}, got {self.kl_kind!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not self.temperature > 0:
            raise ValueError(f"LossConfig.temperature must be > 0 (the rollouts' sampling temperature; greedy "
                             f"rollouts report the model's own log-probs: 1.0), got {self.temperature}")


def _loss(model, batch: TrainBatch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg: LossConfig):
    """`old_logprobs_bt` None: π_old is the policy being trained (the step's first update)."""
    logp_bt, entropy_bt = model.token_logprobs(batch.inputs, batch.targets_bt, chunk_size=cfg.logprob_chunk,
                                               with_entropy=True, remat=cfg.remat, temperature=cfg.temperature)
    mask = batch.loss_mask_bt
    # token-mean over this micro-batch's trained tokens (combined across micro-batches by token share)
    entropy = (entropy_bt * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if cfg.kind == "sft":
        nll = -(logp_bt * mask).sum() / denominator
        return nll, {"entropy": entropy}
    if old_logprobs_bt is None:
        old_logprobs_bt = jax.lax.stop_gradient(logp_bt)
    loss, metrics = policy_loss(
        logp_bt, old_logprobs_bt, batch.advantages_bt, mask, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, aggregation=cfg.aggregation, denominator=denominator,
        logp_ref_bt=ref_logprobs_bt if cfg.kl_coef else None, kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind,
    )
    # the sampler's and the trainer's log-probs of the same weights (π_old): how far apart the two programs compute
    gap = jnp.max(jnp.where(mask > 0, jnp.abs(old_logprobs_bt - batch.sampler_logprobs_bt), 0.0))
    return loss, {**metrics, "entropy": entropy, "sampler_trainer_logprob_gap": gap}


# The model goes into the jitted functions as a pytree (nnx modules are pytrees): nnx.jit's graph mode walks the
# module graph on every call, ~70 ms for Qwen3-VL-2B's 626 variables (~150 ms with the optimizer's), and a step
# makes several calls per micro-batch; plain jax.jit flattens it in ~2 ms. `_apply` writes the model and the
# optimizer back, so it runs in nnx.jit's tree mode (~17 ms there), which does.
@functools.partial(jax.jit, static_argnames="cfg")
def _grads(model, batch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg: LossConfig):
    (loss, metrics), grads = nnx.value_and_grad(_loss, has_aux=True)(
        model, batch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg
    )
    return loss, metrics, grads


@functools.partial(jax.jit, donate_argnums=0)
def _add_grads(grads_sum, grads):
    # in place: the sum and one micro-batch's gradients are the only gradient trees alive (a plain tree add holds
    # a third until the old sum is dropped)
    return jax.tree.map(jnp.add, grads_sum, grads)


@nnx.jit(graph=False)
def _apply(optimizer, model, grads):
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    optimizer.update(model, grads)
    return grad_norm


@functools.partial(jax.jit, static_argnames=("chunk", "temperature"))
def _logprobs(model, batch: TrainBatch, chunk: int, temperature: float):
    return model.token_logprobs(batch.inputs, batch.targets_bt, chunk_size=chunk, temperature=temperature)


@jax.jit
def _trained_tokens(loss_mask_bt):
    return jnp.sum(loss_mask_bt)


@jax.jit
def _trained_rows(loss_mask_bt):
    return jnp.sum(jnp.any(loss_mask_bt > 0, axis=1))


class Learner:
    """Holds the policy and its optimizer; `step` is one update over a list of same-shaped micro-batches.

    With a `mesh`, micro-batches hold this process's rows (every process passes the same number of micro-batches)
    and become global arrays split over the mesh's batch axes; shapes are agreed across processes by padding, and
    the loss, token counts and metrics are those of the global batch. The model (and `reference`) must already
    live on the mesh (`from_pretrained(..., mesh=mesh)`). Without a mesh everything stays on one device.
    """

    def __init__(self, model, tx, loss: LossConfig = LossConfig(), reference=None, mesh=None):
        if mesh is None and jax.process_count() > 1:
            raise ValueError(f"{jax.process_count()} processes: the Learner needs the mesh the model lives on")
        self.model = model
        self.reference = reference
        self.loss = loss
        self.mesh = mesh
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        if mesh is not None:
            _replicate_unplaced(self.optimizer, mesh)
        else:  # optax.init's state is uncommitted, `_apply`'s output committed: jit would compile a second time
            nnx.update(self.optimizer, jax.device_put(nnx.state(self.optimizer), jax.devices()[0]))

    def device_batch(self, batch: TrainBatch) -> TrainBatch:
        """This process's host rows -> the batch the jitted update reads (global over the mesh when there is one)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return device_batch(batch, self.mesh, spatial_merge_size=self.model.config.vision.spatial_merge_size)

    def logprobs(self, batch: TrainBatch, model=None):
        """Log-probs of `batch`'s targets under the policy (or `model`) at the loss's temperature."""
        return _logprobs(self.model if model is None else model, batch, self.loss.logprob_chunk,
                         self.loss.temperature)

    def _agreed(self, micro_batches: list[TrainBatch]) -> list[TrainBatch]:
        """Pads every micro-batch to the largest (tokens, image rows, patches) of any of them on any process."""
        distributed.assert_same(len(micro_batches), "the number of micro-batches in a step")
        shapes = np.array([batch_shape(b) for b in micro_batches])
        length, rows, patches = (int(v) for v in distributed.max_across_processes(shapes.max(axis=0)))
        # image rows split over the batch axes like the token rows: a host with more batch devices than a
        # micro-batch has images (4 text rows' worth on 8 GPUs) must pad them to its share of the devices
        rows = distributed.data_shard(self.mesh).round_rows(rows)
        merge = self.model.config.vision.spatial_merge_size
        return [pad_batch(b, length=length, num_image_rows=rows, patches_per_image=patches,
                          spatial_merge_size=merge) for b in micro_batches]

    def step(self, micro_batches: list[TrainBatch], updates: int = 1) -> dict[str, float]:
        """`updates` optimizer updates, one after another over equal runs of consecutive micro-batches (the first
        len // updates micro-batches make the first update, ...). Metrics of several updates are combined
        (`combine_updates`). RL: π_old is the policy before the first update (module docstring), and reference
        log-probs come from `reference`."""
        if updates < 1 or len(micro_batches) % updates:
            raise ValueError(f"{len(micro_batches)} micro-batches cannot make {updates} updates of equal runs")
        # one shape for the whole step (and, multi-host, every process): micro-batches with fewer images would each
        # compile the update again
        micro_batches = self._agreed(micro_batches)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            batches = [self.device_batch(b) for b in micro_batches]
            per_update = len(batches) // updates
            # the later updates' π_old: the weights that sampled the rows, i.e. these, before the first update
            later_old = [self.logprobs(b) for b in batches[per_update:]] if self.loss.kind == "rl" else None
            results = []
            for u in range(updates):
                run = slice(u * per_update, (u + 1) * per_update)
                old = later_old[(u - 1) * per_update: u * per_update] if u and later_old else None
                results.append(self._update(batches[run], old))
            return combine_updates(results)

    def _update(self, micro_batches: list[TrainBatch], old_logprobs: list | None) -> dict[str, float]:
        # token counts of the global batch: every normalisation below is by the whole update's trained tokens, or
        # (an RL loss aggregated per sequence) its trained rows
        micro_tokens = [float(_trained_tokens(b.loss_mask_bt)) for b in micro_batches]
        denominator = jnp.maximum(sum(micro_tokens), 1.0)
        loss_denominator = denominator
        if self.loss.kind == "rl" and self.loss.aggregation != "token-mean":
            loss_denominator = jnp.maximum(sum(float(_trained_rows(b.loss_mask_bt)) for b in micro_batches), 1.0)
        grads_sum, per_micro_batch = None, []
        for i, batch in enumerate(micro_batches):
            old = None if old_logprobs is None else old_logprobs[i]
            ref = None
            if self.loss.kind == "rl" and self.loss.kl_coef:
                if self.reference is None:
                    raise ValueError("kl_coef > 0 needs a reference model")
                ref = self.logprobs(batch, self.reference)
            loss, metrics, grads = _grads(self.model, batch, old, ref, loss_denominator, self.loss)
            per_micro_batch.append((loss, metrics))
            grads_sum = grads if grads_sum is None else _add_grads(grads_sum, grads)
        grad_norm = _apply(self.optimizer, self.model, grads_sum)
        # read back once, after every program of the update is queued: a read per micro-batch would leave the
        # device idle while the host prepares the next one
        per_micro_batch, grad_norm = jax.device_get((per_micro_batch, grad_norm))
        total_loss, sums = 0.0, {}
        for (loss, metrics), tokens in zip(per_micro_batch, micro_tokens):
            total_loss += float(loss)
            for key, value in metrics.items():
                _accumulate(sums, key, float(value), tokens / float(denominator))
        return {"loss": total_loss, "grad_norm": float(grad_norm), "trained_tokens": float(denominator),
                "skipped_updates": skipped_updates(self.optimizer.opt_state), **sums}


def combine_updates(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its updates': trained tokens summed, extremes (ratio_max / ratio_min, the log-prob
    gap) taken over all, the optimizer's skip counter as it stands after the last, grad_norm averaged, every other
    metric (each a token mean of its update) weighted by the updates' trained tokens; plus the number of updates."""
    if len(per_update) == 1:
        return {**per_update[0], "updates": 1}
    tokens = np.array([m["trained_tokens"] for m in per_update])
    weights = tokens / max(tokens.sum(), 1.0)
    out = {}
    for key in per_update[0]:
        values = [m[key] for m in per_update]
        if key == "trained_tokens":
            out[key] = float(tokens.sum())
        elif key in ("ratio_max", "sampler_trainer_logprob_gap"):
            out[key] = max(values)
        elif key == "ratio_min":
            out[key] = min(values)
        elif key == "skipped_updates":
            out[key] = values[-1]
        elif key == "grad_norm":
            out[key] = float(np.mean(values))
        else:
            out[key] = float(np.dot(weights, values))
    return {**out, "updates": len(per_update)}


def _replicate_unplaced(module, mesh) -> None:
    """Puts every array of `module` that is not laid out over `mesh` (the optimizer's step counters, created on
    one local device) on the mesh, replicated, so jitted updates and checkpoints see only global arrays."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and not (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh):
            return jax.device_put(x, replicated)
        return x

    nnx.update(module, jax.tree.map(place, nnx.state(module)))


# How each micro-batch metric combines into the step's: already divided by the step's token count -> sum;
# extremes -> max / min; per-micro token means -> weighted by the micro-batch's share of trained tokens.
_SUMMED = ("pg_loss", "kl")


def _accumulate(sums: dict, key: str, value: float, token_share: float) -> None:
    if key == "n_tokens":
        return
    if key in ("ratio_max", "sampler_trainer_logprob_gap"):
        sums[key] = max(sums.get(key, -np.inf), value)
    elif key == "ratio_min":
        sums[key] = min(sums.get(key, np.inf), value)
    else:
        sums[key] = sums.get(key, 0.0) + (value if key in _SUMMED else value * token_share)
