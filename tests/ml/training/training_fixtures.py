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
