"""The jitted update: SFT (masked token NLL) and RL (the clipped policy loss of every stream, + KL).

A step takes a list of micro-batches of one shape: gradients of each are computed by one compiled function and
summed, with every loss normalised by the *whole step's* trained-token count, so accumulation gives exactly the
gradient of the full batch. The optimizer applies the sum once (skipping it when it is not finite).

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

from axpo_jax.algo.grpo import policy_loss
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
    logprob_chunk: int = 256
    remat: bool = False  # recompute each decoder layer in the backward pass (activation memory: one layer's)


def _loss(model, batch: TrainBatch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg: LossConfig):
    logp_bt, entropy_bt = model.token_logprobs(batch.inputs, batch.targets_bt, chunk_size=cfg.logprob_chunk,
                                               with_entropy=True, remat=cfg.remat)
    mask = batch.loss_mask_bt
    # token-mean over this micro-batch's trained tokens (combined across micro-batches by token share)
    entropy = (entropy_bt * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if cfg.kind == "sft":
        nll = -(logp_bt * mask).sum() / denominator
        return nll, {"entropy": entropy}
    loss, metrics = policy_loss(
        logp_bt, old_logprobs_bt, batch.advantages_bt, mask, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, aggregation="token-mean", denominator=denominator,
        logp_ref_bt=ref_logprobs_bt if cfg.kl_coef else None, kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind,
    )
    return loss, {**metrics, "entropy": entropy}


@functools.partial(nnx.jit, static_argnames="cfg")
def _grads(model, batch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg: LossConfig):
    (loss, metrics), grads = nnx.value_and_grad(_loss, has_aux=True)(
        model, batch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg
    )
    return loss, metrics, grads


@nnx.jit
def _apply(optimizer, model, grads):
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    optimizer.update(model, grads)
    return grad_norm


@functools.partial(nnx.jit, static_argnames="chunk")
def _logprobs(model, batch: TrainBatch, chunk: int):
    return model.token_logprobs(batch.inputs, batch.targets_bt, chunk_size=chunk)


@jax.jit
def _trained_tokens(loss_mask_bt):
    return jnp.sum(loss_mask_bt)


@jax.jit
def _largest_gap(logprobs_bt, sampler_logprobs_bt, loss_mask_bt):
    """max |recomputed - sampler| log-prob over trained tokens (0 without any)."""
    return jnp.max(jnp.where(loss_mask_bt > 0, jnp.abs(logprobs_bt - sampler_logprobs_bt), 0.0))


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

    def device_batch(self, batch: TrainBatch) -> TrainBatch:
        """This process's host rows -> the batch the jitted update reads (global over the mesh when there is one)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return device_batch(batch, self.mesh, spatial_merge_size=self.model.config.vision.spatial_merge_size)

    def logprobs(self, batch: TrainBatch, model=None):
        return _logprobs(self.model if model is None else model, batch, self.loss.logprob_chunk)

    def _agreed(self, micro_batches: list[TrainBatch]) -> list[TrainBatch]:
        """Pads every micro-batch to the largest (tokens, image rows, patches) of any of them on any process."""
        distributed.assert_same(len(micro_batches), "the number of micro-batches in a step")
        shapes = np.array([batch_shape(b) for b in micro_batches])
        length, rows, patches = (int(v) for v in distributed.max_across_processes(shapes.max(axis=0)))
        merge = self.model.config.vision.spatial_merge_size
        return [pad_batch(b, length=length, num_image_rows=rows, patches_per_image=patches,
                          spatial_merge_size=merge) for b in micro_batches]

    def step(self, micro_batches: list[TrainBatch]) -> dict[str, float]:
        """One optimizer update. For RL, the ratio's denominator is recomputed here with the current weights
        (the sampler's log-probs only feed the logged gap), and reference log-probs come from `reference`."""
        if self.mesh is not None:
            micro_batches = self._agreed(micro_batches)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return self._step([self.device_batch(b) for b in micro_batches])

    def _step(self, micro_batches: list[TrainBatch]) -> dict[str, float]:
        # token counts of the global batch: every normalisation below is by the whole step's trained tokens
        micro_tokens = [float(_trained_tokens(b.loss_mask_bt)) for b in micro_batches]
        denominator = jnp.maximum(sum(micro_tokens), 1.0)
        total_loss, grads_sum, sums, gaps = 0.0, None, {}, []
        for batch, tokens in zip(micro_batches, micro_tokens):
            old = ref = jnp.zeros_like(batch.loss_mask_bt)
            if self.loss.kind == "rl":
                old = self.logprobs(batch)
                gaps.append(float(_largest_gap(old, batch.sampler_logprobs_bt, batch.loss_mask_bt)))
                if self.loss.kl_coef:
                    if self.reference is None:
                        raise ValueError("kl_coef > 0 needs a reference model")
                    ref = self.logprobs(batch, self.reference)
            loss, metrics, grads = _grads(self.model, batch, old, ref, denominator, self.loss)
            total_loss += float(loss)
            grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
            for key, value in metrics.items():
                _accumulate(sums, key, float(value), tokens / float(denominator))
        grad_norm = float(_apply(self.optimizer, self.model, grads_sum))
        out = {"loss": total_loss, "grad_norm": grad_norm, "trained_tokens": float(denominator),
               "skipped_updates": skipped_updates(self.optimizer.opt_state), **sums}
        if gaps:
            out["sampler_trainer_logprob_gap"] = max(gaps)
        return out


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
    if key == "ratio_max":
        sums[key] = max(sums.get(key, -np.inf), value)
    elif key == "ratio_min":
        sums[key] = min(sums.get(key, np.inf), value)
    else:
        sums[key] = sums.get(key, 0.0) + (value if key in _SUMMED else value * token_share)
