"""Mode `bench_update`: the jitted RL update step against the same loss + AdamW in PyTorch on transformers' model.

    python launch.py --config configs/bench.py:update [--config.preset=small --config.batch=2 ...]

Both sides hold identical float32 weights (`forward.build_models`) and get the same batch (`forward.make_batch`:
`batch` rows of `seq_len` tokens with `num_images` images each), a loss mask on the second half of each row's
predictions and one random advantage per row (broadcast over its trained tokens). A step is one on-policy update
(the rl mode's `updates_per_step=1`): π_old is the policy being trained, so the ratio is 1.

One step, on each side, does the same work:
  JAX   - `Learner.step([batch])` with `LossConfig(kind="rl", kl_coef=kl_coef)` and `make_optimizer(learning_rate=
          1e-5, total_steps=100)`: the jitted value_and_grad of the policy loss (old log-probs = the stop-gradient
          of the new ones; DAPO clip ε_low .2 / ε_high .4, token-mean; entropy as a no-grad metric), then the
          jitted AdamW update (global-norm clip 1.0, skipped if not finite).
  torch - forward + backward of the same loss written in torch (log_softmax gather, old log-probs detached from
          the new ones, clamped log-ratio, clipped surrogate, token-mean over the mask; the no-grad entropy too),
          `clip_grad_norm_(1.0)` and a `torch.optim.AdamW` step (lr 1e-5, no weight decay).
With `kl_coef > 0` both add β·low_var_kl against a frozen copy of the initial weights (one more no-grad forward).

The first step of each (on the same weights) must agree: the loss to `max_loss_rel_diff` (1e-4) relative, the
log-probs of the initial weights (a no-grad forward of each, before the first step) on trained tokens to
`max_logprob_diff` (1e-4) absolute and the pre-clip gradient norm to `max_grad_norm_rel_diff` (1e-3) relative;
otherwise `BenchError` is raised after the record has been written to stderr. (At ratio 1 the loss is −mean(A)
over trained tokens whatever the model, so the log-prob and gradient norm checks are the ones that show both sides
compute the same thing.) Both are warmed up (the JAX compile is reported separately) and timed over `repeats`
interleaved steps; the record holds the median seconds, trained and all tokens/s of each, the JAX/torch ratio and,
on a device of bench/devices.py's table, the MFU of each.
On an accelerator: `torch_device="auto"` (CUDA when JAX and torch both see a GPU), `dtype="bfloat16"`,
`preset="2b"`, and the three agreement checks loosened to bf16 rounding.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from axpo_jax.bench.forward import (
    BenchError,
    _load_average,
    _time,
    build_models,
    hf_config_dict,
    host_info,
    host_loaded,
    make_batch,
    torch_device_for,
)

_MODE = "bench_update"


def _log(message: str) -> None:
    print(f"[{_MODE}] {message}", file=sys.stderr, flush=True)


def _fail_unless(ok: bool, record: dict, message: str) -> None:
    if not ok:
        import json

        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        raise BenchError(message)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def rl_arrays(input_ids: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    """Prediction-aligned targets, loss mask (second half of each row's predictions: positions T//2 .. T-2, the
    last position has no target), one standard-normal advantage per row broadcast over its trained tokens."""
    rows, length = input_ids.shape
    targets = np.concatenate([input_ids[:, 1:], np.zeros((rows, 1), input_ids.dtype)], axis=1).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    mask[:, length // 2 : length - 1] = 1.0
    adv_b = np.random.default_rng(seed + 1).standard_normal(rows).astype(np.float32)
    return dict(targets_bt=targets, loss_mask_bt=mask, advantages_bt=adv_b[:, None] * mask)


def torch_policy_loss(logp, old, adv, mask, *, eps_low: float, eps_high: float, ref=None, kl_coef: float = 0.0,
                      log_ratio_clamp: float = 20.0):
    """`grpo.policy_loss` (token-mean, low_var_kl) in torch."""
    import torch

    log_ratio = torch.clamp(logp - old, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    pg_tok = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    denom = torch.clamp(mask.sum(), min=1.0)
    loss = (pg_tok * mask).sum() / denom
    if ref is not None and kl_coef:
        d = torch.clamp(ref - logp, -20.0, 20.0)
        kl_tok = torch.clamp(torch.expm1(d) - d, max=10.0)
        loss = loss + kl_coef * (kl_tok * mask).sum() / denom
    return loss


def run(config) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise BenchError(f"bench_update compares against transformers' PyTorch model; pip install -e '.[test]' "
                         f"({e})") from None

    import jax
    import jax.numpy as jnp

    from axpo_jax.models import qwen3_vl
    from axpo_jax.train.batch import TrainBatch
    from axpo_jax.train.learner import Learner, LossConfig
    from axpo_jax.train.optimizer import make_optimizer

    preset = str(config.preset)
    batch, seq_len = int(config.batch), int(config.seq_len)
    num_images, image_size = int(config.num_images), int(config.image_size)
    repeats = max(1, int(config.repeats))
    seed = int(config.get("seed", 0))
    kl_coef = float(config.get("kl_coef", 0.0))
    lr = float(config.get("learning_rate", 1e-5))
    max_loss_rel = float(config.get("max_loss_rel_diff", 1e-4))
    max_logprob_diff = float(config.get("max_logprob_diff", 1e-4))
    max_gnorm_rel = float(config.get("max_grad_norm_rel_diff", 1e-3))
    threads = int(config.get("torch_threads", 0)) or os.cpu_count() or 1
    dtype, device = str(config.get("dtype", "float32")), torch_device_for(str(config.get("torch_device", "cpu")))

    hf = hf_config_dict(preset)
    inputs_np, image_tokens = make_batch(hf, batch=batch, seq_len=seq_len, num_images=num_images,
                                         image_size=image_size, seed=seed)
    rl = rl_arrays(inputs_np["input_ids"], seed=seed)

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    hf_model, flax_model, num_params = build_models(preset, seed, log=_log, torch_device=device, dtype=dtype)
    setup_s = time.perf_counter() - t0
    attention = qwen3_vl.fused_attention_for(str(config.get("attention", "auto")), dtype)
    flax_model.use_fused_attention_(attention)  # before the reference copy below, which keeps it

    # ---- JAX: the real Learner
    loss_cfg = LossConfig(kind="rl", kl_coef=kl_coef)
    reference = None
    if kl_coef:
        from flax import nnx

        graphdef, state = nnx.split(flax_model)
        reference = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    learner = Learner(flax_model, make_optimizer(learning_rate=lr, total_steps=100), loss_cfg, reference=reference)

    def make_train_batch():
        # made in every timed step: transformers' forward computes its rope positions and vision indices each call
        prepared = qwen3_vl.prepare_inputs(flax_model.config, **inputs_np)
        return jax.tree.map(jnp.asarray, TrainBatch(
            prepared, rl["targets_bt"], rl["loss_mask_bt"], rl["advantages_bt"], np.zeros_like(rl["loss_mask_bt"])))

    jax_first_old = np.asarray(learner.logprobs(make_train_batch()))  # before any update: for the log-prob check
    jax_results: list[dict] = []

    def jax_step():
        jax_results.append(learner.step([make_train_batch()]))

    # ---- torch: the same step on transformers' model
    torch_inputs = {k: torch.from_numpy(v).to(device) for k, v in inputs_np.items()}
    targets = torch.from_numpy(rl["targets_bt"]).long().to(device)
    mask = torch.from_numpy(rl["loss_mask_bt"]).to(device)
    adv = torch.from_numpy(rl["advantages_bt"]).to(device)
    ref_model = copy.deepcopy(hf_model).eval().requires_grad_(False) if kl_coef else None
    params = [p for p in hf_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    torch_results: list[dict] = []

    def token_logprobs(model, with_entropy=False):
        logits = model(**torch_inputs).logits.float()
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, targets[..., None])[..., 0]
        if not with_entropy:
            return logp, None
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
            ent = (ent * mask).sum() / torch.clamp(mask.sum(), min=1.0)
        return logp, ent

    with torch.no_grad():  # before any update: for the log-prob check
        torch_first_old = token_logprobs(hf_model)[0].float().cpu().numpy()

    def torch_step():
        with torch.no_grad():
            ref = token_logprobs(ref_model)[0] if ref_model is not None else None
        opt.zero_grad(set_to_none=True)
        logp, _ = token_logprobs(hf_model, with_entropy=True)
        loss = torch_policy_loss(logp, logp.detach(), adv, mask, eps_low=loss_cfg.eps_low,
                                 eps_high=loss_cfg.eps_high, ref=ref, kl_coef=kl_coef)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(grad_norm):
            opt.step()
        # float() and .cpu() wait for the device, so a timed step ends when its work does
        torch_results.append(dict(loss=float(loss.detach()), grad_norm=float(grad_norm)))

    # ---- warm-up: the first step of each is on the initial weights, so they must agree
    _log(f"torch warm-up ({threads} threads)")
    start = time.perf_counter()
    torch_step()
    torch_warmup_s = time.perf_counter() - start
    _log("jax compile + first step")
    start = time.perf_counter()
    jax_step()
    jax_first_s = time.perf_counter() - start

    t_first, j_first = torch_results[0], jax_results[0]
    loss_rel = abs(j_first["loss"] - t_first["loss"]) / max(abs(t_first["loss"]), 1e-12)
    trained = rl["loss_mask_bt"] > 0
    logprob_diff = float(np.max(np.abs(jax_first_old[trained] - torch_first_old[trained])))
    gnorm_rel = abs(j_first["grad_norm"] - t_first["grad_norm"]) / max(t_first["grad_norm"], 1e-12)
    _log(f"first step: loss jax {j_first['loss']:.7g} torch {t_first['loss']:.7g} (rel {loss_rel:.2g}); "
         f"grad norm jax {j_first['grad_norm']:.7g} torch {t_first['grad_norm']:.7g} (rel {gnorm_rel:.2g}); "
         f"max |old log-prob diff| {logprob_diff:.2g}")
    # Second warm-up calls: torch's lazy allocations, and `_apply` compiles a second time (the optimizer state
    # that optax.init creates is uncommitted, the state `_apply` returns is committed to the device, and jit
    # keys its cache on that), so the first timed step would otherwise include a compile.
    torch_step()
    jax_step()

    _log(f"timing {repeats} steps each of torch and jax, interleaved")
    load_before = _load_average()
    torch_times, jax_times = [], []
    for _ in range(repeats):
        torch_times += _time(torch_step, 1)
        jax_times += _time(jax_step, 1)
    load_after = _load_average()

    tokens = batch * seq_len
    trained_tokens = int(rl["loss_mask_bt"].sum())
    torch_median, jax_median = statistics.median(torch_times), statistics.median(jax_times)
    noisy = max(max(t) / min(t) for t in (torch_times, jax_times)) > 1.5
    if noisy:
        _log("warning: timings are noisy (a run took > 1.5x the fastest one; other load on the host?)")
    loaded = host_loaded(load_before, load_after, log=_log)
    jax_compile_s = max(0.0, jax_first_s - jax_median)
    ok = loss_rel < max_loss_rel and logprob_diff < max_logprob_diff and gnorm_rel < max_gnorm_rel
    # MFU: 6 x matmul weights + attention FLOPs per token of the forward+backward (bench/record.py), counted over
    # every token of the batch (with kl_coef > 0 the step also runs a no-grad reference forward, left uncounted, as
    # in the usual definition: model FLOPs of the training step proper).
    from axpo_jax.bench import devices as device_table
    from axpo_jax.bench.record import mfu, train_flops_per_token

    flops_per_token = train_flops_per_token(flax_model.config.text, seq_len)
    spec = device_table.lookup(jax.devices()[0].device_kind)
    peak = spec.peak_bf16_flops if spec else None
    record = dict(
        mode=_MODE,
        preset=preset,
        dtype=dtype,
        attention=attention or "einsum",
        jax_device=jax.devices()[0].device_kind,
        torch_device=device,
        num_params=int(num_params),
        batch=batch,
        seq_len=seq_len,
        num_images_per_sample=num_images,
        image_size=image_size,
        image_tokens_per_image=image_tokens,
        tokens=tokens,
        trained_tokens=trained_tokens,
        kl_coef=kl_coef,
        repeats=repeats,
        setup_s=round(setup_s, 3),
        torch_warmup_s=round(torch_warmup_s, 4),
        jax_first_step_s=round(jax_first_s, 3),
        jax_compile_s=round(jax_compile_s, 3),
        torch_median_s=round(torch_median, 5),
        jax_median_s=round(jax_median, 5),
        torch_times_s=[round(t, 5) for t in torch_times],
        jax_times_s=[round(t, 5) for t in jax_times],
        torch_min_s=round(min(torch_times), 5),
        jax_min_s=round(min(jax_times), 5),
        torch_trained_tokens_per_s=round(trained_tokens / torch_median, 1),
        jax_trained_tokens_per_s=round(trained_tokens / jax_median, 1),
        torch_tokens_per_s=round(tokens / torch_median, 1),
        jax_tokens_per_s=round(tokens / jax_median, 1),
        jax_over_torch_tokens_per_s=round(torch_median / jax_median, 3),
        jax_over_torch_best_run=round(min(torch_times) / min(jax_times), 3),
        train_flops_per_token=int(flops_per_token),
        peak_bf16_flops=peak,
        jax_mfu=_round(mfu(flops_per_token, tokens / jax_median, 1, peak)),
        # only when torch runs on the device the peak is of (torch_device="cpu" on a GPU host has another peak)
        torch_mfu=_round(mfu(flops_per_token, tokens / torch_median, 1, peak)) if str(device) != "cpu" else None,
        first_loss_jax=j_first["loss"],
        first_loss_torch=t_first["loss"],
        loss_rel_diff=loss_rel,
        first_grad_norm_jax=j_first["grad_norm"],
        first_grad_norm_torch=t_first["grad_norm"],
        grad_norm_rel_diff=gnorm_rel,
        max_abs_old_logprob_diff=logprob_diff,
        agreement_ok=ok,
        jax_skipped_updates=int(jax_results[-1]["skipped_updates"]),
        noisy=noisy,
        host_loaded=loaded,
        host=host_info(load_before, load_after),
    )
    _log(f"torch {record['torch_tokens_per_s']:.0f} tok/s, jax {record['jax_tokens_per_s']:.0f} tok/s "
         f"(jax/torch {record['jax_over_torch_tokens_per_s']:.2f}x median, "
         f"{record['jax_over_torch_best_run']:.2f}x best run), jax compile {jax_compile_s:.2f}s")
    _fail_unless(ok, record,
                 f"JAX and torch disagree at the first update step (loss rel {loss_rel:.3g} >= {max_loss_rel:g}, "
                 f"or old log-probs {logprob_diff:.3g} >= {max_logprob_diff:g}, or grad norm rel {gnorm_rel:.3g} "
                 f">= {max_gnorm_rel:g}): the two steps do not compute the same thing, so the timings mean nothing")
    return record
