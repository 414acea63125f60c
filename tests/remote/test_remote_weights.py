"""`python -m remote.weights` (what `fab weights` runs on the pod) against a local Hugging Face cache.

No network here, so the download itself is exercised offline (HF_HUB_OFFLINE=1) against a cache laid
out as huggingface_hub lays it out: the blob named by its sha256, a snapshot symlink, refs/main. The
resume logic is huggingface_hub's own; what we test is ours: the digest check, the recorded digest,
the placement, the layout check through ml/models/checkpoint.py, and the errors.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remote.target import REPO

pytestmark = pytest.mark.integration


def make_cache(cache: Path, payload: bytes, name_digest: str | None = None) -> str:
    digest = name_digest or hashlib.sha256(payload).hexdigest()
    repo = cache / "models--infinith--UltraShape"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(payload)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "ultrashape_v1.pt").symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return digest


def checkpoint_bytes(tmp: Path, parts=("vae", "dit", "conditioner")) -> bytes:
    p = tmp / "ck.pt"
    torch.save({part: {"w": torch.arange(4.0)} for part in parts}, p)
    return p.read_bytes()


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "remote.weights", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_remote_weights_from_cache_verified_and_placed(tmp_path):
    payload = checkpoint_bytes(tmp_path)
    digest = make_cache(tmp_path / "ckpt" / "hf-cache", payload)
    r = run(tmp_path, "--out", "ckpt/ultrashape_v1.pt")
    assert r.returncode == 0, r.stderr + r.stdout
    out = tmp_path / "ckpt" / "ultrashape_v1.pt"
    assert out.read_bytes() == payload
    assert f"sha256 {digest} ok" in r.stdout and "parts: vae" in r.stdout
    assert digest in (tmp_path / "ckpt" / "ultrashape_v1.pt.sha256").read_text()
    # Second run: recorded digest, no re-hash.
    r = run(tmp_path, "--out", "ckpt/ultrashape_v1.pt")
    assert r.returncode == 0 and "checking sha256" not in r.stdout


def test_remote_weights_corrupt_download_is_an_error(tmp_path):
    payload = checkpoint_bytes(tmp_path)
    make_cache(tmp_path / "ckpt" / "hf-cache", payload[:-10], name_digest=hashlib.sha256(payload).hexdigest())
    r = run(tmp_path, "--out", "ckpt/ultrashape_v1.pt")
    assert r.returncode == 1
    assert "does not match" in r.stderr and "corrupt or truncated" in r.stderr
    assert not (tmp_path / "ckpt" / "ultrashape_v1.pt").exists()


def test_remote_weights_uploaded_copy_and_layout_check(tmp_path):
    (tmp_path / "ckpt").mkdir()
    good = checkpoint_bytes(tmp_path)
    (tmp_path / "ckpt" / "ultrashape_v1.pt").write_bytes(good)
    r = run(tmp_path, "--local", "--out", "ckpt/ultrashape_v1.pt", "--sha256", "0" * 64)
    assert r.returncode == 1 and "does not match" in r.stderr
    r = run(tmp_path, "--local", "--out", "ckpt/ultrashape_v1.pt", "--sha256", hashlib.sha256(good).hexdigest())
    assert r.returncode == 0, r.stderr
    (tmp_path / "ckpt" / "bad.pt").write_bytes(checkpoint_bytes(tmp_path, parts=("vae",)))
    r = run(tmp_path, "--local", "--out", "ckpt/bad.pt")
    assert r.returncode == 1 and "missing parts ['dit', 'conditioner']" in r.stderr + r.stdout
    r = run(tmp_path, "--out", "ckpt/other.pt", "--filename", "nothere.pt")
    assert r.returncode == 1 and "fab weights --source" in r.stderr
