#!/usr/bin/env bash
# The second speed pass's device calls (device tool, 2x H100): what each candidate change buys, measured before
# and after it is built. Usage: bash bench/speed_device.sh probe|... [out dir]
set -uo pipefail
OUT=${2:-${OUT:-/tmp/out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PV=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/common/*.whl .whl/$PV/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "gpus", torch.cuda.device_count())'
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader

pd() {  # gpu label args...: bench/profile_dit.py (DiT forward + backward alone)
  local gpu=$1 label=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout 300 python3 bench/profile_dit.py --out "$OUT" --label "$label" "$@" > "$OUT/pd_$label.log" 2>&1
  grep -h '^\[' "$OUT/pd_$label.log" || tail -4 "$OUT/pd_$label.log"
}
ts() {  # gpu label args...: bench/train_step.py (a full training step)
  local gpu=$1 label=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout 300 python3 bench/train_step.py --json "$OUT/steps.jsonl" --label "$label" "$@" > "$OUT/ts_$label.log" 2>&1
  grep -h '^\[' "$OUT/ts_$label.log" || tail -4 "$OUT/ts_$label.log"
}

case "${1:-probe}" in
probe)  # card 0: DiT fwd+bwd variants (bf16 weights, compiled blocks); card 1: a profiled default step + kernel probes
  (pd 0 autocast-compile-dense --compile dense --no-parts --no-profile
   pd 0 bf16 --bf16-weights --no-parts --no-profile
   pd 0 bf16-compile-dense --bf16-weights --compile dense --no-parts
   pd 0 autocast-compile-blocks --compile blocks --no-parts --no-profile) > "$OUT/card0.log" 2>&1 &
  ts 1 default --steps 6 --warmup 3 --profile "$OUT"
  CUDA_VISIBLE_DEVICES=1 timeout 240 python3 bench/probe_kernels.py > "$OUT/probe.log" 2>&1
  cat "$OUT/probe.log"
  wait
  cat "$OUT/card0.log"
  ;;
call2)  # card 0: the training step, one change at a time; card 1: refine (exact path + cached/guidance variants)
  (ts 0 experts-loop --experts loop --steps 6 --warmup 3
   ts 0 grouped --steps 6 --warmup 3
   ts 0 grouped-compile --compile blocks --steps 6 --warmup 4
   ts 0 grouped-compile-latentcache --compile blocks --latent-cache --steps 6 --warmup 4) > "$OUT/card0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 400 python3 bench/refine.py --parts dit,e2e,variants --budget-s 330 \
    --variants fast,50+c2d2,50@0.3+c3d2,50@0.3 --out "$OUT/refine.json" > "$OUT/refine.log" 2>&1
  grep -v "it/s\]" "$OUT/refine.log" | tail -20
  ts 1 grouped-compile-ackpt10 --compile blocks --act-ckpt 10 --steps 6 --warmup 4
  wait
  cat "$OUT/card0.log"
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log  # the device tool returns at most 8 files
  ls "$OUT"
  ;;
call3)  # card 0: does compiling the blocks pay, alone and inside the full step (kernel table); card 1: refine end to end
  (pd 0 autocast --no-parts --no-profile
   pd 0 autocast-compile-blocks --compile blocks --no-parts --no-profile
   ts 0 grouped-compile --compile blocks --steps 6 --warmup 4 --profile "$OUT") > "$OUT/card0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 480 python3 bench/refine.py --parts e2e,e2efast,variants --budget-s 420 \
    --variants fast,50+c2d2,50@0.3+c3d2,50@0.3 --out "$OUT/refine.json" > "$OUT/refine.log" 2>&1
  grep -v "it/s\]" "$OUT/refine.log" | grep -v '^ \|^{\|^}' | tail -20
  wait
  cat "$OUT/card0.log"
  cat "$OUT"/ts_*.log "$OUT"/pd_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log "$OUT"/pd_*.log
  ls "$OUT"
  ;;
call4)  # after the FLOP-counting fix: compiled blocks inside the full step; refine DiT step compiled
  (ts 0 grouped-compile --compile blocks --steps 8 --warmup 4 --profile "$OUT"
   ts 0 grouped-compile-latentcache --compile blocks --latent-cache --steps 8 --warmup 4) > "$OUT/card0.log" 2>&1 &
  ts 1 grouped-compile-ackpt10 --compile blocks --act-ckpt 10 --steps 6 --warmup 4
  ts 1 bf16-z1-compile --compile blocks --zero 1 --set deepspeed.precision=bf16 --steps 6 --warmup 4
  CUDA_VISIBLE_DEVICES=1 timeout 240 python3 bench/refine.py --parts dit,compile --out "$OUT/refine.json" > "$OUT/refine.log" 2>&1
  grep "DiT step\|Error" "$OUT/refine.log"
  wait
  cat "$OUT/card0.log"
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ls "$OUT"
  ;;
call5)  # final figures: the step as configured (compile, grouped MoE) with and without recompute; refine compiled
  (ts 0 final-compile --compile blocks --steps 8 --warmup 4
   ts 0 final-compile-ackpt10 --compile blocks --act-ckpt 10 --steps 6 --warmup 4) > "$OUT/card0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 420 python3 bench/refine.py --compile --parts dit,e2e,e2efast --budget-s 400 \
    --out "$OUT/refine.json" > "$OUT/refine.log" 2>&1
  grep "DiT step\|end to end\|Error" "$OUT/refine.log"
  wait
  cat "$OUT/card0.log"
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ls "$OUT"
  ;;
call6)  # compiled blocks under DeepSpeed ZeRO-2 on both cards (the multi-GPU path with model.compile on)
  timeout 300 python3 -m deepspeed.launcher.runner --num_gpus 2 bench/train_step.py --json "$OUT/steps.jsonl" \
    --steps 6 --warmup 4 --zero 2 --compile blocks --set deepspeed.precision=bf16 --label 2gpu-bf16-zero2-compile \
    > "$OUT/multi.log" 2>&1
  grep -h '^\[2gpu' "$OUT/multi.log" || grep -h "Error" "$OUT/multi.log" | tail -5
  ;;
esac
