"""Issue 9 on CPU: the deepspeed launcher with 2 ranks (gloo), ZeRO-2 and ZeRO-3, and a checkpoint written by
2 ranks resumed by 1 (through DeepSpeed's universal checkpoint format)."""

from __future__ import annotations

import sys

import pytest

from ml.training.checkpoint import read_trainer_state
from ml.training.logs import read_metrics
from training_fixtures import TINY, run, write_dataset

pytestmark = pytest.mark.integration


def _launch(data, out, zero, *extra, port=None, precision=None):
    # `deepspeed --num_gpus 2 --module ml.training ...` is this runner; --num_gpus counts CPU ranks here
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port or 29700 + zero),
            "--module", "ml.training", "--config", str(TINY), f"data.root={data}", f"run.output_dir={out}",
            "logging.wandb=disabled", f"deepspeed.zero_stage={zero}", "train.log_every=1", "train.val_every=2",
            "train.ckpt_every=2", "optim.warmup_steps=1", "model.cfg_drop=0.5",
            *_precision(precision), *extra]


def _precision(precision):
    # bf16: the shipped H100 settings (MasterAdamW, gradients summed over micro-batches and ranks in bf16)
    return ([f"deepspeed.precision={precision}"] if precision else []) + (
        ["deepspeed.grad_accum_dtype=bf16"] if precision == "bf16" else [])


@pytest.mark.parametrize("zero,precision", [(2, None), pytest.param(3, None, marks=pytest.mark.slow),
                                            pytest.param(0, "autocast", marks=pytest.mark.slow),
                                            pytest.param(0, "bf16", marks=pytest.mark.slow)])  # MasterAdamW's all-reduce
def test_two_ranks_then_resume_on_one(tmp_path, zero, precision):
    data = tmp_path / "data"
    write_dataset(data, n_train=8, n_val=2, n_points=6000)
    out = tmp_path / "out"
    # cfg_drop 0.5: CFG-dropped and kept samples meet in one step across ranks (the graph must stay static)
    run(_launch(data, out, zero, "run.run_id=r", "train.max_steps=4", "train.export=false", precision=precision,
                port=29700 + zero + (10 if precision == "bf16" else 0)))
    rd = out / "r"
    st = read_trainer_state(rd / "checkpoints" / "step_0000004")
    assert st["world_size"] == 2 and st["micro_step"] == 4 * 2 and st["samples_seen"] == 4 * 2 * 2
    assert "world_size=2" in (rd / "command.txt").read_text()

    p = run([sys.executable, "-m", "ml.training", "--config", str(TINY), f"data.root={data}", f"run.output_dir={out}",
             "logging.wandb=disabled", f"deepspeed.zero_stage={zero}", "train.log_every=1", "train.val_every=2",
             "train.ckpt_every=2", "optim.warmup_steps=1", "train.max_steps=6", "--resume", str(rd),
             *_precision(precision)])
    assert "at step 4" in p.stderr + p.stdout
    # ZeRO cuts optimizer state per rank: converted once to the universal format; without ZeRO nothing to convert
    assert (rd / "checkpoints" / "step_0000004-universal" / "zero").is_dir() == (zero > 0)
    st = read_trainer_state(rd / "checkpoints" / "step_0000006")
    assert st["world_size"] == 1 and st["step"] == 6 and st["samples_seen"] == 4 * 2 * 2 + 2 * 2
    # 8 global micro-batches of 2 ranks = 2 epochs of 8 samples -> one rank restarts at epoch 2, position 16
    # (8 per epoch alone), then 2 steps x 2 micro-batches
    assert st["micro_step"] == 16 + 2 * 2
    steps = [r["step"] for r in read_metrics(rd / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (rd / "export" / "ultrashape.pt").is_file()


def test_two_ranks_share_broken_uids_and_count_each_once(tmp_path):
    from ml.training.data import DataOrder

    data = tmp_path / "data"
    uids = write_dataset(data, n_train=8, n_val=2, n_points=6000)
    # the sample rank 1 draws first: rank 0 (which writes the trainer state) learns of it only by the gather
    bad = uids[int(DataOrder(8, 0, 1, 1, 2).perm(0)[1])]
    (data / "samples" / f"{bad}.npz").write_bytes(b"not a zip")
    out = tmp_path / "out"
    # 4 global micro-batches per epoch: 6 steps span 2 epochs, so the bad sample is drawn twice; limit 1.2
    run(_launch(data, out, 2, "run.run_id=r", "train.max_steps=6", "train.export=false", "train.val_every=0",
                "train.ckpt_every=100", "data.max_broken_fraction=0.15", port=29710))
    st = read_trainer_state(out / "r" / "checkpoints" / "step_0000006")
    assert st["broken_uids"] == [bad] and st["broken_samples"] == 1
    assert st["micro_step"] > 6  # positions with the bad sample were skipped on both ranks
