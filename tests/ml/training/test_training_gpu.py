"""What only a GPU shows in ml.training (skipped without CUDA, here and in CI; run on the device machine):
the frozen encoders drawn ahead on a second CUDA stream must feed the DiT the inputs the serial order feeds it.

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
