"""`--stack local`: the same fab tasks, jobs and layout on this machine (what `make demo` runs).

    .venv/bin/python -m pytest tests/playbooks/test_playbooks_local.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote.target import REPO

pytestmark = pytest.mark.integration


def fab(env, *args, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "fabric", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"fab {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "ULTRASHAPE_LOCAL_WORKSPACE": str(tmp_path / "ws"), "ULTRASHAPE_STATE_DIR": str(tmp_path / "state"),
         "PULUMI_HOME": str(tmp_path / "no-pulumi")}  # no selected Pulumi stack: the default is local
    e.pop("ULTRASHAPE_STACK", None)
    return e


def test_playbooks_local_train_status_fetch_infer(env, tmp_path):
    ws = tmp_path / "ws"
    r = fab(env, "setup")
    assert "venv: local" in r.stderr and (ws / "configs").is_symlink()
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    import trimesh

    for name, m in [("ball.obj", trimesh.creation.icosphere(subdivisions=2)), ("box.stl", trimesh.creation.box()),
                    ("capsule.ply", trimesh.creation.capsule()), ("torus.obj", trimesh.creation.torus(0.6, 0.2))]:
        m.export(meshes / name)
    r = fab(env, "sync", "--src", str(meshes), "--limit", "1")
    assert sorted(os.listdir(ws / "data" / "input")) == ["ball.obj"]

    # What `make demo` runs: sync the rest, process, train (tiny), then refine a processed mesh.
    over = "train.max_steps=4 optim.warmup_steps=1 train.ckpt_every=2 train.val_every=0 train.log_every=1 logging.wandb=disabled"
    r = fab(env, "train", "--tiny", "--src", str(meshes), "--overrides", over, timeout=600)
    assert "3 of 4 files sent" in r.stderr and "[local] process: " in r.stderr, r.stderr
    assert (ws / "data" / "output" / "contact_sheet.png").is_file()
    assert "step 4/4 (100%)" in r.stdout and "job: done (exit 0)" in r.stdout, r.stdout
    assert "watchdog" not in r.stderr  # nothing to stop here
    runs = list((ws / "outputs").glob("*/export"))
    assert len(runs) == 1
    r = fab(env, "infer", "--tiny", timeout=600)
    for what in ("refined mesh:", "contact sheet:", "loss curve:"):
        assert what in r.stdout, r.stdout
    glb = Path(r.stdout.split("refined mesh:")[1].split()[0])
    assert glb.is_file() and glb.suffix == ".glb"

    r = fab(env, "status")
    assert "step 4/4" in r.stdout
    # the volume's free space and the run's last checkpoint (written at step 4), as df and du see them
    import re
    import shutil

    m = re.search(r"disk: ([\d.]+) GB free of (\d+) GB \(.*\); last checkpoint step_0000004 ([\d.]+) GB", r.stdout)
    assert m, r.stdout
    from ml.training.checkpoint import dir_bytes

    ck = runs[0].parent / "checkpoints" / "step_0000004"
    assert abs(float(m.group(3)) - dir_bytes(ck) / 1e9) < 0.05 + 0.1 * dir_bytes(ck) / 1e9
    assert abs(float(m.group(1)) - shutil.disk_usage(ws).free / 1e9) < 5  # other processes write meanwhile
    r = fab(env, "logs", "--lines", "5")
    assert "[train: done, exit 0]" in r.stdout

    home = tmp_path / "home"
    r = fab(env, "fetch", "--dest", str(home))
    run_id = runs[0].parent.name
    assert (home / run_id / "export").is_dir() and (home / run_id / "loss_curve.png").is_file()

    image = next((ws / "data" / "output" / "renders").glob("*/rgba/000.png"))
    out = tmp_path / "refined.glb"
    r = fab(env, "infer", "--tiny", "--image", str(image), "--mesh", str(meshes / "ball.obj"), "--out", str(out),
            timeout=600)
    assert out.is_file() and out.stat().st_size > 1000, r.stdout + r.stderr
    assert f"refined mesh:   {out}" in r.stdout and "loss curve:" in r.stdout, r.stdout

    # The API on this machine (a free port: other servers may hold 8000), then teardown stops it.
    import json
    import socket
    import urllib.request

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    r = fab(env, "serve", "--tiny", "--port", str(port), timeout=600)
    assert f"refine API: http://127.0.0.1:{port}" in r.stdout, r.stdout
    key = r.stdout.split("API key: ")[1].split()[0]
    assert len(key) >= 16 and (ws / "outputs" / "serve-api-key").read_text().strip() == key
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as resp:
        assert resp.status == 200 and json.loads(resp.read())

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        tb_port = sk.getsockname()[1]
    r = fab(env, "tensorboard", "--port", str(tb_port))
    assert f"http://127.0.0.1:{tb_port}" in r.stdout
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{tb_port}/", timeout=5) as resp:
                assert resp.status == 200
                break
        except OSError:
            assert time.monotonic() < deadline, (ws / "jobs" / "tensorboard" / "log").read_text()
            time.sleep(1)

    r = fab(env, "teardown")
    assert "stopped job tensorboard" in r.stdout
    assert "stopped job serve" in r.stdout and "nothing is billed" in r.stdout
    assert (ws / "jobs" / "serve" / "exit_code").is_file()


def test_playbooks_local_weights_from_a_local_copy(env, tmp_path):
    """`fab weights --source FILE`: the upload path (no Hub); the file lands where the training config expects it."""
    import torch

    src = tmp_path / "dl" / "my_copy.pt"
    src.parent.mkdir()
    torch.save({p: {"w": torch.zeros(2)} for p in ("vae", "dit", "conditioner")}, src)
    r = fab(env, "weights", "--source", str(src))
    placed = tmp_path / "ws" / "ckpt" / "ultrashape_v1.pt"  # configs/train_dit_refine.yaml: model.weights
    assert placed.read_bytes() == src.read_bytes()
    assert "ready for training" in r.stdout + r.stderr
    bad = tmp_path / "dl2" / "ultrashape_v1.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    p = subprocess.run([sys.executable, "-m", "fabric", "weights", "--source", str(bad)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "weights failed" in p.stderr, p.stdout + p.stderr
