#!/usr/bin/env bash
# The DiT speed-up work's device calls (2x H100, device tool): profile + baseline, then old-vs-new step times.
# The "old" code is a snapshot of ml/ + bench/ + configs/ at the commit before the speed-up, in .perf/old
# (git archive; ignored, carried). Usage: bash bench/perf_device.sh call1|call2 [out dir]
set -uo pipefail
OUT=${2:-${OUT:-/tmp/out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PV=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/common/*.whl .whl/$PV/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "gpus", torch.cuda.device_count())'
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
A="--set deepspeed.precision=autocast --zero 0"

ts() {  # tree gpu label args... : bench/train_step.py of one code tree on one card
  local tree=$1 gpu=$2 label=$3; shift 3
  (cd "$tree" && CUDA_VISIBLE_DEVICES=$gpu timeout 200 python3 bench/train_step.py --json "$OUT/steps.jsonl" --label "$label" "$@") \
    > "/tmp/ts_$label.log" 2>&1
  grep -h '^\[' "/tmp/ts_$label.log" || tail -5 "/tmp/ts_$label.log"
}

case "${1:-call1}" in
call1)  # profile the current DiT on card 0 while card 1 times the current full step
  (CUDA_VISIBLE_DEVICES=0 timeout 250 python3 bench/profile_dit.py --out "$OUT" > "$OUT/prof_autocast.log" 2>&1
   CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/profile_dit.py --out "$OUT" --bf16-weights --no-parts > "$OUT/prof_bf16.log" 2>&1) &
  ts . 1 old-autocast-z0 $A --steps 6 --warmup 3
  ts . 1 old-default --steps 6 --warmup 3
  wait
  grep -h '^\[\|^  ' "$OUT/prof_autocast.log" "$OUT/prof_bf16.log"
  ;;
call2)  # old and new trees, same settings, one per card at a time, then swap cards
  ts .perf/old 0 old-autocast-z0 $A --steps 8 --warmup 3 & ts . 1 new-autocast-z0 $A --steps 8 --warmup 3; wait
  ts . 0 new-default --act-ckpt 10 --steps 8 --warmup 3 & ts .perf/old 1 old-default --act-ckpt 10 --steps 8 --warmup 3; wait
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/profile_dit.py --out "$OUT" --label new > "$OUT/prof_new.log" 2>&1
  grep -h '^\[\|^  ' "$OUT/prof_new.log"
  ;;
esac
