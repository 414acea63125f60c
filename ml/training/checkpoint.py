"""Atomic, resumable checkpoints of a DeepSpeed run, and `--resume` resolution.

Layout of a run's checkpoints/ folder:

    step_0000100/          DeepSpeed files (weights, ZeRO optimizer partitions, LR scheduler, client state)
                           + rng_rank<r>.pt (python, numpy, torch and CUDA generator states of rank r)
    step_0000200/
    latest                 text: the newest complete step folder's name

Every rank writes into `.tmp-step_NNNNNNN/`; after a barrier rank 0 renames it to `step_NNNNNNN/` and then
replaces `latest` (write temp + os.replace). A kill at any moment leaves either the previous checkpoint as
`latest` or the new one, never a half-written one that `latest` names (a step saved twice: see _install).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_FMT = "step_{:07d}"
UNIVERSAL_SUFFIX = "-universal"


class ResumeError(RuntimeError):
    """--resume cannot find or use a checkpoint."""


class DiskSpaceError(RuntimeError):
    """No room for a checkpoint or the export; the message says what is free, what is needed and the way out."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a no-op with one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# ------------------------------------------------------------------------------------------------
# Disk space: a checkpoint of the full-size model is ~43 GB; finding out at step 3,000 that the volume is full
# wastes the GPU hours since the last one.
# ------------------------------------------------------------------------------------------------

GB = 1e9
PER_TENSOR = 400  # torch.save's record, alignment and pickled metadata per tensor (measured on the tiny model)
MARGIN = 1.02  # a checkpoint's size varies a little (pickled metadata); ask for a bit more than the last one


def estimate_bytes(engine) -> int:
    """One checkpoint's size on disk before any is written: the module's tensors as held, plus fp32 Adam moments
    for every trainable parameter and an fp32 master copy of each trainable one held in a lower precision (DeepSpeed's
    bf16 optimizers, MasterAdamW). DeepSpeed's ZeRO optimizers keep (and save) a flat fp32 copy of their partition
    even over fp32 weights. ZeRO-3 (partitioned module tensors are not saved whole) comes out a little high."""
    zero = engine.zero_optimization_stage()
    total = 0
    for p in engine.module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n * p.element_size() + PER_TENSOR
        if p.requires_grad:
            total += n * (8 if p.dtype == torch.float32 and zero == 0 else 12) + 3 * PER_TENSOR
    for b in engine.module.buffers():
        total += b.numel() * b.element_size() + PER_TENSOR
    return total


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _steps(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d{7}", p.name))


def _drop(step: Path) -> None:
    shutil.rmtree(step, ignore_errors=True)
    shutil.rmtree(step.with_name(step.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def checkpoint_need(ckpt_dir: Path, estimate: int) -> int:
    """Bytes to ask for before the next checkpoint: the newest one's real size, or the estimate before the first."""
    steps = _steps(ckpt_dir)
    return _with_margin(dir_bytes(steps[-1]) if steps else estimate)


def _with_margin(size: int) -> int:
    return int(size * MARGIN) + (64 << 10)


def _kept(ckpt_dir: Path) -> str:
    latest = latest_in(ckpt_dir.parent) if (ckpt_dir / "latest").is_file() else None
    return (f"The last checkpoint, {latest}, is intact: free space, then continue with --resume."
            if latest is not None else "No checkpoint has been written yet.")


def _way_out(ckpt_dir: Path) -> str:
    return (f"For more room: delete old runs under {ckpt_dir.parent.parent}, lower train.keep_checkpoints, raise the "
            f"volume (networkVolumeGb / volumeGb in Pulumi.<stack>.yaml), or point run.output_dir at a larger disk.")


def refuse_from_rank0(verdict: str | None) -> None:
    """Collective: raise DiskSpaceError on every rank when rank 0's check (its `verdict`) found no room."""
    verdict = broadcast_from_rank0(verdict)
    if verdict:
        raise DiskSpaceError(verdict)


def _expendable(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first, but the one `latest` names (else the newest)."""
    steps = _steps(ckpt_dir) if ckpt_dir.is_dir() else []
    keep = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    keep = keep or (steps[-1].name if steps else None)
    return [s for s in steps if s.name != keep]


def make_room(ckpt_dir: Path, need: int, what: str) -> str | None:
    """Rank 0, before writing `need` bytes under ckpt_dir. Leftovers of killed saves go first, then, oldest first,
    checkpoints other than the one `latest` names (the newest, or the step a run was resumed from: newer steps of the
    abandoned branch go too), so progress beats keep_checkpoints; each one dropped early is logged. Returns None
    when there is room, else the error text."""
    free = free_bytes(ckpt_dir)
    if free >= need:
        return None
    if ckpt_dir.is_dir():
        for tmp in ckpt_dir.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for old in _expendable(ckpt_dir):
            free = free_bytes(ckpt_dir)
            if free >= need:
                break
            log.warning("disk: %.1f GB free under %s, %s needs ~%.1f GB: deleting checkpoint %s early "
                        "(train.keep_checkpoints gives way)", free / GB, ckpt_dir, what, need / GB, old.name)
            _drop(old)
    free = free_bytes(ckpt_dir)
    if free >= need:
        return None
    return f"{ckpt_dir}: {free / GB:.1f} GB free, {what} needs ~{need / GB:.1f} GB. {_kept(ckpt_dir)} {_way_out(ckpt_dir)}"


def _disk_full(e: BaseException, ckpt_dir: Path) -> bool:
    """Did a write fail for want of space? torch.save reports it as a RuntimeError ('file write failed') with no
    errno, so a nearly full disk after the failure counts too."""
    x: BaseException | None = e
    while x is not None:
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        x = x.__cause__ or x.__context__
    try:
        return free_bytes(ckpt_dir) < (256 << 20)
    except OSError:
        return False


def preflight(ckpt_dir: Path, estimate: int, keep: int, export_bytes: int) -> str | None:
    """Rank 0, before training: an error text when not even one checkpoint fits (counting what make_room could free
    in this run), else None; a warning when keep_checkpoints + 1 (the one being written) and the export do not."""
    steps = _steps(ckpt_dir) if ckpt_dir.is_dir() else []
    sizes = {s.name: dir_bytes(s) for s in steps}  # each checkpoint folder walked once
    reclaimable = sum(sizes[s.name] for s in _expendable(ckpt_dir))
    free = free_bytes(ckpt_dir)
    need = _with_margin(sizes[steps[-1].name] if steps else estimate)  # checkpoint_need without a second walk
    if free + reclaimable < need:
        return (f"{ckpt_dir}: {free / GB:.1f} GB free, one checkpoint of this run needs ~{need / GB:.1f} GB, so none "
                f"could be written (nothing has been trained yet). {_way_out(ckpt_dir)}")
    held = sum(sizes.values())
    want = need * (keep + 1) + export_bytes - held
    if free < want:
        log.warning("disk: %.1f GB free under %s; %d checkpoints of ~%.1f GB (train.keep_checkpoints=%d, plus the one "
                    "being written) and the export (~%.1f GB) need ~%.1f GB more: older checkpoints will be deleted "
                    "early to make room", free / GB, ckpt_dir, keep + 1, need / GB, keep, export_bytes / GB,
                    want / GB)
    return None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int, rank: int,
         need: int | None = None) -> Path:
    """Collective: every rank must call it. Returns the final folder. With `need` (bytes; see checkpoint_need)
    rank 0 first makes room or, when it cannot, every rank raises DiskSpaceError before writing anything; a write
    that still runs out of space removes its partial folder and raises DiskSpaceError. `latest` stays loadable."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tag = TAG_FMT.format(step)
    tmp_tag = f".tmp-{tag}"
    final, tmp = ckpt_dir / tag, ckpt_dir / tmp_tag
    verdict = None
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
        if need:
            verdict = make_room(ckpt_dir, need, f"checkpoint {tag}")
    refuse_from_rank0(verdict)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:  # a small readable copy of the trainer state, for status tools and humans
            write_json(tmp / "trainer_state.json", client_state)
    except Exception as e:
        if not _disk_full(e, ckpt_dir):
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskSpaceError(f"{ckpt_dir}: the disk filled up while checkpoint {tag} was written ({e}); its partial "
                             f"folder is removed. {_kept(ckpt_dir)} {_way_out(ckpt_dir)}") from e
    _barrier()
    if rank == 0:
        _fsync_tree(tmp)
        _install(tmp, final)
        atomic_write_text(ckpt_dir / "latest", tag + "\n")
        _prune(ckpt_dir, keep, protect=tag)
    _barrier()
    return final


def _install(tmp: Path, final: Path) -> None:
    """Put a finished tmp folder at `final`. The same step saved again (after a resume) replaces the old one:
    it is first renamed aside, so `final` (which `latest` may name) exists at every moment but the instant of
    two renames, never deleted before the new one is in place. Its universal conversion is of the old weights,
    so it goes too (ensure_universal would otherwise reuse it)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(final.with_name(final.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _prune(ckpt_dir: Path, keep: int, protect: str) -> None:
    steps = _steps(ckpt_dir)
    for p in steps[: max(len(steps) - keep, 0)]:
        if p.name != protect:
            _drop(p)


def latest_in(run_dir: Path) -> Path | None:
    ck = run_dir / "checkpoints"
    f = ck / "latest"
    if not f.is_file():
        return None
    p = ck / f.read_text().strip()
    if not p.is_dir():
        # killed between _install's two renames: the previous save of that step is still whole, set aside
        for old in sorted(ck.glob(f".old-{p.name}.*"), key=lambda o: o.stat().st_mtime, reverse=True):
            try:
                os.replace(old, p)
                break
            except OSError:  # another rank recovered it first
                pass
    return p if p.is_dir() else None


def resolve_resume(arg: str, output_dir: Path, run_id: str | None) -> Path:
    """--resume value -> a step folder.

    'latest': the run named by run.run_id if set, else the run under output_dir whose latest checkpoint is
    newest. A path: a step folder, or a run folder (its latest checkpoint).
    """
    if arg != "latest":
        p = Path(arg)
        if (p / "latest").is_file() and p.name == "checkpoints":
            p = p.parent
        if (p / "checkpoints").is_dir():
            found = latest_in(p)
            if found is None:
                raise ResumeError(f"{p}: this run has no complete checkpoint yet (no checkpoints/latest)")
            return found
        if p.is_dir() and p.name.startswith("step_") and (p.parent.parent / "config.json").is_file():
            return p
        raise ResumeError(f"--resume {arg}: not a run folder (outputs/<run_id>) nor a checkpoint (…/checkpoints/step_N)")
    if run_id:
        found = latest_in(output_dir / run_id)
        if found is None:
            raise ResumeError(f"--resume latest: {output_dir / run_id} has no complete checkpoint")
        return found
    cands = [c for c in (latest_in(r) for r in output_dir.glob("*") if r.is_dir()) if c is not None]
    if not cands:
        raise ResumeError(f"--resume latest: no run under {output_dir} has a checkpoint; start without --resume")
    return max(cands, key=lambda c: (c.parent / "latest").stat().st_mtime)


def _steps_beside_params(engine) -> None:
    """DeepSpeed's universal loader restores AdamW's per-parameter `step` as a CPU tensor; torch's fused AdamW
    needs it on the parameter's device ("state_steps is on cpu, different from other tensors on cuda:0", seen
    on the H100s when a 2-GPU checkpoint resumed on 1). Put every fused group's steps where their params are."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if not isinstance(base, torch.optim.Optimizer):
        return
    for group in base.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            st = base.state.get(p)
            if st and torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def saved_world_size(step_dir: Path) -> int:
    return int(read_trainer_state(step_dir)["world_size"])


def ensure_universal(step_dir: Path, rank: int) -> Path:
    """Collective. DeepSpeed's ZeRO files are cut per rank; to resume on another number of GPUs, convert the
    checkpoint once to DeepSpeed's universal format (one file per parameter and optimizer moment), kept beside
    it as `step_N-universal/`. The engine must then be built with checkpoint.load_universal (see engine.py)."""
    out = step_dir.with_name(step_dir.name + UNIVERSAL_SUFFIX)
    if rank == 0 and not out.is_dir():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = step_dir.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s to a universal checkpoint (world size changed)", step_dir)
        # inject_missing_state: plain (non-Megatron) runs carry no universal_checkpoint_info; DeepSpeed adds it
        ds_to_universal(argparse.Namespace(input_folder=str(step_dir), output_folder=str(tmp), num_extract_workers=4,
                                           num_merge_workers=2, keep_temp_folder=False, strict=True,
                                           inject_missing_state=True))
        os.replace(tmp, out)
    _barrier()
    return out


def load(engine, step_dir: Path, rank: int, world_size: int, universal: Path | None = None) -> dict[str, Any]:
    """Collective. Restores weights, optimizer, LR schedule and (same world size) RNG; returns the trainer state."""
    src = universal or step_dir
    path, _ = engine.load_checkpoint(
        str(src.parent), tag=src.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ResumeError(f"{src}: DeepSpeed could not load this checkpoint (see the log above)")
    _steps_beside_params(engine)
    client = read_trainer_state(step_dir)
    saved_ws = client.get("world_size", world_size)
    rng_file = step_dir / f"rng_rank{rank}.pt"
    if saved_ws == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank == 0:
        log.warning("checkpoint written by %d ranks, resuming on %d: RNG streams restart from the seed", saved_ws, world_size)
    return client


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    """The trainer's state (step, data position, world size...) without building an engine."""
    return json.loads((step_dir / "trainer_state.json").read_text())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
