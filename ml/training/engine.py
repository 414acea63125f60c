"""DeepSpeed set-up from TrainConfig: ZeRO stage, offload, bf16, accumulation, clipping, the LR schedule,
activation checkpointing and LoRA adapters.

    ds_cfg = deepspeed_config(cfg, world_size)
    engine = build_engine(dit, cfg, world_size)     # dit: the trainable RefineDiT (frozen parts stay outside)
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable

import torch
import torch.nn as nn

from ml.models.dit import compile_blocks  # noqa: F401  (model.compile; shared with ml.refine's refine.compile)
from ml.training.config import TrainConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- LR schedule
def lr_factor(step: int, warmup_steps: int, max_steps: int, warmup_start: float, min_ratio: float) -> float:
    """Linear warm-up from `warmup_start` to 1, then a cosine from 1 down to `min_ratio` at `max_steps`
    (the official LambdaWarmUpCosineFactorScheduler shape, with max_steps the run's real length)."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / span, 1.0)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t))


def make_lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    o, t = cfg.optim, cfg.train
    return lambda step: lr_factor(step, o.warmup_steps, t.max_steps, o.warmup_start, o.min_lr_ratio)


# ----------------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    d, t, o = cfg.deepspeed, cfg.train, cfg.optim
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero.update(
            overlap_comm=d.overlap_comm and d.zero_stage >= 2,
            reduce_bucket_size=d.reduce_bucket_size,
            contiguous_gradients=True,
        )
    if d.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=d.reduce_bucket_size,
            stage3_param_persistence_threshold=100_000,
            # export/ gathers the 16-bit weights itself; DeepSpeed need not do it at every checkpoint.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        # ZeRO >= 1 clips inside DeepSpeed's optimizer (which also keeps the norm); at ZeRO-0 DeepSpeed's clipping is
        # a Python loop of one norm and one multiply per tensor, so clip_gradients() does it in two foreach passes
        "gradient_clipping": o.grad_clip if d.zero_stage >= 1 else 0.0,
        "bf16": {"enabled": d.precision == "bf16"},
        "zero_optimization": zero,
        # Our AdamW is torch's (fused on CUDA); DeepSpeed calls it "untested" but drives it like its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if d.precision == "bf16" and d.zero_stage >= 1:
        # Gradient sums across micro-batches in deepspeed.grad_accum_dtype (fp32: no bits lost; bf16: less memory).
        ds["data_types"] = {"grad_accum_dtype": d.grad_accum_dtype}
    if d.precision == "bf16" and d.zero_stage == 0:
        # Not DeepSpeed's bf16 (its optimizer wrapper keeps one more full fp32 gradient copy: out of memory on one
        # 80 GB card): bf16 weights, fp32 master weights and moments in ml.training.master.MasterAdamW. The maths
        # stays autocast's -- fp32 activations where autocast keeps them (timesteps, norms), bf16 matmuls on the
        # same bf16-rounded weights autocast would make -- without casting 3 B weights every forward.
        ds["bf16"] = {"enabled": False}
    if d.precision == "autocast" or (d.precision == "bf16" and d.zero_stage == 0):
        # Matmuls in bf16 (autocast: on fp32 weights, cast each forward; bf16 at ZeRO-0: on the bf16 weights as they are).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if d.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's CPU Adam (a compiled op); DeepSpeed builds it from this entry.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        }
    return ds


def param_groups(params: list[nn.Parameter], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and 1-D scales (the official no_decay list)."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(params, cfg)
    kw: dict[str, Any] = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if torch.cuda.is_available():
        kw["fused"] = True  # one kernel over all tensors
    return torch.optim.AdamW(groups, **kw)


def master_weights(cfg: TrainConfig) -> bool:
    """precision bf16 at ZeRO-0: bf16 weights in the module, fp32 masters in MasterAdamW (ml.training.master)."""
    return cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage == 0


def build_master_optimizer(model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, world_size: int):
    """Cast the module to bf16 on its training device, then MasterAdamW over `params` (grouped as build_optimizer)."""
    from ml.training.master import MasterAdamW

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device, torch.bfloat16)  # before the optimizer: its flat buffers take over the weights' storage
    o = cfg.optim
    # bf16 gradients lose nothing against autocast's for one micro-batch (its weight gradients come out of bf16
    # matmuls too); a sum over micro-batches or ranks is exact only in fp32 (deepspeed.grad_accum_dtype)
    summed = cfg.train.grad_accum > 1 or world_size > 1
    grad_dtype = torch.float32 if summed and cfg.deepspeed.grad_accum_dtype == "fp32" else torch.bfloat16
    return MasterAdamW(param_groups(params, cfg), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=0.0,
                       grad_dtype=grad_dtype)


def init_distributed(cfg: TrainConfig) -> tuple[int, int, int]:
    """(rank, local_rank, world_size). Works under `deepspeed`/`torchrun` and as a plain single process."""
    import deepspeed

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = cfg.deepspeed.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(model: nn.Module, cfg: TrainConfig, world_size: int, load_universal: bool = False):
    """deepspeed.initialize over the trainable module, with our AdamW (or DeepSpeed's CPU Adam when offloading)
    and the warm-up + cosine schedule stepped once per optimizer step."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: check model.lora.target_modules against the model")
    ds_cfg = deepspeed_config(cfg, world_size)
    if load_universal:  # resuming a checkpoint written by another number of ranks (checkpoint.ensure_universal)
        ds_cfg["checkpoint"] = {"load_universal": True}
    lam = make_lr_lambda(cfg)
    if master_weights(cfg):
        opt = build_master_optimizer(model, params, cfg, world_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, lr_scheduler=sched)
        # The optimizer's gradient hooks move every gradient into its flat buffer (p.grad stays None), so DeepSpeed
        # has nothing to all-reduce; clip_gradients() all-reduces the flat buffer at the accumulation boundary.
        engine.enable_backward_allreduce = False
        if world_size > 1:
            opt.sync_masters()  # DeepSpeed broadcast rank 0's weights into the module after the masters were made
        return engine
    if cfg.deepspeed.offload_optimizer:
        engine, optimizer, _, sched = deepspeed.initialize(
            model=model,
            model_parameters=params,
            config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam),
        )
    else:
        opt = build_optimizer(params, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        engine, optimizer, _, sched = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, lr_scheduler=sched)
    return engine


def clip_gradients(engine, cfg: TrainConfig) -> torch.Tensor | None:
    """Call between the last micro-batch's engine.backward() and engine.step() (optimizer_step() does both).
    ZeRO-0: returns the global gradient norm before clipping (a 0-d tensor, no host sync) and clips to
    optim.grad_clip -- folded into the optimizer's own pass where it can (fold_clip), else in place in one more
    multi-tensor pass. Gradients are already averaged over ranks at the accumulation boundary, so the norm is global.
    ZeRO >= 1: None -- DeepSpeed clips inside its optimizer and reports the norm (get_global_grad_norm)."""
    if cfg.deepspeed.zero_stage != 0 or not engine.is_gradient_accumulation_boundary():
        return None
    opt = engine.optimizer
    if hasattr(opt, "all_reduce_grads"):  # MasterAdamW: the gradients live in its flat buffers
        opt.all_reduce_grads()  # several ranks: a SUM, the 1/world_size is folded into the update and the norm
        norm = opt.grad_norm()
        if cfg.optim.grad_clip > 0:
            opt.grad_scale, opt.grad_scale_norm = clip_divisor(norm, cfg.optim.grad_clip), norm
        return norm
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return None
    if cfg.optim.grad_clip > 0 and fold_clip(engine.optimizer, params, cfg.optim.grad_clip) is not None:
        return engine.optimizer.grad_scale_norm
    if cfg.optim.grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def fold_clip(opt: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """Clipping without its own pass over the gradients: torch's fused AdamW divides every gradient by its
    `grad_scale` tensor inside the update (the hook torch.amp.GradScaler uses), so clipping by
    min(1, max_norm / (norm + 1e-6)) -- clip_grad_norm_'s factor -- is a division by max(1, (norm + 1e-6) / max_norm)
    there. Saves a read and a write of every gradient (~7 ms of 3 B fp32 gradients on an H100). Sets
    opt.grad_scale (cleared by optimizer_step after the step) and opt.grad_scale_norm (the pre-clip norm);
    returns the scale, or None where the optimizer cannot take it (not fused, or another kind)."""
    fused = isinstance(opt, torch.optim.Adam | torch.optim.AdamW) and bool(opt.defaults.get("fused"))
    if not fused or getattr(opt, "grad_scale", None) is not None:
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    scale = clip_divisor(norm, max_norm)
    opt.grad_scale, opt.grad_scale_norm = scale, norm
    return scale


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)) as the divisor an optimizer's grad_scale takes."""
    return torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0).reshape(1)


def optimizer_step(engine, cfg: TrainConfig) -> torch.Tensor | None:
    """engine.step() after a micro-batch's backward, as DeepSpeed expects after every one (it applies the update at
    the accumulation boundary); at a ZeRO-0 boundary clipping first. Returns clip_gradients()'s norm."""
    norm = clip_gradients(engine, cfg)
    try:
        engine.step()
    finally:
        opt = engine.optimizer
        if getattr(opt, "grad_scale", None) is not None:  # a clip factor for this step only
            opt.grad_scale = opt.grad_scale_norm = None
    return norm


# ----------------------------------------------------------------------------- activation checkpointing
def enable_activation_checkpointing(model: nn.Module, max_blocks: int | None = None) -> int:
    """Recompute transformer blocks of `model` in backward: all of them, or the first `max_blocks` (partial
    checkpointing: each recomputed block trades ~1/3 of its compute for most of its activation memory, so
    recompute only as many as the memory needs). The block's forward is wrapped in place, so parameter names
    (and so checkpoints and exports) do not change. Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
            for blk in mod:
                if max_blocks is not None and n >= max_blocks:
                    break
                if getattr(blk, "_act_ckpt", False):
                    continue
                inner = blk.forward

                def fwd(*args, _inner=inner, **kwargs):
                    if not torch.is_grad_enabled():
                        return _inner(*args, **kwargs)
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

                blk.forward = fwd
                blk._act_ckpt = True
                n += 1
    if n == 0 and max_blocks != 0:
        raise RuntimeError("activation checkpointing: found no '*blocks' ModuleList in the model")
    return n


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """A Linear whose `weight` is base + (B @ A) * alpha/r, with the base frozen and A, B trained.

    `weight` is computed, not stored, so code that reads `.weight` directly (the DiT's self-attention
    concatenates to_q/to_k/to_v weights into one matmul) sees the adapted weight too. The frozen base is
    `base_weight`; merge_lora_state_dict() folds it back into the released `weight` key."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: training starts exactly at the base model
        self.scale = alpha / rank

    @property
    def weight(self) -> torch.Tensor:
        return self.base_weight + (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> int:
    """Freeze `model` and put adapters on every nn.Linear whose name ends with one of `targets`."""
    model.requires_grad_(False)
    pat = re.compile(r"(^|\.)(" + "|".join(re.escape(t) for t in targets) + r")$")
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pat.search(n)]
    if not hits:
        linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise RuntimeError(f"model.lora.target_modules {targets} match no nn.Linear; the model has: {linears}")
    for name, lin in hits:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(lin, rank, alpha))
    return len(hits)


def merge_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every adapter folded into its base weight and no lora_* keys: the released layout."""
    return merge_lora_tensors(dict(model.state_dict()), model)


def merge_lora_tensors(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold `<m>.base_weight + <m>.lora_B @ <m>.lora_A * scale` into `<m>.weight` for every LoRALinear of `model`."""
    sd = dict(sd)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = sd.pop(f"{name}.lora_A").float(), sd.pop(f"{name}.lora_B").float()
            base = sd.pop(f"{name}.base_weight")
            sd[f"{name}.weight"] = (base.float() + (b @ a) * m.scale).to(base.dtype)
    return sd


# ----------------------------------------------------------------------------- data parallelism: a static graph
def needs_static_graph(cfg: TrainConfig, world_size: int) -> bool:
    """Whether every trainable parameter must get a gradient in every micro-batch (make_graph_static).

    Several ranks: for the collectives (below). One rank, ZeRO-3 or an offloaded optimizer: DeepSpeed 0.19.8 mixes
    up the gradients of parameters a micro-batch leaves unused (an MoE expert routed no token, the cross-attention
    of a CFG-dropped sample) when it accumulates over micro-batches; seen on CPU with the tiny model, whose third
    optimizer step got a 7 % larger gradient norm than the same step resumed from a checkpoint in a fresh
    process, and than ZeRO-0/1/2 (tests/ml/training/test_training_offload.py)."""
    d = cfg.deepspeed
    return world_size > 1 or d.zero_stage == 3 or d.offload_optimizer


def make_graph_static(model: nn.Module) -> int:
    """Under ZeRO with several ranks, every trainable parameter must take part in every forward, or the ranks'
    gradient hooks fire in different orders and the collectives no longer match (gloo: "Received data size
    doesn't match expected size"; NCCL: a hang or garbage). ml.models skips two kinds of work that depend on
    the data: MoE experts routed no token, and the cross-attention of a sample whose image context is all
    zeros (a CFG-dropped sample). Both skips return the same values as computing; here we switch them off
    (the models' own flags `MoE.every_expert` and `RefineDiT.skip_zero_context`), so every parameter gets a
    (zero) gradient on every rank. Returns the number of modules switched."""
    from ml.models.dit import RefineDiT

    n = run_every_expert(model)
    for m in model.modules():
        if isinstance(m, RefineDiT):
            m.skip_zero_context = False
            n += 1
    return n


def run_every_expert(model: nn.Module) -> int:
    """Switch on ml.models' MoE.every_expert: experts routed no token still run (on zero rows), so their
    weights get zero gradients instead of none. Same routing, same output. Returns the number of MoE blocks."""
    from ml.models.dit import MoE

    n = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.every_expert = True
            n += 1
    return n
