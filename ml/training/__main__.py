"""Fine-tune the UltraShape refine DiT.

    python -m ml.training --config configs/train_dit_refine.yaml [--resume [PATH|latest]] [key=value ...]
    deepspeed --num_gpus 2 -m ml.training --config configs/train_dit_refine.yaml   # several GPUs, one host

key=value overrides use dotted config keys, e.g. train.max_steps=2000 optim.lr=5e-6 deepspeed.zero_stage=3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ml.config import ConfigError, load_config, parse_overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Growable segments instead of fixed blocks: the worst-case sample peaks at ~73 GiB of the H100's 79 GiB
    # (precision bf16), where fixed blocks of other sizes can leave the rest fragmented. Read at the first CUDA
    # allocation, so set before anything touches the GPU; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    ap = argparse.ArgumentParser(prog="python -m ml.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="training YAML (configs/train_dit_refine*.yaml)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH|latest",
                    help="continue a run: 'latest' (default), a run folder or a checkpoints/step_N folder")
    # `deepspeed` passes --local_rank=N; LOCAL_RANK in the environment carries the same.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    # intermixed: overrides may come before or after --config/--resume
    args = ap.parse_intermixed_args(argv)
    try:
        from ml.training.config import TrainConfig

        cfg = load_config(args.config, TrainConfig, parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ml.training.checkpoint import DiskSpaceError, ResumeError
    from ml.training.data import DatasetLayoutError
    from ml.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, args.config, args.resume, ["-m", "ml.training"] + argv)
    except (ConfigError, ResumeError, DatasetLayoutError, DiskSpaceError) as e:  # user errors: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_dir = trainer.fit()
    except DiskSpaceError as e:  # the last checkpoint is intact; the message says how to make room
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.interrupted:
        if trainer.is_main:
            print(f"stopped by signal {trainer.interrupted} at step {trainer.step}: {run_dir} (resume with --resume)")
        return 128 + int(trainer.interrupted)
    if trainer.is_main:
        print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
