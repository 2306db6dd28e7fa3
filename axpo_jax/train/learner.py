"""The jitted update: SFT (masked token NLL) and RL (the clipped policy loss of every stream, + KL).

A step takes a list of micro-batches of one shape: gradients of each are computed by one compiled function and
summed, with every loss normalised by the *whole step's* trained-token count, so accumulation gives exactly the
gradient of the full batch. The optimizer applies the sum once (skipping it when it is not finite).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from axpo_jax.algo.grpo import policy_loss
from axpo_jax.train.batch import TrainBatch
from axpo_jax.train.optimizer import skipped_updates


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = "rl"  # "rl" | "sft"
    eps_low: float = 0.2
    eps_high: float = 0.4
    kl_coef: float = 1e-3  # β; the KL term needs reference log-probs in the batch
    kl_kind: str = "low_var_kl"
    logprob_chunk: int = 256


def _loss(model, batch: TrainBatch, old_logprobs_bt, ref_logprobs_bt, denominator, cfg: LossConfig):
    logp_bt, entropy_bt = model.token_logprobs(batch.inputs, batch.targets_bt, chunk_size=cfg.logprob_chunk,
                                               with_entropy=True)
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


class Learner:
    """Holds the policy and its optimizer; `step` is one update over a list of same-shaped micro-batches."""

    def __init__(self, model, tx, loss: LossConfig = LossConfig(), reference=None):
        self.model = model
        self.reference = reference
        self.loss = loss
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def logprobs(self, batch: TrainBatch, model=None):
        return _logprobs(self.model if model is None else model, batch, self.loss.logprob_chunk)

    def step(self, micro_batches: list[TrainBatch]) -> dict[str, float]:
        """One optimizer update. For RL, the ratio's denominator is recomputed here with the current weights
        (the sampler's log-probs only feed the logged gap), and reference log-probs come from `reference`."""
        denominator = jnp.maximum(sum(float(np.asarray(b.loss_mask_bt).sum()) for b in micro_batches), 1.0)
        total_loss, grads_sum, sums, gaps = 0.0, None, {}, []
        for batch in micro_batches:
            batch = jax.tree.map(jnp.asarray, batch)
            old = ref = jnp.zeros_like(batch.loss_mask_bt)
            if self.loss.kind == "rl":
                old = self.logprobs(batch)
                mask = np.asarray(batch.loss_mask_bt) > 0
                gaps.append(np.abs(np.asarray(old) - np.asarray(batch.sampler_logprobs_bt))[mask])
                if self.loss.kl_coef:
                    if self.reference is None:
                        raise ValueError("kl_coef > 0 needs a reference model")
                    ref = self.logprobs(batch, self.reference)
            loss, metrics, grads = _grads(self.model, batch, old, ref, denominator, self.loss)
            total_loss += float(loss)
            grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
            micro_tokens = float(np.asarray(batch.loss_mask_bt).sum())
            for key, value in metrics.items():
                _accumulate(sums, key, float(value), micro_tokens / float(denominator))
        grad_norm = float(_apply(self.optimizer, self.model, grads_sum))
        out = {"loss": total_loss, "grad_norm": grad_norm, "trained_tokens": float(denominator),
               "skipped_updates": skipped_updates(self.optimizer.opt_state), **sums}
        if gaps:
            gap = np.concatenate(gaps)
            out["sampler_trainer_logprob_gap"] = float(gap.max()) if gap.size else 0.0
        return out


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
