"""One full fine-tuning step at the official sizes: time, TFLOP/s, peak memory, and where the time goes.

    python bench/train_step.py                                   # 1 GPU, configs/train_dit_refine.yaml as shipped
    python bench/train_step.py --accum 4                         # the config's 4 micro-batches per step
    python bench/train_step.py --set deepspeed.precision=autocast --no-fold   # variants (see --help)
    deepspeed --num_gpus 2 bench/train_step.py --zero 3          # data-parallel: per-GPU step time and memory
    python bench/train_step.py --config configs/train_dit_refine-tiny.yaml --steps 3   # CPU smoke run

A step is what ml.training does per optimizer step (micro-batch 1, --accum micro-batches): frozen VAE encode of
163,840 surface points (-> 8,192 tokens), frozen DINOv2-L on a 1022 px view (5,330 tokens), DiT forward and
backward under DeepSpeed, gradient clipping and the optimizer. The code path is ml.training's own (TrainModels,
build_engine, optimizer_step, StepRunner); only the sample is synthetic (a noisy sphere and a full-frame view, so
every one of the 8,192 tokens and 5,330 image tokens is used: the official worst case). Weights are random.
Printed: the phases of one step timed one by one (each waits for the last), then the trainer's loop -- StepRunner
steps back to back on the wall clock, serial and with the encoders overlapped -- which is what a run gets.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ml.config import load_config, parse_overrides  # noqa: E402
from ml.training.config import TrainConfig  # noqa: E402


def synthetic_batch(cfg: TrainConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = cfg.data.pc_size
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    r = 0.8 + 0.1 * torch.sin(5 * d[:, :1]) * torch.cos(3 * d[:, 1:2])  # a bumpy sphere: ~40k voxels at 128^3
    pts = d * r
    label = torch.cat([torch.zeros(n // 2, 1), torch.ones(n - n // 2, 1)])
    surface = torch.cat([pts, d, label], dim=1)[None]
    s = cfg.data.image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    image = torch.stack([torch.sin(4 * xx), torch.cos(3 * yy), xx * yy])[None].clamp(-1, 1)
    mask = torch.ones(1, 1, s, s)  # full frame: no background patch is dropped (5,330 image tokens)
    return {"uid": [f"bench{seed}"], "surface": surface, "image": image, "mask": mask, "broken": []}


def matmul_tflops(device: torch.device) -> float | None:
    """The measured bf16 matmul ceiling of this GPU (8192^3, median of 20), for an honest MFU denominator."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return 2 * 8192**3 / statistics.median(ts) / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train_dit_refine.yaml")
    ap.add_argument("--zero", type=int, default=None, help="ZeRO stage (default: the config's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, autotuning, compile)")
    ap.add_argument("--act-ckpt", type=int, default=None, metavar="N",
                    help="activation checkpointing on the first N DiT blocks (-1: all)")
    ap.add_argument("--attn", choices=["auto", "flash", "cudnn", "efficient"], default="auto",
                    help="force one SDPA backend for the DiT and encoders")
    ap.add_argument("--compile", choices=["none", "kernels", "blocks"], default=None,
                    help="kernels: RefineDiT.compile_kernels() (q/k norm + RoPE); blocks: torch.compile each block "
                         "(default: the config's model.compile)")
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload (optimizer on the CPU)")
    ap.add_argument("--experts", choices=["auto", "grouped", "loop"], default="auto",
                    help="MoE routed experts: grouped GEMMs or one matmul pair per expert (auto: grouped on CUDA bf16)")
    ap.add_argument("--latent-cache", action="store_true",
                    help="data.latent_cache on: the VAE encodes the sample once, later steps read the cached posterior "
                         "(what every epoch after the first does)")
    ap.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning")
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches per optimizer step in the trainer-loop measurement (the config's is 4)")
    ap.add_argument("--fp8", choices=["none", "tensorwise", "rowwise"], default="none",
                    help="probe: torchao float8 training on the DiT's large nn.Linear layers (needs torchao)")
    ap.add_argument("--compile-encoders", action="store_true",
                    help="also torch.compile the frozen DINOv2 (fixed image size: one graph); a probe, not a config key")
    ap.add_argument("--no-fold", action="store_true",
                    help="clip in its own pass instead of inside the fused AdamW (the first session's way)")
    ap.add_argument("--mem-cap-gib", type=float, default=None, metavar="GIB",
                    help="cap this process's CUDA allocator (torch.cuda.set_per_process_memory_fraction), e.g. 44 "
                         "for what a 48 GB A40 leaves after its CUDA context: does a setup fit a smaller card")
    ap.add_argument("--label", default="", help="name of this variant in the output")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, run 2 more under torch.profiler and write the kernel table there")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)

    over = parse_overrides(args.set)
    # cfg_drop 0: every timed step has its image context (a dropped one skips the cross-attention: faster)
    over.update({"train.grad_accum": args.accum, "train.micro_batch": 1, "model.weights": None, "optim.warmup_steps": 0,
                 "model.cfg_drop": 0.0,
                 "train.max_steps": 10**6, "model.activation_checkpointing": args.act_ckpt is not None,
                 "model.checkpoint_blocks": None if args.act_ckpt in (None, -1) else args.act_ckpt})
    if args.zero is not None:
        over["deepspeed.zero_stage"] = args.zero
    if args.offload:
        over["deepspeed.offload_optimizer"] = True
    if args.lora:
        over["model.lora.enabled"] = True
    cfg = load_config(args.config, TrainConfig, over)

    from ml.models.checkpoint import build_models
    import ml.training.engine as E
    from ml.training.engine import (apply_lora, build_engine, compile_blocks, enable_activation_checkpointing,
                                    init_distributed, make_graph_static, needs_static_graph,
                                    optimizer_step)
    from ml.training.step import StepRunner, TrainModels

    if args.no_fold:
        E.fold_clip = lambda *a, **k: None  # clip_gradients falls back to clip_grad_norm_ in place

    rank, local_rank, world = init_distributed(cfg)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    if cuda and args.mem_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total), device)
    t0 = time.time()
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        models = build_models(cfg.model.arch, device=device)  # random init straight on the GPU (seconds, not minutes)
    cache_dir = None
    if args.latent_cache:  # ml.training's latent cache (data.latent_cache): the first step encodes, later ones load
        import tempfile

        cache_dir = Path(tempfile.mkdtemp(prefix="latent_cache_"))
    tm = TrainModels(models, cfg, device, cache_dir)
    dit = tm.dit
    if cfg.model.lora.enabled:
        apply_lora(dit, cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    if needs_static_graph(cfg, world):
        make_graph_static(dit)
    for blk in dit.blocks:
        if blk.use_moe:
            blk.moe.experts_impl = args.experts
    if args.fp8 != "none":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def big_linear(mod, fqn):
            return (isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                    and min(mod.in_features, mod.out_features) >= 1024)

        n_lin = sum(big_linear(m, n) for n, m in dit.named_modules())
        from dataclasses import replace as _replace

        # pad_inner_dim: the DiT's 8,193 tokens (8,192 latents + the timestep) are the inner dimension of the weight
        # gradient's matmul, which fp8 GEMMs need in multiples of 16
        f8 = _replace(Float8LinearConfig.from_recipe_name(args.fp8), pad_inner_dim=True)
        convert_to_float8_training(dit, config=f8, module_filter_fn=big_linear)
        print(f"fp8 {args.fp8}: {n_lin} nn.Linear layers converted", flush=True)
    if args.compile is None:
        args.compile = "blocks" if cfg.model.compile and cuda else "none"
    if args.compile == "kernels":
        dit.compile_kernels()
    elif args.compile == "blocks":
        compile_blocks(dit)  # what model.compile: true does in ml.training, in the trainer's order
    if args.compile_encoders:
        enc = tm.conditioner.main_image_encoder
        enc.model = torch.compile(enc.model)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(dit, cfg.model.checkpoint_blocks)
    engine = build_engine(dit, cfg, world)
    build_s = time.time() - t0
    n_params = sum(p.numel() for p in dit.parameters())
    batch = synthetic_batch(cfg, seed=rank)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(args.attn)
    ctx = (lambda: sdpa_kernel([backend])) if backend is not None else nullcontext

    def ev():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def span(a, b):
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    rows = []
    engine.train()
    for i in range(args.warmup + args.steps):
        count = i == 0  # FLOPs counted once, on a warm-up step
        with ctx():
            e0 = ev()
            x1, vidx, cond, cond_mask = inputs = tm.inputs(batch, train=False)
            e1 = ev()
            if count:
                from torch.utils.flop_counter import FlopCounterMode

                fc_enc = FlopCounterMode(display=False)
                with fc_enc:
                    tm._inputs(batch, train=False, gen=None)
                enc_flops = fc_enc.get_total_flops()
                dit_fwd_flops = tm.count_dit_flops(engine, x1, vidx, cond, cond_mask, None)  # as ml.training counts
            loss = tm.dit_loss(engine, inputs)
            e2 = ev()
            engine.backward(loss)
            e3 = ev()
            for _ in range(args.accum - 1):  # the phases are of the first micro-batch; the others (same inputs, so
                optimizer_step(engine, cfg)  # no encoders) are timed as one span, up to DeepSpeed's boundary
                engine.backward(tm.dit_loss(engine, inputs))
            e3b = ev()
            optimizer_step(engine, cfg)  # ZeRO-0: clipping (folded into the fused AdamW) + step; ZeRO >= 1: inside
            e4 = ev()
        if cuda:
            torch.cuda.synchronize()
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"loss is {float(loss)} at step {i}")
        if i >= args.warmup:
            rows.append({"encoders": span(e0, e1), "dit_fwd": span(e1, e2), "dit_bwd": span(e2, e3),
                         "more_micro": span(e3, e3b), "optimizer": span(e3b, e4), "step": span(e0, e4)})
        if i == args.warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats()

    # The trainer's way: StepRunner steps back to back (the next micro-batch's encoders drawn ahead, on a second
    # stream with train.overlap_encoders; no host wait inside a step), timed on the wall clock over all of them.
    if cuda:
        batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}  # as the loader
    loop_s = {}
    for overlap in (False, True):
        runner = StepRunner(tm, engine, cfg, draw=lambda: batch, snapshot=lambda: None, overlap=overlap)
        for _ in range(2):
            runner.step(draw_ahead=True)
        if cuda:
            torch.cuda.synchronize()
        t_loop = time.perf_counter()
        for i in range(args.steps):
            loss_sum, _ = runner.step(draw_ahead=i < args.steps - 1)
        if cuda:
            torch.cuda.synchronize()
        loop_s[overlap] = (time.perf_counter() - t_loop) / args.steps
        if not math.isfinite(float(loss_sum)):
            raise RuntimeError(f"trainer-loop loss is {float(loss_sum)}")

    if args.profile and rank == 0:
        from torch.profiler import ProfilerActivity, profile, record_function

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                with ctx():
                    with record_function("## encoders"):
                        inputs = tm.inputs(batch, train=False)
                    with record_function("## dit_forward"):
                        loss = tm.dit_loss(engine, inputs)
                    with record_function("## dit_backward"):
                        engine.backward(loss)
                    with record_function("## optimizer"):
                        for _ in range(args.accum - 1):
                            optimizer_step(engine, cfg)
                            engine.backward(tm.dit_loss(engine, inputs))
                        optimizer_step(engine, cfg)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=80)
        pdir = Path(args.profile)
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / f"step_profile_{args.label or 'default'}.txt").write_text(table)
        print(table[:5000], flush=True)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    tokens = x1.shape[1]
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    mems = [peak_mem]
    if world > 1:
        mems = [None] * world
        dist.all_gather_object(mems, peak_mem)
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
    ceiling = matmul_tflops(device) if rank == 0 else None
    dit_flops = 3.0 * dit_fwd_flops
    res = {
        "label": args.label or f"zero{cfg.deepspeed.zero_stage}-{args.attn}-{args.compile}" + (f"-ackpt{args.act_ckpt}" if args.act_ckpt is not None else ""),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage, "attn": args.attn, "compile": args.compile,
        "act_ckpt": args.act_ckpt, "experts": args.experts, "latent_cache": args.latent_cache, "offload": cfg.deepspeed.offload_optimizer, "lora": cfg.model.lora.enabled,
        "dit_params_b": n_params / 1e9, "tokens": tokens, "image_tokens": int(cond.shape[1]),
        "precision": cfg.deepspeed.precision, "accum": args.accum, "fold_clip": not args.no_fold,
        "loop_step_s_serial": loop_s[False], "loop_step_s_overlap": loop_s[True],
        "loop_s_per_sample_overlap": loop_s[True] / args.accum,
        "step_s": med["step"], "encoders_s": med["encoders"], "dit_fwd_s": med["dit_fwd"], "dit_bwd_s": med["dit_bwd"],
        "more_micro_s": med["more_micro"], "optimizer_s": med["optimizer"], "step_s_min": min(r["step"] for r in rows), "step_s_max": max(r["step"] for r in rows),
        "dit_tflop": dit_flops / 1e12, "encoder_tflop": enc_flops / 1e12,
        "dit_tflops_per_s": dit_flops / (med["dit_fwd"] + med["dit_bwd"]) / 1e12,
        "step_tflops_per_s": (dit_flops + enc_flops) / med["step"] / 1e12,
        "samples_per_s_total": world / med["step"],
        "peak_mem_gib": mems, "peak_reserved_gib": reserved, "mem_cap_gib": args.mem_cap_gib,
        "trainable_params_b": sum(p.numel() for p in dit.parameters() if p.requires_grad) / 1e9,
        "matmul_ceiling_tflops": ceiling, "build_s": build_s, "steps": args.steps,
    }
    if rank == 0:
        print(json.dumps(res), flush=True)
        print(f"[{res['label']}] {res['device']} x{world}: step {med['step']:.3f} s (min {res['step_s_min']:.3f}) = "
              f"encoders {med['encoders']:.3f} + DiT fwd {med['dit_fwd']:.3f} + bwd {med['dit_bwd']:.3f} + "
              + (f"{args.accum - 1} more micro-batches {med['more_micro']:.3f} + " if args.accum > 1 else "") +
              f"optimizer {med['optimizer']:.3f}; DiT {res['dit_tflops_per_s']:.0f} TFLOP/s "
              f"({res['dit_tflop']:.1f} TFLOP), peak mem {', '.join(f'{m:.1f}' for m in mems if m is not None)} GiB "
              f"(rank 0 reserved {reserved or 0:.1f}{f', cap {args.mem_cap_gib:g}' if args.mem_cap_gib else ''}), "
              f"matmul ceiling {ceiling or 0:.0f} TFLOP/s", flush=True)
        print(f"[{res['label']}] trainer loop (StepRunner, {args.accum} micro-batch/step): {loop_s[False]:.3f} s/step "
              f"serial, {loop_s[True]:.3f} s/step with the encoders overlapped = "
              f"{loop_s[True] / args.accum:.3f} s/sample", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
