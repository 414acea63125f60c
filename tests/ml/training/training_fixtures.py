"""Small processed-dataset fixtures in the layout ml.processing writes (for the data unit tests).

The end-to-end training tests use real meshes run through ml.processing instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_sample(root: Path, uid: str, n_points: int = 4000, views: int = 3, seed: int = 0) -> None:
    """A sphere-like sample: points in [0,1] with unit normals (first half 'uniform', second half 'sharp'),
    and `views` RGBA renders of a filled disc on a transparent background."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n_points, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pts = 0.5 + 0.4 * d
    (root / "samples").mkdir(parents=True, exist_ok=True)
    np.savez(root / "samples" / f"{uid}.npz", clean_surface_points=pts.astype(np.float32),
             clean_surface_normals=d.astype(np.float32))
    rd = root / "renders" / uid / "rgba"
    rd.mkdir(parents=True, exist_ok=True)
    for v in range(views):
        img = np.zeros((64, 80, 4), np.uint8)
        yy, xx = np.mgrid[:64, :80]
        inside = (yy - 30) ** 2 + (xx - 40 - 5 * v) ** 2 < 15**2
        img[inside] = (200, 40 + 50 * v, 30, 255)
        Image.fromarray(img, "RGBA").save(rd / f"{v:03d}.png")


def write_dataset(root: Path, n_train: int = 4, n_val: int = 2, **kw) -> list[str]:
    uids = [f"obj{i:02d}" for i in range(n_train + n_val)]
    for i, u in enumerate(uids):
        write_sample(root, u, seed=i, **kw)
    (root / "data_list").mkdir(parents=True, exist_ok=True)
    (root / "data_list" / "train.json").write_text(json.dumps(uids[:n_train]))
    (root / "data_list" / "val.json").write_text(json.dumps(uids[n_train:]))
    (root / "render.json").write_text(json.dumps({u: f"renders/{u}" for u in uids}))
    return uids


# ----------------------------------------------------------------------------- running the CLI
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "train_dit_refine-tiny.yaml"
# Small corpus meshes (watertight, < 5k faces) that ml.processing turns into training samples in seconds.
CORPUS_MESHES = ["cgal/anchor.off", "cgal/blobby.off", "cgal/cactus.off", "cgal/couplingdown.off",
                 "cgal/boeing.off", "cgal/cross.off"]


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # tiny ops: one thread each (2 shared cores)
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("WANDB_API_KEY", None)  # never upload from tests
    e["WANDB_SILENT"] = "true"
    return e


def train_cmd(data: Path, out: Path, *overrides: str, resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "ml.training", "--config", str(TINY), f"data.root={data}", f"run.output_dir={out}",
           "logging.wandb=disabled", *overrides]
    if resume is not None:
        cmd += ["--resume", resume]
    return cmd


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def process_corpus(corpus: Path, work: Path) -> Path:
    """Run ml.processing (small settings) over a few corpus meshes; returns its output folder."""
    src = work / "input"
    src.mkdir(parents=True, exist_ok=True)
    for rel in CORPUS_MESHES:
        shutil.copy(corpus / rel, src / Path(rel).name)
    out = work / "processed"
    run([sys.executable, "-m", "ml.processing", "--input-dir", str(src), "--output-dir", str(out), "--num-workers", "2",
         "--num-views", "2", "--resolution", "64", "--render-size", "128", "--set", "surface_uniform_points=2000",
         "surface_sharp_points=2000", "near_uniform_points=2000", "near_sharp_points=1200", "space_points=1000"])
    return out
