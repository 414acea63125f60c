"""Dataset, image preprocessing and the resumable data order (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ml.training.config import DataConfig
from ml.training.data import DataOrder, DatasetLayoutError, RefineDataset, collate, load_surface, load_view
from training_fixtures import write_dataset

pytestmark = pytest.mark.unit


def test_load_view_crops_pads_and_normalises(tmp_path):
    img = np.zeros((100, 200, 4), np.uint8)
    img[40:60, 10:50] = (255, 0, 0, 255)  # a red 20x40 box far from the centre
    Image.fromarray(img, "RGBA").save(tmp_path / "000.png")
    image, mask = load_view(tmp_path / "000.png", image_size=56, padding_ratio=1.15)
    assert image.shape == (3, 56, 56) and mask.shape == (1, 56, 56)
    assert image.min() >= -1 and image.max() <= 1
    # the box is centred: the centre pixel is red, the corners white background, mask -1 there
    c = image[:, 28, 28]
    assert c[0] > 0.9 and c[1] < -0.9 and c[2] < -0.9
    assert torch.allclose(image[:, 0, 0], torch.ones(3)) and mask[0, 0, 0] == -1 and mask[0, 28, 28] == 1
    # the crop keeps the aspect: the box (50x30 with its 5 px margins) spans the width more than the height
    rows = (mask[0] > 0).any(1).sum().item()
    cols = (mask[0] > 0).any(0).sum().item()
    assert cols > rows


def test_load_view_rejects_rgb_and_empty_alpha(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="RGBA"):
        load_view(tmp_path / "rgb.png", 28, 1.15)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="alpha channel is empty"):
        load_view(tmp_path / "empty.png", 28, 1.15)


def test_load_surface_halves_labels_and_range(tmp_path):
    n = 1000
    pts = np.random.default_rng(0).random((n, 3)).astype(np.float32)
    nrm = np.tile(np.array([[0, 0, 3.0]], np.float32), (n, 1))
    pts[n // 2 :] = 0.75  # the sharp half is recognisable
    np.savez(tmp_path / "a.npz", clean_surface_points=pts, clean_surface_normals=nrm)
    s = load_surface(tmp_path / "a.npz", 200, True, np.random.default_rng(1))
    assert s.shape == (200, 7) and s.dtype == torch.float32
    assert s[:, :3].min() >= -1 and s[:, :3].max() <= 1
    assert torch.allclose(s[:, 3:6].norm(dim=1), torch.ones(200))
    assert (s[:100, 6] == 0).all() and (s[100:, 6] == 1).all()
    assert torch.allclose(s[100:, :3], torch.full((100, 3), 0.5))  # 0.75 in [0,1] -> 0.5 in [-1,1]
    assert load_surface(tmp_path / "a.npz", 200, False, np.random.default_rng(1)).shape == (200, 6)
    with pytest.raises(ValueError, match="data.pc_size"):
        load_surface(tmp_path / "a.npz", 2000, True, np.random.default_rng(1))


def test_dataset_items_are_deterministic_and_broken_ones_reported(tmp_path):
    uids = write_dataset(tmp_path, n_train=3, n_val=1, n_points=800)
    cfg = DataConfig(root=tmp_path, pc_size=200, image_size=28, num_workers=0)
    ds = RefineDataset(cfg, "train", seed=3)
    a, b = ds[(1, 0)], ds[(1, 0)]
    assert a["uid"] == uids[1] and torch.equal(a["surface"], b["surface"]) and a["view"] == b["view"]
    assert not torch.equal(ds[(1, 1)]["surface"], a["surface"])  # another epoch draws other points
    (tmp_path / "samples" / f"{uids[2]}.npz").write_bytes(b"not a zip")
    bad = ds[(2, 0)]
    assert bad["uid"] == uids[2] and "error" in bad and "surface" not in bad
    batch = collate([a, bad])
    assert batch["uid"] == [uids[1]] and batch["surface"].shape == (1, 200, 7)
    assert batch["broken"][0]["uid"] == uids[2]
    assert len(RefineDataset(cfg, "val")) == 1


def test_dataset_layout_errors_name_the_fix(tmp_path):
    with pytest.raises(DatasetLayoutError, match="ml.processing"):
        RefineDataset(DataConfig(root=tmp_path), "train")
    (tmp_path / "data_list").mkdir()
    (tmp_path / "data_list" / "train.json").write_text(json.dumps([]))
    with pytest.raises(DatasetLayoutError, match="empty"):
        RefineDataset(DataConfig(root=tmp_path), "train")


def test_data_order_epochs_shards_and_resume():
    o0 = DataOrder(10, seed=1, micro_batch=2, rank=0, world_size=2)
    o1 = DataOrder(10, seed=1, micro_batch=2, rank=1, world_size=2)
    assert o0.per_epoch == 2  # 10 // 4; the last 2 samples of each epoch are dropped
    g0, g1 = o0.keys(0), o1.keys(0)
    first = [next(g0) + next(g1) for _ in range(2)]
    idx = [i for b in first for i, _ in b]
    assert len(set(idx)) == 8 and all(e == 0 for b in first for _, e in b)  # disjoint within an epoch
    nxt = next(g0)
    assert all(e == 1 for _, e in nxt)
    # resuming at position k yields exactly what the uninterrupted stream yields from k
    full = o0.keys(0)
    seq = [next(full) for _ in range(7)]
    assert [next(o0.keys(4)) for _ in range(1)][0] == seq[4]
    resumed = o0.keys(4)
    assert [next(resumed) for _ in range(3)] == seq[4:]


def test_data_order_converts_positions_between_world_sizes():
    one = DataOrder(12, seed=0, micro_batch=1, world_size=1)
    # 2 ranks, position 5 = epoch 0 (6 per epoch... 12 // 2 = 6), 10 samples consumed -> 10 on one rank
    assert one.convert(5, old_world_size=2) == 10
    assert one.convert(7, old_world_size=2) == 12 + 2  # epoch 1, 2 samples in
    assert one.convert(3, old_world_size=1) == 3
    with pytest.raises(DatasetLayoutError, match="global micro-batch"):
        DataOrder(3, seed=0, micro_batch=2, world_size=2)


def test_broken_limit_counts_distinct_training_samples(tmp_path):
    from ml.training.trainer import BrokenDataError, BrokenUids

    b = BrokenUids(0.05, 100, tmp_path / "broken_samples.jsonl")  # up to 5 bad samples of 100
    for _epoch in range(20):  # one bad mesh drawn in every epoch
        b.add(["m07"])
    assert len(b) == 1
    b.add(["m01", "m02", "m03", "m04", "m01"])
    assert len(b) == 5
    with pytest.raises(BrokenDataError, match="6 distinct training samples .* data.max_broken_fraction=0.05 of 100"):
        b.add(["m05"])
