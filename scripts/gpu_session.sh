#!/usr/bin/env bash
# The GPU measurements of the README's benchmark section, as one prepared script for a lent single-GPU machine
# (JAX CUDA and PyTorch CUDA preinstalled, no network). Usage, from the repository root:
#
#   bash scripts/gpu_session.sh quick   # checks + the 2B-shaped update: sampler (fp32, vs generate on the GPU),
#                                       # the rl mode end to end (tiny, bench record), bench_update 2b bf16
#   bash scripts/gpu_session.sh large   # bench_sampler 2b bf16 (decode bandwidth), rl mode on a 2B-shaped policy
#   bash scripts/gpu_session.sh sampler # the sampler runs only (fp32 tokens vs generate; 2b bf16 bandwidth;
#                                       # 2b bf16 growing decode windows vs one whole-budget window)
#   bash scripts/gpu_session.sh decode_window  # the 2b bf16 growing decode windows only
#   bash scripts/gpu_session.sh rl_2b   # the rl mode on a 2B-shaped policy only
#   bash scripts/gpu_session.sh attention  # bench_update 2b bf16 with cuDNN flash attention vs the einsum
#                                          # attention (4 x 1024 tokens each)
#   bash scripts/gpu_session.sh long    # the same at 2 x 4096 tokens (the einsum form runs out of memory there),
#                                       # then the log-probs of both against float32 (scripts/attention_agreement.py)
#   bash scripts/gpu_session.sh cudnn_paths  # what has not run with cuDNN attention on a GPU yet: the rl mode in
#                                       # bf16 with remat (tiny policy, 3 steps), the 2 x 4096 update against the
#                                       # fixed torch reference with a tighter log-prob check, the agreement script;
#                                       # each with the vision tower's cuDNN attention (its images' patch rows)
#   bash scripts/gpu_session.sh vision_hires  # the agreement script on one 1024 px image (4,096 patches) in an
#                                       # 8,192-token row: the vision tower's cuDNN attention at a high resolution
#
# Packages the machine lacks (grain, ml_collections, tensorboardX, ...) come as wheels in .whl/ (see README);
# flax is taken at this project's tested version when it imports with the machine's jax, else the machine's.
# Logs and one JSON record per step go to $OUT (default /tmp/axpo_gpu); each step has its own time limit so one
# slow step cannot take the others' results with it.
set -u
MODE=${1:-quick}
OUT=${OUT:-/tmp/axpo_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if ls .whl/*.whl >/dev/null 2>&1; then
  mkdir -p /tmp/wheels_flax && mv -f .whl/flax-*.whl /tmp/wheels_flax/ 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  ls /tmp/wheels_flax/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site_flax /tmp/wheels_flax/*.whl
fi
export PYTHONPATH=/tmp/site_flax:/tmp/site:$PWD
if ! python3 -c "import jax, flax.nnx, axpo_jax.models.qwen3_vl" 2>"$OUT/flax_check.txt"; then
  echo "this project's flax does not import with this jax; using the machine's ($(tail -1 "$OUT/flax_check.txt"))"
  export PYTHONPATH=/tmp/site:$PWD
fi

{ nvidia-smi -L; python3 - <<'EOF'
import importlib.metadata as md, jax
print({p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch", "grain")})
print(jax.devices(), jax.default_backend())
EOF
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS command...: run with a time limit, keep its log, append its last line (a record)
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  grep -v '^\[' "$OUT/$name.log" | grep '^{' | tail -1 >>"$OUT/records.jsonl"
  [ $rc -eq 0 ] || tail -5 "$OUT/$name.log"
}

BF16_CHECKS="--config.max_loss_rel_diff=0.05 --config.max_logprob_diff=1.0 --config.max_grad_norm_rel_diff=0.1"
sampler_tiny_fp32() {
  # fp32 at XLA's highest matmul precision (no TF32) so the greedy tokens must equal transformers' on the GPU
  JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 step sampler_tiny_fp32 90 \
    python3 launch.py --config configs/bench.py:sampler --config.torch_device=auto
}
sampler_2b_bf16() {
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 step sampler_2b_bf16 170 \
    python3 launch.py --config configs/bench.py:sampler --config.preset=2b --config.dtype=bfloat16 \
      --config.torch_device=auto --config.batch=16 --config.prompt_len=512 --config.image_size=448 \
      --config.new_tokens=256 --config.min_identical_rows=0
}
decode_window_2b_bf16() {
  # one 2,048-token turn budget that the rows end after 200-400 tokens (sampled: a random bf16 model repeats itself
  # greedily), growing windows vs one whole-budget window
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 step decode_window_2b_bf16 240 \
    python3 launch.py --config configs/bench.py:decode_window --config.preset=2b --config.dtype=bfloat16 \
      --config.torch_device=auto --config.batch=16 --config.prompt_len=1024 --config.image_size=448 \
      --config.max_new_tokens=2048 --config.capacity=4096 --config.stop_near=400 --config.temperature=1.0 \
      --config.repeats=3 --config.min_identical_rows=0
}
rl_2b_shape() {
  # the rl mode on a policy of Qwen3-VL-2B's decoder and vision shapes (the tiny processor's vocabulary), bf16;
  # transformers initializes the weights on the GPU (the Flax initializer's compile did not finish in 190 s)
  step rl_2b_shape_bf16 "${RL_2B_LIMIT_S:-190}" bash -c 'python3 -c "
from axpo_jax.demo import build_tiny_checkpoint as b
b(\"/tmp/policy2b\", seed=0, via=\"transformers\", torch_device=\"cuda\", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
  num_key_value_heads=8, head_dim=128, mrope_section=(24, 20, 20), vision_depth=24, vision_hidden_size=1024,
  vision_intermediate_size=4096, vision_num_heads=16, deepstack_visual_indexes=(5, 11, 17))" &&
    python3 launch.py --config configs/rl.py --config.checkpoint=/tmp/policy2b --config.dtype=bfloat16 \
      --config.steps=${RL_2B_STEPS:-2} --config.learning_rate=1e-6 --config.checkpoint_every=100 --config.eval_tasks= \
      --config.workdir=/tmp/rl_2b && tail -1 /tmp/rl_2b/bench_records.jsonl'
}
update_2b_bf16() {  # update_2b_bf16 NAME ATTENTION BATCH SEQ_LEN [JAX's memory share: torch takes the rest]
  XLA_PYTHON_CLIENT_MEM_FRACTION=${5:-0.6} step "$1" 170 \
    python3 launch.py --config configs/bench.py:update --config.preset=2b --config.dtype=bfloat16 \
      --config.torch_device=auto --config.batch="$3" --config.seq_len="$4" --config.image_size=448 \
      --config.attention="$2" $BF16_CHECKS
}
if [ "$MODE" = attention ]; then
  update_2b_bf16 update_2b_bf16_cudnn cudnn 4 1024
  update_2b_bf16 update_2b_bf16_einsum einsum 4 1024
elif [ "$MODE" = long ]; then
  update_2b_bf16 update_2b_bf16_cudnn_4096 cudnn 2 4096 0.4
  update_2b_bf16 update_2b_bf16_einsum_4096 einsum 2 4096 0.4
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step attention_agreement 200 python3 scripts/attention_agreement.py 2b 2 4096
elif [ "$MODE" = cudnn_paths ]; then
  step rl_tiny_bf16_remat 150 bash -c 'python3 -c "from axpo_jax.demo import build_tiny_checkpoint as b; b(\"/tmp/tiny\", seed=0)" &&
    python3 launch.py --config configs/rl.py --config.checkpoint=/tmp/tiny --config.steps=3 --config.dtype=bfloat16 \
      --config.remat=True --config.workdir=/tmp/rl_tiny_bf16 && tail -1 /tmp/rl_tiny_bf16/bench_records.jsonl'
  BF16_CHECKS="--config.max_loss_rel_diff=0.05 --config.max_logprob_diff=0.5 --config.max_grad_norm_rel_diff=0.1" \
    update_2b_bf16 update_2b_bf16_cudnn_4096 cudnn 2 4096 0.4
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step attention_agreement 200 python3 scripts/attention_agreement.py 2b 2 4096
elif [ "$MODE" = vision_hires ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step attention_agreement_1024px 240 python3 scripts/attention_agreement.py 2b 1 8192 1024
elif [ "$MODE" = rl_2b ]; then
  rl_2b_shape
elif [ "$MODE" = decode_window ]; then
  decode_window_2b_bf16
elif [ "$MODE" = sampler ]; then
  sampler_tiny_fp32
  sampler_2b_bf16
  decode_window_2b_bf16
elif [ "$MODE" = quick ]; then
  sampler_tiny_fp32
  step rl_tiny 130 bash -c 'python3 -c "from axpo_jax.demo import build_tiny_checkpoint as b; b(\"/tmp/tiny\", seed=0)" &&
    python3 launch.py --config configs/rl.py --config.checkpoint=/tmp/tiny --config.steps=4 \
      --config.workdir=/tmp/rl_tiny && tail -1 /tmp/rl_tiny/bench_records.jsonl'
  update_2b_bf16 update_2b_bf16 auto 4 1024 0.45
else
  sampler_2b_bf16
  rl_2b_shape
fi
echo "== records ($OUT/records.jsonl)"
cut -c1-600 "$OUT/records.jsonl"
