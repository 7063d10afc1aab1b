#!/usr/bin/env bash
# The GPU check of issue 17, one run on a CUDA machine from the repository root, $OUT the folder whose
# files come back. Before: bench/gpu/fetch_wheels.sh here (the wheels the GPU machine lacks), then
# the device run with carry=["bench/gpu/whl"] and command "bash bench/gpu/run.sh" (timeout_s ~540).
# Each stage has its own timeout so one hang cannot take the rest; everything goes to $OUT.
# A dry run on the CPU: GPU_CHECK_DEVICE=cpu OUT=/tmp/gpu_out SIZE=tiny SITE=/nonexistent PY=.venv/bin/python \
#   bash bench/gpu/run.sh        (SITE: where the carried wheels go; a missing folder skips them)
set -x
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-540}                   # seconds for the whole run: the device command's limit is 600
tmo() {                                 # a stage's timeout: its own, or what is left of BUDGET (>= 1)
  local left=$((BUDGET - SECONDS - 5)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"
}
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
DEV=${GPU_CHECK_DEVICE:-cuda}
SIZE=${SIZE:-full}                      # full: issue 17's sizes; tiny: a quick dry run
PY=${PY:-python3}
export PACED_TEST_DEVICE=$DEV
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
if [ "$SITE" != /nonexistent ] && ls bench/gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" bench/gpu/whl/*.whl \
    >"$OUT/env.log" 2>&1 || echo "wheel install failed" >>"$OUT/env.log"
fi
export PYTHONPATH=$SITE:$ROOT:$ROOT/tests:$ROOT/bench/gpu
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
if [ "$SIZE" = full ]; then
  BENCH="--batch 4 --seq 2048 --vocab 151936 --hidden 1024"; REPS=5
else
  BENCH="--batch 2 --seq 64 --vocab 3001 --hidden 32"; REPS=2
  export G2_WARMUP=1 G2_STEPS=2          # train_bench steps (a CPU is slow at 8 x 512 tokens)
fi

# 1. the machine
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  for pkg in liger-kernel trl datasets duckdb; do
    $PY -c "from importlib.metadata import version; print('$pkg', version('$pkg'))" 2>/dev/null || echo "$pkg: not installed"
  done
  git log -1 --format='commit %H %s' 2>/dev/null
} >>"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# 2. the losses and the fused path vs float64 on device tensors (the project's own tests, moved by cuda_plugin)
timeout $(tmo 75) $PY -m pytest -q -p no:cacheprovider -p cuda_plugin -rfE tests/trainer/test_losses.py \
  tests/trainer/test_fused.py >"$OUT/checks.log" 2>&1
echo "pytest losses+fused on $DEV exit $?" | tee -a "$OUT/checks.log"; tail -n 3 "$OUT/checks.log"

# 3. the loss benchmark, bf16 (the goals of point 3) then fp32 for the fused path and TRL only
timeout $(tmo 150) $PY bench/kl_loss.py --device "$DEV" $BENCH --dtype bfloat16 --reps $REPS --chunk-sizes 128,512,2048 \
  --json "$OUT/kl_bf16.json" >"$OUT/kl_loss.md" 2>&1
echo "kl_loss bf16 exit $?" | tee -a "$OUT/kl_loss.md"
timeout $(tmo 45) $PY bench/kl_loss.py --device "$DEV" $BENCH --dtype float32 --reps $REPS --only "paced fused,trl,liger fused" \
  --json "$OUT/kl_fp32.json" >>"$OUT/kl_loss.md" 2>&1
echo "kl_loss fp32 exit $?" | tee -a "$OUT/kl_loss.md"; cat "$OUT/kl_loss.md"

# 4. the trainer on the device: fused vs logits path, then the trainer tests (device auto -> cuda)
timeout $(tmo 90) $PY -m pytest -q -p no:cacheprovider -rfE -m "not slow" tests/trainer/test_trainer_fused.py tests/trainer/test_trainer.py \
  >"$OUT/trainer.log" 2>&1
echo "pytest trainer (auto -> $DEV) exit $?" | tee -a "$OUT/trainer.log"; tail -n 3 "$OUT/trainer.log"

# 5. the whole trainer: plain lower bound, paced fused, paced logits, TRL GKDTrainer (Qwen2-0.5B/1.5B shapes)
W=/tmp/train_bench; TB="$PY bench/gpu/train_bench.py"
{
  timeout $(tmo 60) $TB setup --work $W --size $SIZE --device "$DEV"
  for what in "paced --loss-path fused" trl plain "paced --loss-path logits"; do  # most wanted first
    timeout $(tmo 60) $TB $what --work $W --out "$OUT/train.jsonl" --device "$DEV" || echo "train_bench $what failed: $?"
  done
  $TB report --out "$OUT/train.jsonl" --table "$OUT/train_table.md"
} >"$OUT/train_bench.log" 2>&1
grep -v '^{' "$OUT/train_bench.log" | tail -n 12
date -u >>"$OUT/env.log"
ls -la "$OUT"
