#!/usr/bin/env bash
# What produced the training figures in README (device tool, 2x H100): bench/train_step.py variants on one GPU
# each (two at a time, one per card), the deepspeed launcher over both cards with ZeRO-2 and ZeRO-3, and a
# tiny-model run checkpointed on 2 GPUs and resumed on 1. Usage: bash bench/train_device.sh <phase> [out dir]
#   phases: setup, single, single2, multi, resume, all, call2
set -uo pipefail
OUT=${2:-${OUT:-/tmp/out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
J="$OUT/bench.jsonl"
L="$OUT/runs.log"   # every run's full output, one after the other (the device tool returns few files)
B="python3 bench/train_step.py --json $J"
DS="python3 -m deepspeed.launcher.runner"  # the `deepspeed` script itself is not on PATH with pip --target

setup() {
  # DeepSpeed and pydantic are not in the device image: carried as wheels (.whl/, see README)
  PV=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/common/*.whl .whl/$PV/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())'
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
}

pair() {  # two single-GPU variants at once, one per card
  CUDA_VISIBLE_DEVICES=0 timeout 240 $B $1 > /tmp/s0.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 240 $B $2 > /tmp/s1.log 2>&1 &
  wait
  cat /tmp/s0.log /tmp/s1.log >> "$L"
  grep -h '^\[' /tmp/s0.log /tmp/s1.log
  grep -h "Error\|out of memory" /tmp/s0.log /tmp/s1.log | tail -4
}

single() {  # first call (2026-11-25): DeepSpeed bf16 weights, ZeRO-2
  P="--set deepspeed.precision=bf16 --zero 2"
  pair "$P --label 1gpu-noackpt" "$P --act-ckpt -1 --label 1gpu-ackpt-all"
  pair "$P --act-ckpt 10 --label 1gpu-ackpt10" "$P --act-ckpt 10 --attn cudnn --compile kernels --label 1gpu-ackpt10-cudnn-kernels"
}

single2() {  # second call: fp32 weights + autocast (plain fused AdamW) against DeepSpeed bf16, compile
  A="--steps 6 --warmup 2 --set deepspeed.precision=autocast"
  pair "$A --zero 0 --label 1gpu-autocast-z0" "$A --zero 0 --act-ckpt 10 --label 1gpu-autocast-z0-ackpt10"
  pair "$A --zero 2 --label 1gpu-autocast-z2" "--steps 6 --warmup 2 --set deepspeed.precision=bf16 --zero 1 --label 1gpu-bf16-z1"
  pair "--steps 6 --warmup 4 --set deepspeed.precision=autocast --zero 0 --act-ckpt 10 --compile blocks --label 1gpu-autocast-z0-ackpt10-compile" \
       "$A --zero 0 --act-ckpt 10 --attn cudnn --label 1gpu-autocast-z0-ackpt10-cudnn"
}

multi3() {  # third call: ZeRO-2 over both cards with DeepSpeed bf16 weights (autocast's fp32 weights OOM'd there)
  timeout 110 $DS --num_gpus 2 bench/train_step.py --json "$J" --steps 5 --warmup 2 --zero 2 \
    --set deepspeed.precision=bf16 --label 2gpu-bf16-zero2 > /tmp/m.log 2>&1
  cat /tmp/m.log >> "$L"
  grep -h '^\[' /tmp/m.log || grep -h "Error" /tmp/m.log | tail -3
}

multi() {
  for z in 2 3; do
    timeout 200 $DS --num_gpus 2 bench/train_step.py --json "$J" --steps 6 --warmup 2 --zero $z \
      --set deepspeed.precision=autocast --label 2gpu-zero$z > /tmp/m.log 2>&1
    cat /tmp/m.log >> "$L"
    grep -h '^\[' /tmp/m.log || tail -8 /tmp/m.log
  done
}

resume() {  # tiny model, real trainer: 2 GPUs write step 3, 1 GPU resumes it (universal conversion) to step 6
  D=/tmp/rs; rm -rf $D; mkdir -p $D
  python3 -c "import sys; sys.path.insert(0, 'tests/ml/training'); from training_fixtures import write_dataset; from pathlib import Path; write_dataset(Path('$D/data'), n_train=8, n_val=2, n_points=6000)"
  for z in ${ZS:-2 3}; do
    C="--config configs/train_dit_refine-tiny.yaml data.root=$D/data run.output_dir=$D/out deepspeed.precision=autocast deepspeed.dist_backend=null deepspeed.zero_stage=$z logging.wandb=disabled optim.warmup_steps=1 train.val_every=3 train.log_every=1 train.ckpt_every=3"
    timeout 150 $DS --num_gpus 2 --module ml.training $C run.run_id=z$z train.max_steps=3 > /tmp/r.log 2>&1; tail -2 /tmp/r.log
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m ml.training $C --resume $D/out/z$z train.max_steps=6 >> /tmp/r.log 2>&1; tail -3 /tmp/r.log
    cat /tmp/r.log >> "$L"
    cat $D/out/z$z/checkpoints/step_0000006/trainer_state.json; grep -h '"step": [456]' $D/out/z$z/metrics.jsonl | cut -c1-160
  done
}

case "${1:-all}" in
  setup) setup ;;
  single) setup; single ;;
  multi) setup; multi ;;
  resume) setup; resume ;;
  all) setup; single; multi; resume ;;
  call2) setup; single2; multi; resume ;;
  call3) setup; multi3; ZS=2 resume ;;
esac
