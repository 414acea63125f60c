"""End to end on CPU: `python -m ml.training` (DeepSpeed, one process, gloo) on the tiny model.

- loss falls on corpus meshes processed by ml.processing; logs, curve and export are written; the export
  refines a mesh through ml.refine
- kill -9 mid-run, then --resume: same step counter, and the same weights as a run never interrupted
- gradient accumulation changes the number of optimizer steps for the same data
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ml.training.checkpoint import read_trainer_state
from ml.training.logs import read_metrics
from training_fixtures import ROOT, env, process_corpus, run, train_cmd, write_dataset

pytestmark = pytest.mark.integration

TRAIN_KEYS = {"step", "max_steps", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "gpu_mem_gb",
              "eta_s", "time", "moe_aux_loss", "epoch", "broken_samples"}


@pytest.fixture(scope="module")
def processed(corpus_dir, tmp_path_factory) -> Path:
    return process_corpus(corpus_dir, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, n_train=6, n_val=2, n_points=6000)
    return root


def _run_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def _sigterm_after_3_steps(cmd: list[str], metrics: Path) -> tuple[int, str, str]:
    """Start a training run, SIGTERM it once metrics.jsonl has 3 lines; (returncode, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"training did not start (exit {proc.returncode}): {err[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


def _dit_weights(export: Path) -> dict[str, torch.Tensor]:
    return torch.load(export, map_location="cpu", weights_only=True)["dit"]


def test_loss_falls_on_processed_corpus_and_export_refines(processed, tmp_path):
    out = tmp_path / "out"
    run(train_cmd(processed, out, "train.max_steps=40", "train.log_every=1", "train.val_every=20", "train.ckpt_every=20",
                  "logging.wandb=offline"))
    rd = _run_dir(out)
    m = read_metrics(rd / "metrics.jsonl")
    train = [r for r in m if r["kind"] == "train"]
    val = [r for r in m if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert TRAIN_KEYS <= set(train[0]), set(train[0]) ^ TRAIN_KEYS
    first = sum(r["loss"] for r in train[:8]) / 8
    last = sum(r["loss"] for r in train[-8:]) / 8
    assert last < 0.95 * first, (first, last)
    assert [r["step"] for r in val] == [0, 20, 40] and val[-1]["val_loss"] < val[0]["val_loss"]
    # the LR follows warm-up then cosine over exactly max_steps
    assert train[0]["lr"] < train[5]["lr"] and train[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=1e-6)
    assert (rd / "loss_curve.png").stat().st_size > 1000
    assert list((rd / "tb").glob("events.out.tfevents.*"))
    assert list((rd / "wandb").glob("offline-run-*")), "W&B must run offline without WANDB_API_KEY"
    assert "ml.training" in (rd / "command.txt").read_text()
    assert json.loads((rd / "config.json").read_text())["train"]["max_steps"] == 40

    # the export is the official layout, loads strictly in ml.refine and refines a processed mesh
    from ml.refine import RefinePipeline

    export = rd / "export" / "ultrashape.pt"
    pipe = RefinePipeline.from_checkpoint(export, ROOT / "configs" / "infer_dit_refine-tiny.yaml")
    uid = json.loads((processed / "data_list" / "train.json").read_text())[0]
    import trimesh
    from PIL import Image

    with np_seed():
        coarse = trimesh.load(next((processed.parent / "input").glob("anchor.off")), force="mesh")
        refined = pipe(Image.open(processed / "renders" / uid / "rgba" / "000.png"), coarse, steps=2)
    assert len(refined.vertices) > 0 and len(refined.faces) > 0
    # trained: the exported DiT is not the seeded initial one
    from ml.models.checkpoint import build_models
    from ml.training.config import TrainConfig
    from ml.config import load_config

    cfg = load_config(ROOT / "configs" / "train_dit_refine-tiny.yaml", TrainConfig)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        init = build_models(cfg.model.arch).dit.state_dict()
    trained = _dit_weights(export)
    assert set(trained) == set(init)
    assert not torch.allclose(trained["x_embedder.weight"], init["x_embedder.weight"])


class np_seed:
    """Refine samples noise; keep the test deterministic."""

    def __enter__(self):
        torch.manual_seed(0)

    def __exit__(self, *a):
        return False


def test_kill9_then_resume_continues_exactly(synthetic, tmp_path):
    common = ("train.max_steps=12", "train.ckpt_every=4", "train.log_every=1", "train.val_every=0",
              "optim.warmup_steps=2", "train.keep_checkpoints=3")
    # reference: never interrupted
    ref_out = tmp_path / "ref"
    run(train_cmd(synthetic, ref_out, *common, "run.run_id=ref"))

    out = tmp_path / "out"
    cmd = train_cmd(synthetic, out, *common, "run.run_id=killed")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "killed" / "checkpoints" / "latest"
    try:
        deadline = time.time() + 180
        while not latest.exists():
            assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a real kill -9, right after the first checkpoint completed
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert killed_at < 12
    assert not (out / "killed" / "export").exists()

    p = run(train_cmd(synthetic, out, *common, resume="latest"))
    assert f"at step {killed_at}" in p.stderr + p.stdout
    rd = out / "killed"
    st = read_trainer_state(rd / "checkpoints" / "step_0000012")
    assert st["step"] == 12 and st["micro_step"] == 12 * 2
    steps = [r["step"] for r in read_metrics(rd / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13)), steps  # no step twice, none missing
    assert len((rd / "command.txt").read_text().splitlines()) == 2
    # exact: same data order, RNG, LR schedule and optimizer state as the uninterrupted run
    a, b = _dit_weights(ref_out / "ref" / "export" / "ultrashape.pt"), _dit_weights(rd / "export" / "ultrashape.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_drawing_ahead_changes_nothing(synthetic, tmp_path):
    """The trainer draws (and encodes) the next step's first micro-batch during a step, except before a checkpoint.
    A checkpoint after every step (never ahead) and none until the end (always ahead, over the accumulation
    boundary too) must train the same weights bit for bit: same data order, same random draws."""
    common = ("train.max_steps=6", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=1",
              "train.keep_checkpoints=1")
    exports = []
    for every in (1, 1000):
        out = tmp_path / f"every{every}"
        run(train_cmd(synthetic, out, *common, f"train.ckpt_every={every}", "run.run_id=r"))
        exports.append(_dit_weights(out / "r" / "export" / "ultrashape.pt"))
    for k in exports[0]:
        torch.testing.assert_close(exports[0][k], exports[1][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigterm_then_resume_continues_exactly(synthetic, tmp_path, precision):
    """Stopped by a signal after a step that had already drawn (and encoded) the next micro-batch: the checkpoint
    must hold the data position and random states from before that draw, so --resume trains what an uninterrupted
    run trains, bit for bit. bf16: ZeRO-0 with MasterAdamW, whose fp32 masters and moments must come back whole
    (and be what the export holds, not the module's bf16 copies)."""
    common = ("train.max_steps=40", "train.ckpt_every=1000", "train.log_every=1", "train.val_every=0",
              "optim.warmup_steps=2", f"deepspeed.precision={precision}",
              *(["deepspeed.zero_stage=0"] if precision == "bf16" else []))
    run(train_cmd(synthetic, tmp_path / "ref", *common, "run.run_id=ref"))
    out = tmp_path / "out"
    returncode, _, stderr = _sigterm_after_3_steps(train_cmd(synthetic, out, *common, "run.run_id=r"),
                                                   out / "r" / "metrics.jsonl")
    assert returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = int((out / "r" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 0 < stopped < 40
    st = read_trainer_state(out / "r" / "checkpoints" / f"step_{stopped:07d}")
    assert st["micro_step"] == stopped * 2  # grad_accum 2: the drawn-ahead micro-batch is not counted as used
    run(train_cmd(synthetic, out, *common, resume="latest"))
    a = _dit_weights(tmp_path / "ref" / "ref" / "export" / "ultrashape.pt")
    b = _dit_weights(out / "r" / "export" / "ultrashape.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    if precision == "bf16":
        # 40 small AdamW steps on fp32 masters leave weights between bf16 values: the export kept those bits
        w = b["blocks.0.attn1.to_q.weight"]
        assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())


def test_grad_accum_changes_optimizer_steps(synthetic, tmp_path):
    # the same 6 micro-batches: 6 optimizer steps without accumulation, 2 with 3 micro-batches per step
    for accum, steps in ((1, 6), (3, 2)):
        out = tmp_path / f"a{accum}"
        run(train_cmd(synthetic, out, f"train.grad_accum={accum}", f"train.max_steps={steps}", "train.log_every=1",
                      "train.val_every=0", "optim.warmup_steps=1", "train.export=false", "run.run_id=r"))
        st = read_trainer_state(out / "r" / "checkpoints" / f"step_{steps:07d}")
        assert st["step"] == steps and st["micro_step"] == 6 and st["samples_seen"] == 6
        lrs = [r["lr"] for r in read_metrics(out / "r" / "metrics.jsonl") if r["kind"] == "train"]
        assert len(lrs) == steps  # one LR step per optimizer step, not per micro-batch


def test_resume_refuses_changed_architecture(synthetic, tmp_path):
    out = tmp_path / "out"
    run(train_cmd(synthetic, out, "train.max_steps=2", "train.val_every=0", "optim.warmup_steps=1", "train.export=false",
                  "run.run_id=r"))
    p = subprocess.run(train_cmd(synthetic, out, "train.max_steps=4", "optim.warmup_steps=1", "model.arch.dit.depth=3",
                                 resume="latest"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "model.arch" in p.stderr and "Start a new run" in p.stderr
    # the saved data position counts micro-batches: another micro-batch size would resume elsewhere in the epoch
    p = subprocess.run(train_cmd(synthetic, out, "train.max_steps=4", "optim.warmup_steps=1", "train.micro_batch=2",
                                 resume="latest"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "'train.micro_batch' was 1 and is now 2" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_run_exports_the_released_key_set(synthetic, tmp_path, precision):
    """bf16 (ZeRO-0, MasterAdamW): the module holds bf16 copies of the frozen weights; the export must still hold
    the starting weights bit for bit, not their bf16 rounding."""
    out = tmp_path / "out"
    extra = ["deepspeed.precision=bf16", "deepspeed.zero_stage=0"] if precision == "bf16" else []
    run(train_cmd(synthetic, out, "model.lora.enabled=true", "train.max_steps=3", "train.val_every=0",
                  "optim.warmup_steps=1", "run.run_id=r", "optim.lr=0.05", *extra))
    from ml.models.checkpoint import build_models, load_checkpoint
    from ml.training.config import TrainConfig
    from ml.config import load_config

    cfg = load_config(ROOT / "configs" / "train_dit_refine-tiny.yaml", TrainConfig)
    models = build_models(cfg.model.arch)
    load_checkpoint(models, out / "r" / "export" / "ultrashape.pt")  # strict: no lora_* keys, nothing missing
    _estimate_covers(out / "r" / "checkpoints" / "step_0000003")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        init = build_models(cfg.model.arch).dit.state_dict()
    sd = models.dit.state_dict()
    # adapted layers moved, the rest (frozen under LoRA) is exactly the starting point
    assert not torch.equal(sd["blocks.0.attn1.to_q.weight"], init["blocks.0.attn1.to_q.weight"])
    assert torch.equal(sd["x_embedder.weight"], init["x_embedder.weight"])


def _estimate_covers(step_dir: Path) -> None:
    """The room asked for before a run's first checkpoint (checkpoint.estimate_bytes, kept in trainer_state.json)
    must not fall short of what was written, nor ask for much more."""
    from ml.training.checkpoint import dir_bytes, read_trainer_state

    est, real = read_trainer_state(step_dir)["checkpoint_bytes_estimate"], dir_bytes(step_dir)
    assert real <= est <= 1.2 * real, (est, real)


def test_sigterm_saves_a_checkpoint_and_stops(synthetic, tmp_path):
    out = tmp_path / "out"
    cmd = train_cmd(synthetic, out, "train.max_steps=500", "train.ckpt_every=1000", "train.log_every=1",
                    "train.val_every=0", "optim.warmup_steps=1", "run.run_id=r")
    metrics = out / "r" / "metrics.jsonl"
    returncode, stdout, stderr = _sigterm_after_3_steps(cmd, metrics)
    assert returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"][-1]
    latest = (out / "r" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:07d}" and last < 500  # the step it stopped at, not a ckpt_every multiple
    _estimate_covers(out / "r" / "checkpoints" / latest)
    assert "resume with --resume" in stdout


def test_starts_from_a_checkpoint_strictly_and_exports_the_frozen_parts_unchanged(synthetic, tmp_path):
    from ml.config import load_config
    from ml.models.checkpoint import write_random_checkpoint
    from ml.training.config import TrainConfig

    cfg = load_config(ROOT / "configs" / "train_dit_refine-tiny.yaml", TrainConfig)
    weights = write_random_checkpoint(cfg.model.arch, tmp_path / "base.pt", seed=7)
    out = tmp_path / "out"
    run(train_cmd(synthetic, out, f"model.weights={weights}", "train.max_steps=2", "train.val_every=0",
                  "optim.warmup_steps=1", "run.run_id=r", "optim.lr=1e-9"))
    base = torch.load(weights, weights_only=True)
    exp = torch.load(out / "r" / "export" / "ultrashape.pt", weights_only=True)
    for part in ("vae", "conditioner"):  # frozen: bit-identical to the released file
        assert exp[part].keys() == base[part].keys()
        assert all(torch.equal(exp[part][k], base[part][k]) for k in base[part])
    # the DiT started from the file (a 1e-9 LR moves it by ~1e-9 at most)
    assert all(torch.allclose(exp["dit"][k], base["dit"][k], atol=1e-6) for k in base["dit"])
    # a checkpoint of another architecture is refused, naming the mismatch
    p = subprocess.run(train_cmd(synthetic, tmp_path / "bad", f"model.weights={weights}", "model.arch.dit.depth=3",
                                 "train.max_steps=2", "optim.warmup_steps=1"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "do not match" in p.stderr


def test_a_broken_sample_counts_once_over_epochs_and_broken_val_samples_not_at_all(tmp_path):
    data = tmp_path / "data"
    uids = write_dataset(data, n_train=6, n_val=2, n_points=6000)
    for bad in (uids[1], uids[7]):  # one training sample, one validation sample
        (data / "samples" / f"{bad}.npz").write_bytes(b"not a zip")
    out = tmp_path / "out"
    # limit 0.2 x 6 = 1.2 samples; 14 steps draw the bad training sample in 3 epochs, and validation (steps
    # 0, 7, 14) draws the bad validation sample 3 times: counting draws would stop this run
    run(train_cmd(data, out, "data.max_broken_fraction=0.2", "train.max_steps=14", "train.val_every=7",
                  "train.log_every=1", "train.ckpt_every=100", "optim.warmup_steps=1", "train.export=false",
                  "run.run_id=r"))
    rd = out / "r"
    recs = [json.loads(line) for line in (rd / "broken_samples.jsonl").read_text().splitlines()]
    train_draws = [r for r in recs if r["split"] == "train"]
    assert {r["uid"] for r in train_draws} == {uids[1]} and len({r["epoch"] for r in train_draws}) >= 2
    assert {r["uid"] for r in recs if r["split"] == "val"} == {uids[7]}
    m = [r for r in read_metrics(rd / "metrics.jsonl") if r["kind"] == "train"]
    assert m[-1]["step"] == 14 and m[-1]["broken_samples"] == 1
    assert read_trainer_state(rd / "checkpoints" / "step_0000014")["broken_uids"] == [uids[1]]


def test_a_disk_without_room_for_one_checkpoint_stops_before_training(synthetic, tmp_path):
    """The volume is checked before any GPU time is spent: the filesystem reports 1 MB free (shutil.disk_usage
    patched in the child, as a full volume would answer) and one checkpoint of the tiny run needs ~6 MB."""
    script = ("import shutil, sys\nreal = shutil.disk_usage\n"
              "shutil.disk_usage = lambda p: real(p)._replace(free=1_000_000)\n"
              "from ml.training.__main__ import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    cmd = train_cmd(synthetic, out, "train.max_steps=2", "train.val_every=0", "optim.warmup_steps=1", "run.run_id=r")
    p = subprocess.run([cmd[0], "-c", script, *cmd[3:]], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error:" in p.stderr and "0.0 GB free" in p.stderr and "Traceback" not in p.stderr
    assert "nothing has been trained yet" in p.stderr and str(out / "r" / "checkpoints") in p.stderr
    metrics = out / "r" / "metrics.jsonl"
    assert not metrics.exists() or not [r for r in read_metrics(metrics) if r["kind"] == "train"]
