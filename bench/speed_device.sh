#!/usr/bin/env bash
# The speed passes' device calls (device tool; probe..call6 on 2x H100, call7.. on 1x H100): what each candidate
# change buys, measured before and after it is built. Usage: bash bench/speed_device.sh probe|... [out dir]
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
call7)  # third pass, one H100: clip folded into the fused AdamW; encoders drawn ahead on a side stream (the
  # trainer loop, serial vs overlapped, is measured inside every run); bf16 weights with MasterAdamW; GPU-only tests
  python3 -m pytest -q -m gpu tests/ml/training/test_training_master.py tests/ml/training/test_training_gpu.py \
    -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  ts 0 autocast-nofold --steps 6 --warmup 4 --no-fold
  ts 0 autocast --steps 6 --warmup 4
  ts 0 bf16 --steps 6 --warmup 4 --set deepspeed.precision=bf16
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call8)  # one H100: bf16 + MasterAdamW after the norm fix (no fp32 copy of the gradients), as configured (4 micro-
  # batches per step: fp32 gradient buffer), with the latent cache, DINOv2 compiled; a profile of the bf16 step
  B="--steps 6 --warmup 4 --set deepspeed.precision=bf16"
  ts 0 bf16 $B --profile "$OUT"
  ts 0 bf16-accum4 $B --accum 4
  ts 0 bf16-latentcache $B --latent-cache
  ts 0 bf16-accum4-latentcache $B --accum 4 --latent-cache
  ts 0 bf16-dinocompile $B --compile-encoders
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call9)  # one H100, the config's 4 micro-batches per step: autocast vs bf16 (gradients summed in bf16: fits; in fp32:
  # needs recompute of 6 blocks), and with the latent cache
  S="--steps 5 --warmup 3 --accum 4"
  ts 0 autocast-accum4 $S
  ts 0 bf16-accum4-bf16sum $S --set deepspeed.precision=bf16 --set deepspeed.grad_accum_dtype=bf16
  ts 0 bf16-accum4-bf16sum-latentcache $S --latent-cache --set deepspeed.precision=bf16 --set deepspeed.grad_accum_dtype=bf16
  ts 0 bf16-accum4-fp32sum-ackpt6 $S --act-ckpt 6 --set deepspeed.precision=bf16
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call10)  # one H100, final figures of configs/train_dit_refine.yaml as shipped (bf16, gradients summed in bf16,
  # encoders overlapped): 4 micro-batches per step and 1; autocast with 4 (overlap must fall back, not slow down)
  python3 -m pytest -q -m gpu tests/ml/training/test_training_gpu.py tests/ml/training/test_training_master.py \
    -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
  ts 0 shipped-accum4 --steps 6 --warmup 3 --accum 4
  ts 0 shipped-accum1 --steps 8 --warmup 4
  ts 0 autocast-accum4 --steps 5 --warmup 3 --accum 4 --set deepspeed.precision=autocast
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call12)  # one H100, a probe: torchao float8 training (carried wheel) on the DiT's large linears, shipped settings
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/probe/*.whl
  [ -n "${SKIP_BASE:-}" ] || ts 0 fp8-none --steps 6 --warmup 4
  ts 0 fp8-tensorwise --steps 6 --warmup 4 --fp8 tensorwise
  ts 0 fp8-rowwise --steps 6 --warmup 4 --fp8 rowwise
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call13)  # 2 H100s: the shipped config under `deepspeed --num_gpus 2` (ZeRO-0, bf16 + MasterAdamW, one all-reduce of
  # the flat bf16 gradients per step over NCCL): 1 and 4 micro-batches per step
  for A in 1 4; do
    timeout 280 python3 -m deepspeed.launcher.runner --num_gpus 2 bench/train_step.py --json "$OUT/steps.jsonl" \
      --steps 5 --warmup 3 --accum $A --label 2gpu-shipped-accum$A > "$OUT/multi$A.log" 2>&1
    grep -h '^\[2gpu' "$OUT/multi$A.log" || grep -h "Error" "$OUT/multi$A.log" | tail -5
  done
  ;;
call14)  # one H100: the GPU-only tests (overlap parity, MasterAdamW's Triton kernel, a bf16 run resumed on CUDA)
  python3 -m pytest -q -m gpu tests/ml/training -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tail -15
  ;;
call15)  # one H100 standing in for a 48 GB A40 (allocator capped at 44 GiB, a little under what an A40 leaves after its CUDA
  # context): which small-card setups fit at the official sizes, their peak memory and (H100) time; full fine-tuning
  # under the same cap as the control that the cap bites. First the GPU tests (LoRA + bf16 on CUDA among them).
  python3 -m pytest -q -m gpu tests/ml/training -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tail -6
  C="--mem-cap-gib 44 --steps 4 --warmup 2 --accum 4"
  ts 0 a40cap-lora-zero0-bf16 $C --lora
  ts 0 a40cap-full-zero0-bf16 $C --steps 2 --warmup 1
  [ "$SECONDS" -lt "${CALL_BUDGET_S:-100000}" ] && ts 0 a40cap-lora-zero2-bf16 $C --lora --zero 2
  grep -h "OutOfMemory\|out of memory" "$OUT"/ts_a40cap-full*.log | head -2 | cut -c1-300
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call16)  # one H100 capped as an A40 (44 GiB): ZeRO-Offload (optimizer on the CPU, DeepSpeed's CPU Adam built on
  # first use) for full fine-tuning, with 10 blocks recomputed and without
  C="--mem-cap-gib 44 --steps 3 --warmup 2 --accum 4 --offload --zero 2"
  ts 0 a40cap-offload-zero2-ackpt10 $C --act-ckpt 10
  ts 0 a40cap-offload-zero2 $C
  free -g | head -2
  cat "$OUT"/ts_*.log > "$OUT/steps_all.txt"; rm -f "$OUT"/ts_*.log
  ;;
call11)  # one H100: the real trainer (python -m ml.training, configs/train_dit_refine.yaml as shipped) on synthetic
  # samples of the official size (163,840 points; renders resized to 1022 px): what metrics.jsonl reports
  python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests/ml/training')
from training_fixtures import write_dataset; write_dataset(Path('/tmp/ds'), n_train=16, n_val=2, n_points=163840)"
  timeout 540 python3 -m ml.training --config configs/train_dit_refine.yaml data.root=/tmp/ds run.output_dir=/tmp/runs \
    run.run_id=e2e model.weights=null logging.wandb=disabled train.max_steps=36 train.log_every=6 train.val_every=0 \
    train.ckpt_every=1000 train.export=false optim.warmup_steps=4 data.num_workers=4 > "$OUT/e2e.log" 2>&1
  echo "rc $?"; grep -v Warning "$OUT/e2e.log" | grep "step \|error\|Error" | tail -12
  cp /tmp/runs/e2e/metrics.jsonl "$OUT/" 2>/dev/null
  ;;
esac
