"""What only a GPU shows in ml.training (skipped without CUDA, here and in CI; run on the device machine):
the frozen encoders drawn ahead on a second CUDA stream must feed the DiT the inputs the serial order feeds it, and
MasterAdamW's CUDA state must survive a checkpoint and resume.

    python -m pytest tests/ml/training/test_training_gpu.py -m gpu -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from training_fixtures import ROOT, TINY, env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Two fresh engines from the same seed, the same six micro-batches (three steps of two): one draws the next
# micro-batch's encoders inline, one on the side stream. Missing stream ordering (a read of inputs the side stream
# has not written yet, or memory reused under it) shows as different losses.
SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from train_step import synthetic_batch
from ml.config import load_config
from ml.models.checkpoint import build_models
from ml.training.config import TrainConfig
from ml.training.engine import build_engine, init_distributed
from ml.training.step import StepRunner, TrainModels
precision = sys.argv[3]
cfg = load_config(sys.argv[1], TrainConfig, {"deepspeed.zero_stage": 0, "deepspeed.precision": precision,
                  "train.grad_accum": 2, "optim.warmup_steps": 0, "model.compile": False, "model.cfg_drop": 0.5})
init_distributed(cfg)
dev = torch.device("cuda", 0)
batches = [{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in synthetic_batch(cfg, i).items()}
           for i in range(6)]
losses = {}
for overlap in (False, True):
    torch.manual_seed(0)
    models = build_models(cfg.model.arch, device=dev)
    tm = TrainModels(models, cfg, dev, None)
    engine = build_engine(tm.dit, cfg, 1)
    it = iter(batches)
    runner = StepRunner(tm, engine, cfg, draw=lambda: next(it), snapshot=lambda: None, overlap=overlap)
    assert (runner.stream is not None) == overlap
    torch.manual_seed(1)
    losses[overlap] = [float(runner.step(draw_ahead=i < 2)[0]) for i in range(3)]
print("LOSSES", losses)
a, b = losses[False], losses[True]
assert a[0] == b[0], (a, b)  # the first step's inputs and weights are identical: so is its loss, bit for bit
for x, y in zip(a[1:], b[1:]):  # later steps: same maths; GPU reductions may differ in the last bits
    assert abs(x - y) <= 1e-3 * abs(x), (a, b)
print("OVERLAP OK")
"""


@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_encoders_on_a_side_stream_feed_the_serial_inputs(precision):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY), str(ROOT / "bench"), precision], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=env())
    assert p.returncode == 0 and "OVERLAP OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def test_bf16_master_weights_resume_on_cuda(tmp_path):
    """precision bf16 at ZeRO-0 on the GPU: MasterAdamW's CUDA state (flat fp32 masters and moments) goes through
    DeepSpeed's checkpoint and back. A run of 6 steps, then the same run resumed from its step-3 checkpoint: the
    step counter and data position continue, and the weights end where the uninterrupted run's did (up to the last
    bits GPU reductions may differ in)."""
    from ml.training.checkpoint import read_trainer_state
    from training_fixtures import run, train_cmd, write_dataset

    data = tmp_path / "data"
    write_dataset(data, n_train=6, n_val=2, n_points=6000)
    out = tmp_path / "out"
    common = ("train.max_steps=6", "train.ckpt_every=3", "train.keep_checkpoints=3", "train.log_every=1",
              "train.val_every=0", "optim.warmup_steps=1", "deepspeed.zero_stage=0", "deepspeed.precision=bf16",
              "deepspeed.dist_backend=nccl", "run.run_id=r")
    run(train_cmd(data, out, *common), timeout=600)
    export = out / "r" / "export" / "ultrashape.pt"
    states = out / "r" / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt"

    def optimizer_state():
        return torch.load(states, map_location="cpu", weights_only=False)["optimizer"]["flat"]

    first, first_opt = torch.load(export, map_location="cpu", weights_only=True)["dit"], optimizer_state()
    p = run(train_cmd(data, out, *common, resume=str(out / "r" / "checkpoints" / "step_0000003")), timeout=600)
    assert "at step 3" in p.stderr + p.stdout
    st = read_trainer_state(out / "r" / "checkpoints" / "step_0000006")
    assert st["step"] == 6 and st["micro_step"] == 6 * 2
    again, again_opt = torch.load(export, map_location="cpu", weights_only=True)["dit"], optimizer_state()
    # The moments carry all 6 steps: a resume that lost them would hold 3 steps' worth (about half of exp_avg_sq)
    for a, b in zip(first_opt, again_opt):
        assert a["step"] == b["step"] == 6
        rel = float((b["exp_avg_sq"] - a["exp_avg_sq"]).norm() / a["exp_avg_sq"].norm())
        assert rel < 0.02, f"exp_avg_sq after the resume differs by {rel:.3f} (relative L2)"
    moved = 0
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=2e-2, atol=2e-3, msg=lambda m, k=k: f"{k}: {m}")
        moved += int(not torch.equal(first[k], first[k].bfloat16().float()))
    assert moved > 0, "the export should hold fp32 masters, not bf16 values"


def test_lora_with_bf16_master_weights_on_cuda(tmp_path):
    """LoRA at ZeRO-0 with precision bf16 (MasterAdamW over the adapters only) on the GPU, from a weights file:
    4 steps with a checkpoint at 2, then the run resumed from it. The export must hold the weights file's frozen
    tensors bit for bit (the module holds bf16 copies of them), the adapted layers merged and moved, and load
    strictly (no lora_* keys)."""
    from ml.config import load_config
    from ml.models.checkpoint import build_models, load_checkpoint, write_random_checkpoint
    from ml.training.checkpoint import read_trainer_state
    from ml.training.config import TrainConfig
    from training_fixtures import run, train_cmd, write_dataset

    cfg = load_config(TINY, TrainConfig)
    weights = write_random_checkpoint(cfg.model.arch, tmp_path / "base.pt", seed=7)
    data = tmp_path / "data"
    write_dataset(data, n_train=6, n_val=2, n_points=6000)
    out = tmp_path / "out"
    common = (f"model.weights={weights}", "model.lora.enabled=true", "deepspeed.zero_stage=0",
              "deepspeed.precision=bf16", "deepspeed.dist_backend=nccl", "train.max_steps=4", "train.ckpt_every=2",
              "train.keep_checkpoints=3", "train.val_every=0", "optim.warmup_steps=1", "optim.lr=0.05", "run.run_id=r")
    run(train_cmd(data, out, *common), timeout=600)
    p = run(train_cmd(data, out, *common, resume=str(out / "r" / "checkpoints" / "step_0000002")), timeout=600)
    assert "at step 2" in p.stderr + p.stdout
    assert read_trainer_state(out / "r" / "checkpoints" / "step_0000004")["step"] == 4
    models = build_models(cfg.model.arch)
    load_checkpoint(models, out / "r" / "export" / "ultrashape.pt")  # strict
    base = torch.load(weights, map_location="cpu", weights_only=True)["dit"]
    sd = models.dit.state_dict()
    assert not torch.equal(sd["blocks.0.attn1.to_q.weight"], base["blocks.0.attn1.to_q.weight"])
    assert torch.equal(sd["x_embedder.weight"], base["x_embedder.weight"])
    assert not torch.equal(base["x_embedder.weight"], base["x_embedder.weight"].bfloat16().float())  # bf16 would show


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_with_the_encoders_overlapped(tmp_path):
    """The shipped multi-GPU path: `deepspeed --num_gpus 2` at ZeRO-0 with bf16 + MasterAdamW over NCCL, the
    encoders drawn ahead on the side stream (with the trainer's empty-batch collective among them), CFG drops
    meeting across ranks. Both ranks must agree on every step and the run must finish with its checkpoint."""
    from ml.training.checkpoint import read_trainer_state
    from ml.training.logs import read_metrics
    from training_fixtures import run, write_dataset

    data = tmp_path / "data"
    write_dataset(data, n_train=8, n_val=2, n_points=6000)
    out = tmp_path / "out"
    run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29760", "--module",
         "ml.training", "--config", str(TINY), f"data.root={data}", f"run.output_dir={out}", "logging.wandb=disabled",
         "deepspeed.zero_stage=0", "deepspeed.precision=bf16", "deepspeed.grad_accum_dtype=bf16",
         "deepspeed.dist_backend=nccl", "train.max_steps=6", "train.log_every=1", "train.val_every=3",
         "train.ckpt_every=1000", "optim.warmup_steps=1", "model.cfg_drop=0.5", "run.run_id=r"], timeout=600)
    st = read_trainer_state(out / "r" / "checkpoints" / "step_0000006")
    assert st["world_size"] == 2 and st["step"] == 6 and st["micro_step"] == 6 * 2 and st["samples_seen"] == 6 * 2 * 2
    steps = [r["step"] for r in read_metrics(out / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "r" / "export" / "ultrashape.pt").is_file()
