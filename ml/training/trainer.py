"""The training loop: data -> frozen encoders -> DiT flow-matching step under DeepSpeed -> logs, checkpoints, export.

    python -m ml.training --config configs/train_dit_refine.yaml                  # new run
    python -m ml.training --config configs/train_dit_refine.yaml --resume         # continue the newest run
    deepspeed --num_gpus 2 -m ml.training --config configs/train_dit_refine.yaml  # several GPUs
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ml.config import ConfigError, to_dict
from ml.training import checkpoint as ckpt
from ml.training.config import FROZEN_ON_RESUME, TrainConfig
from ml.training.data import DataOrder, RefineDataset, make_loader, val_batches
from ml.training.engine import (apply_lora, build_engine, compile_blocks, enable_activation_checkpointing,
                                init_distributed, make_graph_static, needs_static_graph)
from ml.training.export import DTYPES
from ml.training.logs import RunLogger, peak_tflops, plot_loss_curve

log = logging.getLogger("ml.training")


class BrokenDataError(RuntimeError):
    """Too many samples failed to load: the processed dataset is damaged."""


def _all_sum(x: float, device: torch.device) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(x)], device=device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())
    return float(x)


def _get(d: dict, dotted: str) -> Any:
    for p in dotted.split("."):
        d = d.get(p, {}) if isinstance(d, dict) else {}
    return d


class BrokenUids:
    """The distinct training samples that failed to load. The limit is a share of the training list, so a
    sample counts once however many epochs draw it (one bad mesh in 100 must not stop a run at epoch 6)."""

    def __init__(self, max_fraction: float, n_train: int, log_path: Path) -> None:
        self.max_fraction, self.n_train, self.log_path = max_fraction, n_train, log_path
        self.uids: set[str] = set()

    def __len__(self) -> int:
        return len(self.uids)

    def update(self, uids) -> None:
        """Restore (a resume): no check, the saved run was within its limit."""
        self.uids.update(uids)

    def add(self, uids) -> None:
        before = len(self.uids)
        self.uids.update(uids)
        if len(self.uids) > before and len(self.uids) > max(self.max_fraction * self.n_train, 0):
            raise BrokenDataError(
                f"{len(self.uids)} distinct training samples failed to load (see {self.log_path}), more than "
                f"data.max_broken_fraction={self.max_fraction} of {self.n_train}; re-run ml.processing"
            )


class Trainer:
    def __init__(self, cfg: TrainConfig, config_path: Path | None, resume: str | None, argv: list[str]) -> None:
        self.rank, self.local_rank, self.world = init_distributed(cfg)
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.is_main = self.rank == 0
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank{self.rank}] %(levelname)s %(name)s: %(message)s")

        # ---- run folder: new, or the one we resume
        self.resume_dir: Path | None = None
        if resume is not None:
            self.resume_dir = ckpt.resolve_resume(resume, cfg.run.output_dir, cfg.run.run_id)
            run_dir = self.resume_dir.parent.parent
            saved = json.loads((run_dir / "config.json").read_text())
            now = to_dict(cfg)
            for key in FROZEN_ON_RESUME:
                if _get(saved, key) != _get(now, key):
                    raise ConfigError(
                        f"--resume {run_dir}: '{key}' was {_get(saved, key)!r} and is now {_get(now, key)!r}; "
                        f"a checkpoint cannot change it. Start a new run, or set {key}={_get(saved, key)!r}"
                    )
            cfg = replace(cfg, run=replace(cfg.run, run_id=run_dir.name))
        else:
            rid = cfg.run.run_id
            if rid is None and self.is_main:
                stem = config_path.stem if config_path else "run"
                rid = f"{stem}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
            rid = ckpt.broadcast_from_rank0(rid)
            run_dir = cfg.run.output_dir / rid
            if self.is_main and (run_dir / "checkpoints" / "latest").exists():
                raise ConfigError(f"{run_dir} already has checkpoints: pass --resume to continue it, or another run.run_id")
            cfg = replace(cfg, run=replace(cfg.run, run_id=rid))
        self.cfg, self.run_dir = cfg, run_dir
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "command.txt", "a") as f:  # one line per start (resumes append)
                f.write(" ".join([os.path.basename(sys.executable)] + argv) + f"  # world_size={self.world}\n")
            ckpt.write_json(run_dir / "config.json", to_dict(cfg))
        if dist.is_initialized():
            dist.barrier()

        if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
            # CPU runs (tests, the tiny demo) are many small ops: one intra-op thread is 10-30x faster than
            # several spinning threads on a busy machine (measured: 0.5 -> 15 samples/s on 2 shared cores).
            torch.set_num_threads(1)

        # ---- seeds (per rank, so ranks draw different noise); a resume restores the saved states below
        seed = cfg.run.seed + 1000 * self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

        # ---- models: frozen encoders outside DeepSpeed, the DiT inside
        from ml.training.step import build_models

        self.models = build_models(cfg, self.device, run_dir / "latent_cache" if cfg.data.latent_cache else None)
        dit = self.models.dit
        if cfg.model.lora.enabled:
            n = apply_lora(dit, cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
            log.info("LoRA: adapters on %d linear layers (rank %d)", n, cfg.model.lora.rank)
        if needs_static_graph(cfg, self.world):
            make_graph_static(dit)
        if cfg.model.compile:
            log.info("torch.compile: %d DiT blocks (the first steps compile them)", compile_blocks(dit))
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(dit, cfg.model.checkpoint_blocks)
        n_train = sum(p.numel() for p in dit.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in dit.parameters())
        log.info("DiT: %.2f M parameters, %.2f M trainable", n_all / 1e6, n_train / 1e6)
        universal = None
        if (self.resume_dir is not None and cfg.deepspeed.zero_stage >= 1
                and ckpt.saved_world_size(self.resume_dir) != self.world):
            # ZeRO cuts the optimizer state per rank; without ZeRO every rank saved (rank 0 wrote) all of it
            universal = ckpt.ensure_universal(self.resume_dir, self.rank)
        self.engine = build_engine(dit, cfg, self.world, load_universal=universal is not None)
        self.ckpt_estimate = ckpt.estimate_bytes(self.engine)
        # the export: every network's weights in train.export_dtype (LoRA adapters are merged away)
        self.export_estimate = DTYPES[cfg.train.export_dtype].itemsize * sum(
            p.numel() for part in (self.models.vae, dit, self.models.conditioner)
            for n, p in part.named_parameters() if "lora_" not in n) if cfg.train.export else 0
        ckpt.refuse_from_rank0(ckpt.preflight(run_dir / "checkpoints", self.ckpt_estimate, cfg.train.keep_checkpoints,
                                              self.export_estimate) if self.is_main else None)

        # ---- data
        t = cfg.train
        self.train_ds = RefineDataset(cfg.data, "train", seed=cfg.run.seed)
        self.val_ds = RefineDataset(cfg.data, "val", seed=cfg.run.seed + 1)
        self.order = DataOrder(len(self.train_ds), cfg.run.seed, t.micro_batch, self.rank, self.world)

        # ---- state
        self.step = 0  # optimizer steps done
        self.micro = 0  # global micro-batches drawn (data position)
        self.broken: list[dict] = []  # this rank's broken training samples since the last optimizer step
        self.broken_uids = BrokenUids(cfg.data.max_broken_fraction, len(self.train_ds), run_dir / "broken_samples.jsonl")
        self.samples_seen = 0  # training samples of all optimizer steps so far (over resumes and world sizes)
        self.elapsed = 0.0  # training seconds before this process (for the ETA and samples/s over resumes)
        if self.resume_dir is not None:
            client = ckpt.load(self.engine, self.resume_dir, self.rank, self.world, universal)
            self.step = int(client["step"])
            self.micro = self.order.convert(int(client["micro_step"]), int(client["world_size"]))
            self.broken_uids.update(client.get("broken_uids", []))
            self.elapsed = float(client.get("elapsed_s", 0.0))
            self.samples_seen = int(client.get("samples_seen", 0))
            if self.engine.global_steps != self.step:
                raise ckpt.ResumeError(f"{self.resume_dir}: DeepSpeed step {self.engine.global_steps} != trainer step {self.step}")
            log.info("resumed %s at step %d (data position %d, epoch %d)", self.resume_dir, self.step, self.micro,
                     self.order.epoch_of(self.micro))
        self.logger = RunLogger(run_dir, to_dict(cfg), cfg.run.run_id, self.step if self.resume_dir else None,
                                cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project, self.is_main)
        self.peak = peak_tflops(cfg.logging.peak_tflops)
        self.flops_per_sample: float | None = None

    # ------------------------------------------------------------------ one micro-batch
    def _next_batch(self, it) -> dict[str, Any]:
        """The next micro-batch all ranks can train on. Broken samples are logged and counted; when any rank's
        micro-batch is empty, every rank skips that position (collectives need the same number of forwards)."""
        while True:
            batch = next(it)
            self.micro += 1
            for b in batch["broken"]:
                self._report_broken(b, "train")
            empty = _all_sum(0.0 if batch["uid"] else 1.0, self.device)
            if empty == 0:
                return batch

    def _report_broken(self, b: dict, split: str) -> None:
        rec = {"step": self.step, "rank": self.rank, "split": split, "epoch": self.order.epoch_of(self.micro), **b,
               "time": time.time()}
        log.warning("broken %s sample %s skipped: %s", split, b["uid"], b["error"])
        with open(self.run_dir / "broken_samples.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if split == "train":  # the limit is a share of the training list; validation samples are only logged
            self.broken.append(rec)

    # ------------------------------------------------------------------ loop
    def fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        self.interrupted = 0
        self._signal = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        eng = self.engine
        it = make_loader(self.train_ds, self.order, self.micro, cfg.data.num_workers)
        from ml.training.step import StepRunner

        runner = StepRunner(self.models, eng, cfg, draw=lambda: self._next_batch(it),
                            snapshot=lambda: (self.micro, ckpt.rng_state()), overlap=t.overlap_encoders)
        samples_per_step = t.micro_batch * t.grad_accum * self.world
        win_t0, win_steps, win_n = time.time(), 0, 0
        win_loss = torch.zeros((), device=self.device)  # summed on the GPU: no host wait per step
        last_saved = self.step if self.resume_dir else -1
        tokens_per_sample = None
        if self.resume_dir is None and self.step == 0 and t.val_every:
            self.validate()  # the curve's starting point: the loaded weights before any update
        eng.train()
        if self.is_main:
            log.info("training %s: steps %d -> %d, %d samples/step (%d x %d accum x %d ranks)", self.run_dir, self.step,
                     t.max_steps, samples_per_step, t.micro_batch, t.grad_accum, self.world)
        while self.step < t.max_steps:
            nxt = self.step + 1
            # Draw the next step's first micro-batch during this one, unless a checkpoint, validation or the end
            # follows it (a checkpoint must hold the data position and random states of a finished step).
            draw_ahead = nxt < t.max_steps and nxt % t.ckpt_every != 0 and not (t.val_every and nxt % t.val_every == 0)
            count = self.flops_per_sample is None
            loss_sum, norm = runner.step(draw_ahead, count_flops=count)
            if count:
                self.flops_per_sample = self.models.train_flops_per_sample()
            logs_next = nxt % t.log_every == 0 or nxt == t.max_steps
            # ZeRO-0: we clip (DeepSpeed keeps no norm there); the pre-clip global norm is logged
            own_norm = float(norm) if norm is not None and logs_next else None
            win_loss += loss_sum
            win_n += t.grad_accum
            if tokens_per_sample is None:
                tokens_per_sample = self.models.last_tokens
            self.step += 1
            self.samples_seen += samples_per_step
            if eng.global_steps != self.step:
                raise RuntimeError(f"DeepSpeed made {eng.global_steps} optimizer steps, expected {self.step}: "
                                   "accumulation boundary out of sync")
            win_steps += 1
            stop = self._sync_step()

            if self.step % t.log_every == 0 or self.step == t.max_steps or stop:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                dt = time.time() - win_t0
                self.elapsed += dt
                sps = win_steps * samples_per_step / dt
                loss_avg = _all_sum(float(win_loss) / max(win_n, 1), self.device) / self.world
                rec = {
                    "kind": "train", "step": self.step, "max_steps": t.max_steps, "loss": loss_avg,
                    "lr": float(eng.get_lr()[0]), "grad_norm": own_norm if own_norm is not None else _f(eng.get_global_grad_norm()),
                    "moe_aux_loss": self.models.moe_aux_loss(),
                    "samples_per_s": sps, "tokens_per_s": sps * (tokens_per_sample or 0),
                    "step_time_s": dt / win_steps,
                    "mfu": (sps * self.flops_per_sample / self.world / (self.peak * 1e12)) if self.peak and self.flops_per_sample else None,
                    "gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                    "epoch": self.order.epoch_of(self.micro),
                    "broken_samples": len(self.broken_uids),
                    "eta_s": (t.max_steps - self.step) * dt / win_steps,
                    "time": time.time(),
                }
                self.logger.write(rec)
                if self.is_main:
                    log.info("step %d/%d loss %.4f lr %.2e gnorm %s %.2f samples/s", self.step, t.max_steps, loss_avg,
                             rec["lr"], rec["grad_norm"], sps)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                win_t0, win_steps, win_n = time.time(), 0, 0
                win_loss.zero_()

            if stop:
                # SIGTERM (pod stop, `kill`) or Ctrl-C: finish here with a checkpoint; --resume continues exactly
                log.warning("signal %d: saving step %d and stopping (resume with --resume)", stop, self.step)
                ahead = runner.rewind()  # the micro-batch drawn for the next step: not used, so not consumed
                if ahead is not None:
                    self.micro, rng = ahead
                    ckpt.set_rng_state(rng)
                if last_saved != self.step:
                    self.save()
                self.logger.close()
                self.interrupted = stop
                return self.run_dir
            if t.val_every and self.step % t.val_every == 0 and self.step != t.max_steps:
                self.validate()
                win_t0 = time.time()
            if self.step % t.ckpt_every == 0 and self.step != t.max_steps:
                self.save()
                last_saved = self.step
                win_t0 = time.time()

        self.validate()
        if last_saved != self.step:
            self.save()
        if t.export:
            from ml.training.export import export_run

            ckpt.refuse_from_rank0(ckpt.make_room(self.run_dir / "checkpoints", int(self.export_estimate * ckpt.MARGIN),
                                                  "the export")
                                   if self.is_main else None)
            export_run(self)
        if self.is_main and cfg.logging.loss_curve:
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png", cfg.run.run_id)
        self.logger.close()
        if dist.is_initialized():
            dist.barrier()
        return self.run_dir

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once

    def _sync_step(self) -> int:
        """One collective per optimizer step: newly broken training samples and whether any rank got a stop
        signal; a second one (gathering the new uids) only in a step where some rank found a new broken uid."""
        new = sorted({b["uid"] for b in self.broken} - self.broken_uids.uids)
        self.broken.clear()
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            # one rank: nothing to agree on, and no GPU round trip (it would make the host wait for the step)
            if new:
                self.broken_uids.add(new)
            return int(self._signal)
        t = torch.tensor([float(len(new)), float(self._signal)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        if float(t[0]) > 0:
            # every rank takes this branch (the sum is the same everywhere), so the gather is collective
            parts: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, new)
            self.broken_uids.add([u for p in parts for u in p])
        if float(t[1]) > 0:  # this rank's signal, or another rank's (then say SIGTERM)
            return int(self._signal or signal.SIGTERM)
        return 0

    @torch.no_grad()
    def validate(self) -> float | None:
        t = self.cfg.train
        if len(self.val_ds) < self.world * t.micro_batch:
            return None
        self.engine.eval()
        tot, n = 0.0, 0
        for i, batch in enumerate(val_batches(self.val_ds, t.micro_batch, t.val_batches, self.rank, self.world)):
            empty = _all_sum(0.0 if batch["uid"] else 1.0, self.device)
            for b in batch["broken"]:
                self._report_broken(b, "val")
            if empty:
                continue
            # fixed noise and timesteps per validation batch: evaluations are comparable across the run
            # a CPU generator: the VAE draws its voxel/point permutations on the CPU
            gen = torch.Generator().manual_seed(self.cfg.run.seed * 100003 + self.rank * 1009 + i)
            tot += float(self.models.loss(self.engine, batch, train=False, gen=gen))
            n += 1
        self.engine.train()
        tot, n = _all_sum(tot, self.device), _all_sum(n, self.device)
        if n == 0:
            return None
        val = tot / n
        self.logger.write({"kind": "val", "step": self.step, "max_steps": t.max_steps, "val_loss": val, "time": time.time()})
        if self.is_main:
            log.info("step %d val loss %.4f (%d batches)", self.step, val, int(n))
        return val

    def save(self) -> Path:
        state = {"step": self.step, "micro_step": self.micro, "world_size": self.world,
                 "samples_seen": self.samples_seen,
                 "broken_samples": len(self.broken_uids), "broken_uids": sorted(self.broken_uids.uids),
                 "elapsed_s": self.elapsed, "run_id": self.cfg.run.run_id,
                 "checkpoint_bytes_estimate": self.ckpt_estimate, "time": time.time()}
        ck = self.run_dir / "checkpoints"
        need = ckpt.checkpoint_need(ck, self.ckpt_estimate) if self.is_main else None
        p = ckpt.save(self.engine, ck, self.step, state, self.cfg.train.keep_checkpoints, self.rank, need=need)
        if self.is_main:
            log.info("checkpoint %s", p)
        return p


def _f(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)
