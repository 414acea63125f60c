"""Export a run's DiT to the official inference layout: <run>/export/ultrashape.pt.

The file is {"vae", "dit", "conditioner"} like the released ultrashape_v1.pt (plus our "ultrashape_kit"
metadata), so ml.refine and the official inference script load it. The DiT weights are the fp32 master weights
gathered from every ZeRO partition, with LoRA adapters merged; the frozen VAE and conditioner are copied
unchanged from model.weights (not from their bf16 training copies).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ml.config import to_dict
from ml.models.checkpoint import build_models, export_official, load_checkpoint, materialize
from ml.training.checkpoint import write_json
from ml.training.engine import merge_lora_tensors

if TYPE_CHECKING:
    from ml.training.trainer import Trainer

log = logging.getLogger(__name__)

EXPORT_NAME = "ultrashape.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gather_full_state_dict(engine, module: torch.nn.Module,
                           frozen: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Collective (every rank calls it). Full fp32 weights of `module` on CPU, ZeRO 0-3, LoRA merged.

    Trainable parameters come from the optimizer's fp32 master copy (safe_get_full_fp32_param, or MasterAdamW's);
    frozen ones (LoRA bases) from `frozen` when given (by module name: their full-precision values from the
    weights file, since precision bf16 keeps only bf16 copies in the module), else from the module, gathered
    first under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    opt = engine.optimizer
    masters = {}
    if hasattr(opt, "master_params"):  # MasterAdamW (precision bf16, ZeRO-0): the module holds bf16 copies
        order = [p for g in opt.param_groups for p in g["params"]]
        masters = {id(p): m for p, m in zip(order, opt.master_params())}
    for name, p in module.named_parameters():
        full = masters.get(id(p))
        if full is None and p.requires_grad:
            full = safe_get_full_fp32_param(p)
        if full is None:
            if hasattr(p, "ds_id"):  # ZeRO-3 partitioned: a collective, so every rank gathers, `frozen` or not
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().clone()
            else:
                full = p.detach()
            if frozen is not None and name in frozen:
                full = frozen[name]
        out[name] = full.detach().float().cpu()
    for name, b in module.named_buffers():
        if name in dict(module.state_dict(keep_vars=True)):
            out[name] = b.detach().cpu()
    # fold adapters into their base weights: the exported DiT has exactly the released keys
    return merge_lora_tensors(out, module)


def frozen_from(fresh_dit: torch.nn.Module, trained_dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full-precision starting values of `trained_dit`'s frozen parameters, by its own names, from a freshly
    loaded DiT (a LoRA base `<m>.base_weight` is the file's `<m>.weight`)."""
    src = fresh_dit.state_dict()
    out = {}
    for name, p in trained_dit.named_parameters():
        if not p.requires_grad:
            key = name[: -len(".base_weight")] + ".weight" if name.endswith(".base_weight") else name
            out[name] = src[key].detach().float()
    return out


def export_run(tr: "Trainer") -> Path | None:
    cfg = tr.cfg
    path = tr.run_dir / "export" / EXPORT_NAME
    models = None
    if tr.is_main:
        # A fresh CPU copy of the three networks: the released (or seeded random) VAE and conditioner in full
        # precision, and the starting DiT, whose frozen weights (LoRA) the export keeps bit for bit.
        arch = cfg.model.arch
        if cfg.model.weights is not None:
            models = materialize(build_models(arch, device="meta"), device="cpu")
            load_checkpoint(models, cfg.model.weights)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.run.seed)
                models = build_models(arch, device="cpu")
    frozen = frozen_from(models.dit, tr.models.dit) if models is not None else None
    sd = gather_full_state_dict(tr.engine, tr.models.dit, frozen)
    if tr.is_main:
        models.dit.load_state_dict(sd, strict=True)
        meta = {"run_id": cfg.run.run_id, "step": tr.step, "base_weights": str(cfg.model.weights),
                "train_config": to_dict(cfg)}
        export_official(models, path, config=arch, meta=meta, dtype=DTYPES[cfg.train.export_dtype])
        write_json(tr.run_dir / "export" / "export.json",
                   {"file": EXPORT_NAME, "step": tr.step, "run_id": cfg.run.run_id, "dtype": cfg.train.export_dtype,
                    "base_weights": str(cfg.model.weights), "lora_merged": cfg.model.lora.enabled,
                    "load": f"python -m ml.refine --ckpt {path} --config configs/infer_dit_refine.yaml ..."})
        log.info("exported %s (step %d)", path, tr.step)
    if dist.is_initialized():
        dist.barrier()
    return path if tr.is_main else None
