"""The processing config: one dataclass, read strictly from configs/processing*.yaml (ml.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Fields that change what is written for a mesh. A finished mesh is redone when one of them changes
# (its fingerprint is stored in meta/<uid>.json); the others (workers, timeout, paths) do not matter.
OUTPUT_KEYS = (
    "resolution",
    "level_voxels",
    "close_holes_voxels",
    "surface_uniform_points",
    "surface_sharp_points",
    "near_uniform_scales",
    "near_uniform_points",
    "near_sharp_scales",
    "near_sharp_points",
    "space_points",
    "sdf_truncation",
    "num_views",
    "render_size",
    "fov_deg",
    "elevations_deg",
    "seed",
)


@dataclass
class ProcessingConfig:
    input_dir: str = "data/input"  # folder scanned recursively for .obj .stl .glb .gltf .ply .off
    output_dir: str = "data/output"  # samples/, renders/, data_list/, render.json, report.jsonl, contact_sheet.png
    num_workers: int = 0  # parallel worker processes; 0 = one per CPU core
    limit: Optional[int] = None  # process only the first N inputs in sorted path order
    timeout_s: float = 900.0  # wall seconds per mesh before its worker is killed and the mesh reported as timeout
    max_faces: int = 20_000_000  # larger inputs are rejected as too_large
    max_file_mb: float = 2048.0  # larger files are rejected as too_large before parsing
    retry_rejected: bool = False  # rerun meshes rejected by an earlier run with the same settings

    # watertight
    resolution: int = 512  # grid cells per side of the [0,1] box (official data: 512)
    level_voxels: float = 1.0  # the surface is the level set dist = level of the input: offset by this many voxels
    close_holes_voxels: int = 1  # holes narrower than ~2*(level+this) voxels are capped rather than opened

    # samples (counts are per file; the official loaders read the first/second halves of the surface points)
    surface_uniform_points: int = 300_000  # area-uniform surface points (first half of clean_surface_points)
    surface_sharp_points: int = 300_000  # curvature-weighted surface points (second half)
    near_uniform_points: int = 600_000  # uniform surface points + Gaussian noise, split over near_uniform_scales
    near_uniform_scales: list[float] = field(default_factory=lambda: [0.005, 0.05])  # noise sigma, [0,1] units
    near_sharp_points: int = 300_000  # curvature surface points + noise, split over near_sharp_scales
    near_sharp_scales: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.006, 0.01, 0.02, 0.04])
    space_points: int = 300_000  # uniform in the [0,1] box
    sdf_truncation: float = 0.05  # |sdf| is exact below this ([0,1] units), clamped to it above (sign exact)
    seed: int = 0  # sampling seed, combined with the uid so every mesh is reproducible

    # renders
    num_views: int = 16  # the official image loader draws view 0..15
    render_size: int = 512  # pixels per side
    fov_deg: float = 40.0  # vertical field of view of the perspective camera
    elevations_deg: list[float] = field(default_factory=lambda: [20.0, -10.0, 35.0, 5.0])  # cycled over views
    contact_sheet_meshes: int = 64  # meshes shown on the run's contact sheet (first in uid order)

    # data lists
    val_ratio: float = 0.1  # share of uids in data_list/val.json (by a hash of the uid; at least one if >= 2 meshes)

    # test hook: a worker whose input path contains this string sleeps until it is killed (timeout tests)
    debug_hang_on: Optional[str] = None

    def __post_init__(self) -> None:
        if self.resolution < 32:
            raise ValueError(f"resolution={self.resolution}: use at least 32 (512 for the official data)")
        if self.num_views < 1 or self.render_size < 16:
            raise ValueError("num_views must be >= 1 and render_size >= 16")
        if self.surface_uniform_points < 1 or self.surface_sharp_points < 1:
            raise ValueError("surface_uniform_points and surface_sharp_points must be >= 1")
        if not self.near_uniform_scales or not self.near_sharp_scales:
            raise ValueError("near_uniform_scales and near_sharp_scales need at least one sigma each")
        if self.level_voxels <= 0:
            raise ValueError("level_voxels must be > 0")
        if self.close_holes_voxels < 0:
            raise ValueError("close_holes_voxels must be >= 0")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ValueError(f"val_ratio={self.val_ratio}: must be in [0, 1)")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 (0 = one per core)")
