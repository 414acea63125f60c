"""Dataset over what ml.processing wrote, and a data order that resumes exactly.

    ds = RefineDataset(cfg.data, split="train", seed=0)
    order = DataOrder(len(ds), seed=0, micro_batch=1, rank=0, world_size=1)
    loader = make_loader(ds, order, start=0, num_workers=2)   # yields batches; batch["broken"] lists failures

Layout read (data.root): samples/<uid>.npz (clean_surface_points in [0,1], clean_surface_normals; the first
half of the points uniform on the surface, the second half near sharp edges), render.json (uid -> render dir)
with <dir>/rgba/NNN.png (RGBA views), and data_list/<split>.json (list of uids).

Randomness is a pure function of (seed, epoch, index): which points, which view. Together with DataOrder
(a permutation per epoch, sharded over ranks) this makes a resumed run see exactly the samples, points and views
the uninterrupted run would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ml.training.config import DataConfig

log = logging.getLogger(__name__)

POINTS_KEY = "clean_surface_points"
NORMALS_KEY = "clean_surface_normals"


class DatasetLayoutError(RuntimeError):
    """The processed-data folder is not what ml.processing writes."""


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetLayoutError(
            f"{path}: {what} not found. Run `python -m ml.processing` first, or set data.root to its output folder."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{path}: not valid JSON ({e}); re-run ml.processing to rewrite it") from e


# ----------------------------------------------------------------------------- image preprocessing
def load_view(png: Path, image_size: int, padding_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One RGBA render -> (image (3,S,S) in [-1,1], mask (1,S,S) in [-1,1]), as the official loader prepares it:
    composite on white, crop to the alpha bbox with a 5 px margin, centre on a white square 1.15x the larger
    side, resize to S (bilinear, antialiased) and normalise with mean = std = 0.5."""
    with Image.open(png) as im:
        if im.mode != "RGBA":
            raise ValueError(f"{png}: expected an RGBA render, got mode {im.mode}")
        rgba = np.asarray(im, dtype=np.uint8)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    rgb = rgb.astype(np.uint8)
    mask = (alpha[..., 0] * 255.0).astype(np.uint8)
    ys, xs = np.nonzero(mask > 0)
    if len(ys) == 0:
        raise ValueError(f"{png}: the alpha channel is empty (nothing rendered)")
    h, w = mask.shape
    y0, y1 = max(ys.min() - 5, 0), min(ys.max() + 5, h)
    x0, x1 = max(xs.min() - 5, 0), min(xs.max() + 5, w)
    rgb, mask = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    ch, cw = mask.shape
    side = int(max(ch, cw) * padding_ratio)
    top, left = (side - ch) // 2, (side - cw) // 2
    canvas = np.full((side, side, 3), 255, np.uint8)
    mcanvas = np.zeros((side, side), np.uint8)
    canvas[top : top + ch, left : left + cw] = rgb
    mcanvas[top : top + ch, left : left + cw] = mask
    img = torch.from_numpy(canvas).permute(2, 0, 1).float().div_(255.0)
    m = torch.from_numpy(mcanvas)[None].float().div_(255.0)
    both = torch.cat([img, m])[None]  # one resize for image and mask
    both = F.interpolate(both, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    both = (both[0] - 0.5) / 0.5
    return both[:3].contiguous(), both[3:4].contiguous()


# ----------------------------------------------------------------------------- surface points
def load_surface(npz: Path, pc_size: int, sharpedge_label: bool, rng: np.random.Generator) -> torch.Tensor:
    """samples/<uid>.npz -> (pc_size, 6 or 7) float32: xyz in [-1,1], unit normal, [sharp flag].
    Half of the points come from the uniform half of the file, half from the sharp-edge half, without
    replacement, as the official loader does."""
    with np.load(npz) as z:
        missing = [k for k in (POINTS_KEY, NORMALS_KEY) if k not in z.files]
        if missing:
            raise KeyError(f"{npz}: missing {missing} (has {z.files}); re-run ml.processing")
        pts = np.asarray(z[POINTS_KEY], dtype=np.float32)
        nrm = np.asarray(z[NORMALS_KEY], dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3 or nrm.shape != pts.shape:
        raise ValueError(f"{npz}: points {pts.shape} / normals {nrm.shape}, expected (N,3) each")
    n_half = pts.shape[0] // 2
    half = pc_size // 2
    if half > n_half:
        raise ValueError(
            f"{npz}: has {pts.shape[0]} points ({n_half} per half) but data.pc_size={pc_size} needs {half} per half; "
            "lower data.pc_size or sample more points in ml.processing"
        )
    parts = []
    for flag, (lo, hi) in enumerate(((0, n_half), (n_half, 2 * n_half))):
        idx = lo + rng.choice(hi - lo, half, replace=False)
        p = pts[idx] * 2.0 - 1.0  # processing stores [0,1]; the VAE expects [-1,1]
        n = nrm[idx]
        n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        cols = [p, n] + ([np.full((half, 1), float(flag), np.float32)] if sharpedge_label else [])
        parts.append(np.concatenate(cols, axis=1))
    out = np.concatenate(parts, axis=0).astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{npz}: non-finite point or normal values")
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- dataset
class RefineDataset(torch.utils.data.Dataset):
    """Item (index, epoch) -> dict(uid, surface, image, mask, view) or dict(uid, error) when the sample is broken.

    A broken sample is reported, never swapped for another: the trainer logs and counts it.
    """

    def __init__(self, cfg: DataConfig, split: str, seed: int = 0) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.seed = seed
        list_name = cfg.train_list if split == "train" else cfg.val_list
        list_path = self.root / "data_list" / f"{list_name}.json"
        if split != "train" and not list_path.is_file():
            self.uids: list[str] = []
        else:
            uids = _read_json(list_path, f"{split} list")
            if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
                raise DatasetLayoutError(f"{list_path}: expected a JSON list of uids")
            self.uids = uids
        self.renders: dict[str, str] = _read_json(self.root / "render.json", "render.json") if self.uids else {}
        if split == "train" and not self.uids:
            raise DatasetLayoutError(f"{list_path}: the training list is empty; process some meshes first")

    def __len__(self) -> int:
        return len(self.uids)

    def view_dir(self, uid: str) -> Path:
        if uid not in self.renders:
            raise KeyError(f"{uid}: not in {self.root / 'render.json'}")
        p = Path(self.renders[uid])
        bases = [p] if p.is_absolute() else [self.root / p, p]
        # render.json may hold absolute paths of the machine that processed the data (synced elsewhere since)
        bases.append(self.root / "renders" / uid)
        for b in bases:
            # ml.processing writes <dir>/rgba/; the official layout nests one more <name>/ level.
            for cand in (b / "rgba", b / b.name / "rgba"):
                if cand.is_dir():
                    return cand
        raise FileNotFoundError(f"{uid}: no rgba/ folder under {bases[0]} (from render.json)")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        uid = self.uids[index]
        try:
            rng = np.random.default_rng([self.seed, epoch, index])
            surface = load_surface(self.root / "samples" / f"{uid}.npz", self.cfg.pc_size, self.cfg.sharpedge_label, rng)
            views = sorted(self.view_dir(uid).glob("[0-9][0-9][0-9].png"))
            if not views:
                raise FileNotFoundError(f"{uid}: no NNN.png views in {self.view_dir(uid)}")
            view = int(rng.integers(len(views)))
            image, mask = load_view(views[view], self.cfg.image_size, self.cfg.padding_ratio)
        except Exception as e:  # noqa: BLE001 - any failure marks this one sample broken; the trainer decides
            return {"uid": uid, "index": index, "error": f"{type(e).__name__}: {e}"}
        return {"uid": uid, "index": index, "surface": surface, "image": image, "mask": mask, "view": view}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "error" not in it]
    out: dict[str, Any] = {"broken": [{"uid": it["uid"], "error": it["error"]} for it in items if "error" in it]}
    out["uid"] = [it["uid"] for it in good]
    if good:
        for k in ("surface", "image", "mask"):
            out[k] = torch.stack([it[k] for it in good])
        out["view"] = torch.tensor([it["view"] for it in good])
    return out


# ----------------------------------------------------------------------------- data order
@dataclass
class DataOrder:
    """A fresh permutation of the dataset every epoch, cut into global micro-batches of micro_batch x world_size
    samples; rank r takes its slice of each. A position is one integer, the global micro-batch counter k, so
    resuming means starting the generator at k. The last incomplete global batch of an epoch is dropped."""

    n: int
    seed: int
    micro_batch: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        gb = self.micro_batch * self.world_size
        if self.n < gb:
            raise DatasetLayoutError(
                f"the training list has {self.n} samples but one global micro-batch needs {gb} "
                f"(train.micro_batch={self.micro_batch} x {self.world_size} ranks); process more meshes or use fewer GPUs"
            )
        self.per_epoch = self.n // gb

    def epoch_of(self, k: int) -> int:
        return k // self.per_epoch

    def perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)

    def keys(self, start: int) -> Iterator[list[tuple[int, int]]]:
        """Micro-batches of (index, epoch) for this rank, starting at global micro-batch `start`."""
        k = start
        gb = self.micro_batch * self.world_size
        while True:
            epoch, j = divmod(k, self.per_epoch)
            perm = self.perm(epoch)
            lo = j * gb + self.rank * self.micro_batch
            yield [(int(i), epoch) for i in perm[lo : lo + self.micro_batch]]
            k += 1

    def convert(self, k: int, old_world_size: int) -> int:
        """Position k saved with another number of ranks -> the first position here not before it
        (same epoch, the same number of samples of that epoch consumed, rounded up)."""
        if old_world_size == self.world_size:
            return k
        old_per_epoch = self.n // (self.micro_batch * old_world_size)
        epoch, j = divmod(k, old_per_epoch)
        consumed = j * self.micro_batch * old_world_size
        gb = self.micro_batch * self.world_size
        return epoch * self.per_epoch + min(-(-consumed // gb), self.per_epoch)


class _Batches(torch.utils.data.Sampler):
    def __init__(self, order: DataOrder, start: int) -> None:
        self.order, self.start = order, start

    def __iter__(self):
        return self.order.keys(self.start)


def make_loader(ds: RefineDataset, order: DataOrder, start: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """An endless iterator of collated micro-batches for this rank, from global micro-batch `start`."""
    return iter(
        torch.utils.data.DataLoader(
            ds,
            batch_sampler=_Batches(order, start),
            num_workers=num_workers,
            collate_fn=collate,
            persistent_workers=False,
            prefetch_factor=2 if num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
            # so a resumed run (new iterator after the RNG is restored) would shift every later random draw.
            # All our sample randomness comes from (seed, epoch, index) anyway.
            generator=torch.Generator().manual_seed(0),
        )
    )


def val_batches(ds: RefineDataset, micro_batch: int, limit: int, rank: int = 0, world_size: int = 1):
    """The first `limit` validation micro-batches of this rank, fixed across the run (epoch 0 randomness)."""
    keys = [(i, 0) for i in range(len(ds))][rank::world_size]
    # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively), so count from the
    # smallest shard.
    for b in range(min(limit, (len(ds) // world_size) // micro_batch)):
        yield collate([ds[k] for k in keys[b * micro_batch : (b + 1) * micro_batch]])
