"""Run logging (rank 0 only): metrics.jsonl, TensorBoard, W&B, the loss-curve PNG.

metrics.jsonl holds one JSON object per line. Training lines have at least
    {"kind": "train", "step", "max_steps", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
     "mfu", "gpu_mem_gb", "eta_s", "time"}
and validation lines {"kind": "val", "step", "max_steps", "val_loss", "time"}; `time` is Unix seconds.
`fab status` reads the last train line. After a resume the lines past the resumed step are dropped first, so
the file never holds a step twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ml.training.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s (MFU's denominator).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A40": 149.7, "L40S": 362.0, "L40": 181.0, "A6000": 154.8, "4090": 165.2}


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return None


class RunLogger:
    def __init__(self, run_dir: Path, cfg_dict: dict[str, Any], run_id: str, resume_step: int | None,
                 tensorboard: bool, wandb_mode: str, wandb_project: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self._f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the resumed step, as metrics.jsonl does.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        mode = wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=run_id, id=run_id, resume="allow", mode=mode,
                                        dir=str(run_dir), config=cfg_dict)
                if mode == "offline":
                    log.info("W&B offline (no WANDB_API_KEY): `wandb sync %s/wandb/offline-run-*` uploads it later", run_dir)
            except Exception as e:  # noqa: BLE001 - W&B is a mirror of metrics.jsonl; never fail training for it
                log.warning("W&B disabled: %s", e)
                self.wandb = None

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        step = rec["step"]
        prefix = "val/" if rec.get("kind") == "val" else "train/"
        scalars = {prefix + k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("step", "time", "max_steps")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for ln in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def plot_loss_curve(metrics_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and r.get("loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val loss", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
