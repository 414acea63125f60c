"""The models of a training run and the loss of one micro-batch.

Frozen: the ShapeVAE encoder (surface points -> latents + voxel indices) and the DINOv2 conditioner (view ->
image tokens); they stay outside DeepSpeed, in bf16 on the GPU. Trained: the RefineDiT, inside the engine.

    loss = mean || DiT(t x1 + (1-t) x0, t, image tokens, voxel idx) - (x1 - x0) ||^2,  t ~ U[0,1], x0 ~ N(0, I)

with the image tokens zeroed for a `model.cfg_drop` share of samples (classifier-free guidance), as the
official trainer does. The MoE load-balancing loss enters through the DiT's own backward (see ml.models.dit).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ml.models.checkpoint import UltraShapeModels, build_models as _build, load_checkpoint, materialize
from ml.models.flow_matching import flow_matching_loss
from ml.training.config import TrainConfig
from ml.training.engine import optimizer_step

log = logging.getLogger(__name__)


def _uid_seed(seed: int, uid: str) -> int:
    """A stable 63-bit seed for one sample (Python's hash() of a str changes per process)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{uid}".encode(), digest_size=8).digest(), "little") >> 1


class TrainModels:
    def __init__(self, models: UltraShapeModels, cfg: TrainConfig, device: torch.device, cache_dir: Path | None):
        self.cfg = cfg
        self.device = device
        self.dit = models.dit
        enc_dtype = torch.float32 if cfg.deepspeed.precision == "fp32" else torch.bfloat16
        self.vae = models.vae.to(device, enc_dtype).eval().requires_grad_(False)
        self.conditioner = models.conditioner.to(device, enc_dtype).eval().requires_grad_(False)
        self.cache_dir = cache_dir
        self.last_tokens: int | None = None
        self.flops: dict[str, float] = {}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    # ---- frozen encoders
    @torch.no_grad()
    def encode(self, batch: dict[str, Any], gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> DiT-space latents x1 (B, K, C) float32 and voxel indices (B, K, 3)."""
        vae = self.vae
        dtype = vae.pre_kl.weight.dtype
        if self.cache_dir is None:
            z, vidx = vae.encode(_to(batch["surface"], self.device, dtype), sample_posterior=True, generator=gen)
            self.last_tokens = z.shape[1]
            return z.float(), vidx
        # Latent cache: the posterior (mean, logvar) and voxel indices of the first encoding of each sample,
        # so later epochs skip the encoder; a fresh posterior sample is still drawn every time.
        means, logvars, vidxs = [], [], []
        for i, uid in enumerate(batch["uid"]):
            f = self.cache_dir / f"{uid}.pt"
            if f.is_file():
                m, lv, vi = torch.load(f, map_location=self.device)
            else:
                # Its own generator from (run seed, uid): encode_tokens otherwise draws its voxel and point
                # permutations from the global CPU RNG (or `gen`), which a cached sample skips, so a resumed run
                # (cache already filled) would shift every later random draw and no longer match bit for bit.
                own = torch.Generator().manual_seed(_uid_seed(self.cfg.run.seed, uid))
                m, lv, vi = vae.encode_tokens(batch["surface"][i : i + 1].to(self.device, dtype), generator=own)
                tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
                torch.save((m.cpu(), lv.cpu(), vi.cpu()), tmp)
                os.replace(tmp, f)
            means.append(m), logvars.append(lv), vidxs.append(vi)
        k = min(m.shape[1] for m in means)  # the official rule: the batch shares the smallest token count
        mean = torch.cat([m[:, :k] for m in means]).float()
        logvar = torch.cat([lv[:, :k] for lv in logvars]).float()
        vidx = torch.cat([v[:, :k] for v in vidxs]).to(self.device)
        noise = torch.randn(mean.shape, generator=gen, device=gen.device if gen is not None else self.device)
        z = (mean + torch.exp(0.5 * logvar) * noise.to(mean)) * vae.cfg.scale_factor
        self.last_tokens = k
        return z, vidx

    @torch.no_grad()
    def condition(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> image tokens (B, S, D) and token mask (B, S) (True = real token)."""
        dtype = next(self.conditioner.parameters()).dtype
        return self.conditioner(_to(batch["image"], self.device, dtype), _to(batch["mask"], self.device, dtype))

    # ---- the loss of one micro-batch
    def loss(self, engine, batch: dict[str, Any], train: bool, gen: torch.Generator | None = None,
             count_flops: bool = False) -> torch.Tensor:
        return self.dit_loss(engine, self.inputs(batch, train, gen, count_flops), gen, count_flops)

    def inputs(self, batch: dict[str, Any], train: bool, gen: torch.Generator | None = None,
               count_flops: bool = False) -> tuple:
        """The frozen half of a micro-batch: (x1, voxel indices, image tokens, token mask or None)."""
        if not count_flops:
            return self._inputs(batch, train, gen)
        from torch.utils.flop_counter import FlopCounterMode

        enc_fc = FlopCounterMode(display=False)
        with enc_fc:
            out = self._inputs(batch, train, gen)
        self.flops = {"encoders": float(enc_fc.get_total_flops()), "samples": float(out[0].shape[0])}
        return out

    def dit_loss(self, engine, inputs: tuple, gen: torch.Generator | None = None,
                 count_flops: bool = False) -> torch.Tensor:
        """The trained half: flow-matching loss of the DiT on `inputs` (from inputs())."""
        if count_flops:
            self.flops["dit_forward"] = self.count_dit_flops(engine, *inputs, gen)
        return self._dit_loss(engine, *inputs, gen)

    def count_dit_flops(self, engine, x1, vidx, cond, cond_mask, gen) -> float:
        """FLOPs of one DiT forward, counted on a throwaway forward that leaves no trace: no autograd, eager, and
        every random state it draws from put back. Not the training forward itself: dynamo cannot trace under
        FlopCounterMode's dispatch mode and would mark compiled blocks (model.compile) 'skip' for the whole run,
        and an eager forward under activation checkpointing would be recomputed compiled (a different set of
        saved tensors). Without autograd the MoE experts also run as plain matmuls, which the counter sees."""
        from torch.utils.flop_counter import FlopCounterMode

        fc = FlopCounterMode(display=False)
        saved = gen.get_state() if gen is not None else None
        devices = [x1.device] if x1.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), torch.compiler.set_stance("force_eager"), fc:
            self._dit_loss(engine, x1, vidx, cond, cond_mask, gen)
        if gen is not None:
            gen.set_state(saved)
        return float(fc.get_total_flops())

    def _inputs(self, batch, train, gen):
        x1, vidx = self.encode(batch, gen)
        cond, cond_mask = self.condition(batch)
        p = self.cfg.model.cfg_drop
        if train and p > 0:
            r = torch.rand(cond.shape[0], generator=gen, device=gen.device if gen is not None else self.device)
            dropped = (r < p).to(cond.device)
            # official: a dropped sample's tokens become zeros, all of them real (no padding)
            cond = torch.where(dropped[:, None, None], torch.zeros_like(cond), cond)
            cond_mask = cond_mask | dropped[:, None]
        if cond_mask is not None and bool(cond_mask.all()):
            # No padding in this batch (always so at batch 1): without a mask SDPA can pick the flash/cuDNN
            # kernels; any boolean mask, even all-True, forces the slower memory-efficient one. Decided here,
            # with the encoders (the host waits for them anyway), not in the DiT's half, where reading the
            # mask would make the host wait for the previous step's optimizer (StepRunner overlaps the two).
            cond_mask = None
        return x1, vidx, cond, cond_mask

    def _dit_loss(self, engine, x1, vidx, cond, cond_mask, gen):
        dt = _param_dtype(engine)

        def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return engine(xt.to(dt), t.to(dt), cond.to(dt), vidx, cond_mask)

        return flow_matching_loss(velocity, x1, generator=gen)

    def train_flops_per_sample(self) -> float | None:
        """Model FLOPs of one training sample: encoders forward + DiT forward and backward (3x forward).
        Recomputation by activation checkpointing is not counted (MFU's convention)."""
        if not self.flops:
            return None
        return (self.flops["encoders"] + 3.0 * self.flops["dit_forward"]) / self.flops["samples"]

    def moe_aux_loss(self) -> float | None:
        v = self.dit.moe_aux_loss() if hasattr(self.dit, "moe_aux_loss") else None
        return None if v is None else float(v)


class StepRunner:
    """Optimizer steps as ml.training runs them: per micro-batch the frozen encoders (TrainModels.inputs), the DiT
    loss and backward, and engine.step(); at the accumulation boundary clipping and the optimizer (optimizer_step).

    Drawing ahead: right after a micro-batch's backward is queued, the next micro-batch is drawn and its frozen
    encoders are queued too -- with `overlap` on CUDA on a second stream, so they run beside this backward and the
    optimizer instead of after them. The random draws keep their order (the next micro-batch's encoder draws come
    after this one's loss draws either way), so a run is bit-identical with or without it. The host never waits
    for the GPU inside a step: losses and the norm come back as tensors.
    A micro-batch drawn ahead belongs to the next step; rewind() hands back the state from before it was drawn,
    for a checkpoint written when the run stops there (the trainer draws ahead only when no checkpoint,
    validation or end is due after the step)."""

    def __init__(self, models: TrainModels, engine, cfg: TrainConfig, draw: Callable[[], dict[str, Any]],
                 snapshot: Callable[[], Any], overlap: bool) -> None:
        self.models, self.engine, self.cfg = models, engine, cfg
        self.draw, self.snapshot = draw, snapshot
        dev = models.device
        self.stream = torch.cuda.Stream(dev) if overlap and dev.type == "cuda" else None
        # (inputs, snapshot taken before drawing them, the stream that made them or None)
        self.ahead: tuple[tuple, Any, torch.cuda.Stream | None] | None = None
        self._retries: int | None = None

    def step(self, draw_ahead: bool, count_flops: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step of train.grad_accum micro-batches. draw_ahead: also prepare the next step's first
        micro-batch. Returns (sum of the micro-batch losses, pre-clip global gradient norm or None), unsynced."""
        gas = self.cfg.train.grad_accum
        total, norm = None, None
        for m in range(gas):
            count = count_flops and m == 0
            inputs = self._take(count)
            loss = self.models.dit_loss(self.engine, inputs, None, count)
            del inputs
            self.engine.backward(loss)
            if m < gas - 1 or draw_ahead:
                self._draw_ahead()
            norm = optimizer_step(self.engine, self.cfg)  # DeepSpeed counts micro-steps; it applies at the boundary
            total = loss.detach() if total is None else total + loss.detach()
        if self.stream is not None:
            self._watch_memory()
        return total, norm

    def _watch_memory(self) -> None:
        """The side stream needs room for the encoders' activations beside the backward's. Where there is none, the
        caching allocator keeps freeing one stream's cached memory for the other (a device-wide sync each time):
        measured 1.63 -> 1.97 s per 4-micro-batch step (autocast, 75.5 GiB peak on an 80 GB H100). It shows as
        allocation retries; once a step retries, the encoders go back in line for the rest of the run."""
        retries = int(torch.cuda.memory_stats(self.models.device).get("num_alloc_retries", 0))
        if self._retries is not None and retries > self._retries:
            log.warning("train.overlap_encoders: GPU memory too tight to run the frozen encoders beside the backward "
                        "(%d allocation retries in a step); running them in order from now on", retries - self._retries)
            self.stream = None
        self._retries = retries

    def rewind(self) -> Any:
        """Drop a micro-batch drawn ahead; returns the snapshot from before it was drawn (None if none was)."""
        if self.ahead is None:
            return None
        (_, snap, stream), self.ahead = self.ahead, None
        if stream is not None:
            stream.synchronize()
        return snap

    def _take(self, count_flops: bool) -> tuple:
        if self.ahead is None:
            return self.models.inputs(self.draw(), True, None, count_flops)
        (inputs, _, stream), self.ahead = self.ahead, None
        if stream is not None:
            main = torch.cuda.current_stream(self.models.device)
            main.wait_stream(stream)
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    t.record_stream(main)  # made on the side stream, used (and freed) on this one
        return inputs

    def _draw_ahead(self) -> None:
        snap, stream = self.snapshot(), self.stream
        if stream is None:
            self.ahead = (self.models.inputs(self.draw(), True), snap, None)
            return
        # No wait on the main stream: the encoders read only the batch and their own frozen weights.
        with torch.cuda.stream(stream):
            self.ahead = (self.models.inputs(self.draw(), True), snap, stream)


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host -> GPU without blocking the host when the loader pinned the batch (then convert on the GPU)."""
    return x.to(device, non_blocking=x.is_pinned()).to(dtype)


def _param_dtype(engine) -> torch.dtype:
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    return torch.float32


def build_models(cfg: TrainConfig, device: torch.device, cache_dir: Path | None = None) -> TrainModels:
    """Build VAE + DiT + conditioner at cfg.model.arch and load cfg.model.weights strictly (all three parts)."""
    arch = cfg.model.arch
    if cfg.model.weights is not None:
        models = materialize(_build(arch, device="meta"), device="cpu")
        meta = load_checkpoint(models, cfg.model.weights)
        log.info("loaded %s (strict: vae, dit, conditioner)%s", cfg.model.weights,
                 f" meta {sorted(meta)}" if meta else "")
    else:
        # Random init (tests and the tiny demo). Seeded so every rank builds the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            models = _build(arch, device="cpu")
        log.warning("model.weights is null: the DiT starts from random weights, not the released checkpoint")
    return TrainModels(models, cfg, device, cache_dir)


def count_params(m: nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)
