"""Normalisation and point sampling in UltraShape's sample format.

Frame: the official sampler maps a mesh into [0,1]^3 with u = (v - center) / scale + 0.5, where center is
the bounding-box centre and scale is the largest side * 1.02 (a 1% margin each side); the loaders then use
(u - 0.5) * 2 in [-1,1] and sdf * 2. We store the same: coordinates and SDF in [0,1] units, SDF negative
inside (cuBVH's convention, which the official sampler uses), `center` (3,) and `scale` () to map back:
v = (u - 0.5) * scale + center.

Surface points are taken on the watertight surface (the SDF's zero set), as the official sampler does.
"""

from __future__ import annotations

import numpy as np

from ml.processing import kernels
from ml.processing.watertight import Watertight

MARGIN = 0.01  # official normalize_points_and_mesh margin


def normalize(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Source frame -> [0,1] frame as the official sampler does. Returns (u float32, center (3,), scale ())."""
    lo, hi = vertices.min(0), vertices.max(0)
    center = (hi + lo) / 2.0
    scale = float((hi - lo).max()) * (1.0 + 2.0 * MARGIN)
    u = ((vertices - center) / scale + 0.5).astype(np.float32)
    return u, center.astype(np.float32), np.float32(scale)


def face_normals_areas(V: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = V[F[:, 0]].astype(np.float64)
    n = np.cross(V[F[:, 1]] - a, V[F[:, 2]] - a)
    area2 = np.linalg.norm(n, axis=1)
    return (n / np.maximum(area2, 1e-30)[:, None]).astype(np.float32), area2 * 0.5


def _points_on_faces(V, F, idx, rng):
    r1 = np.sqrt(rng.random(len(idx)))
    r2 = rng.random(len(idx))
    w = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)
    tri = V[F[idx]].astype(np.float64)  # (N,3,3)
    return np.einsum("nk,nkd->nd", w, tri).astype(np.float32)


def _choose(weights: np.ndarray, n: int, rng) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return np.minimum(np.searchsorted(c, rng.random(n) * c[-1], side="right"), len(weights) - 1)


def vertex_curvature(V: np.ndarray, F: np.ndarray, fn: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The official sampler's sharpness per vertex: mean |n_i - n_j| over the edges at a vertex (area-weighted
    vertex normals), scaled to [0,1]."""
    vn = np.zeros((len(V), 3), np.float64)
    wn = fn * area[:, None]
    for k in range(3):
        _bincount_add(vn, F[:, k], wn)
    vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)
    e0 = np.concatenate([F[:, 0], F[:, 1], F[:, 2]])
    e1 = np.concatenate([F[:, 1], F[:, 2], F[:, 0]])
    d = np.linalg.norm(vn[e0] - vn[e1], axis=1)
    curv = np.bincount(e0, d, len(V)) + np.bincount(e1, d, len(V))
    deg = np.bincount(e0, minlength=len(V)) + np.bincount(e1, minlength=len(V))
    curv = curv / np.maximum(deg, 1)
    lo, hi = curv.min(), curv.max()
    return (curv - lo) / (hi - lo + 1e-12)


def _bincount_add(out, idx, w):
    for d in range(3):
        out[:, d] += np.bincount(idx, w[:, d], out.shape[0])


def sample_surface(V, F, n_uniform: int, n_sharp: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(n_uniform + n_sharp, 3) points and unit face normals: first area-uniform, then curvature-weighted."""
    fn, area = face_normals_areas(V, F)
    iu = _choose(area, n_uniform, rng)
    curv = vertex_curvature(V, F, fn, area)
    w = curv[F].mean(1)
    # the official sampler weights by curvature alone; a flat mesh (all zero) falls back to area
    w = w if w.sum() > 0 else area
    ic = _choose(w, n_sharp, rng)
    idx = np.concatenate([iu, ic])
    return _points_on_faces(V, F, idx, rng), fn[idx]


def near_points(surface: np.ndarray, n: int, scales: list[float], rng) -> np.ndarray:
    """n points: random surface points plus isotropic Gaussian noise, the n split evenly over the sigmas
    (official: uniform points at 0.005 and 0.05, sharp ones at 0.001 ... 0.04). The official truncnorm cut
    at +-0.25 is kept; points are clipped to the [0,1] box where the SDF is defined."""
    src = surface[rng.integers(0, len(surface), n)]
    sig = np.repeat(np.asarray(scales, np.float32), [len(c) for c in np.array_split(np.arange(n), len(scales))])
    noise = np.clip(rng.standard_normal((n, 3)).astype(np.float32) * sig[:, None], -0.25, 0.25)
    return np.clip(src + noise, 0.0, 1.0).astype(np.float32)


class SDF:
    """Signed distance to a watertight mesh ([0,1] units, negative inside), exact up to `truncation`
    (clamped to it beyond, sign still exact). Magnitude: kernels.surface_distance (nearest-vertex
    candidates from a coarse closest-point grid, greedy descent, exact distance to the faces around the
    vertex found). Sign: the flood-fill grid of the watertight step (Watertight.sign).

    scipy's cKDTree took 15-70 us per query on these near-surface points (25 s for 600k here); this takes
    ~1 us."""


    def __init__(self, wt: Watertight, truncation: float) -> None:
        self.wt = wt
        self.trunc = float(truncation)
        F = wt.faces
        nv = len(wt.vertices)
        order = np.argsort(F.ravel(), kind="stable")
        self.ring_faces = (order // 3).astype(np.int64)
        self.ring_ptr = np.zeros(nv + 1, np.int64)
        np.cumsum(np.bincount(F.ravel(), minlength=nv), out=self.ring_ptr[1:])
        R = wt.resolution
        self.Vvox = (wt.vertices * np.float32(R)).astype(np.float32)
        # coarse cells of 1/128 of the box (4 voxels at 512): fine enough that descents start close by
        self.coarse = max(1, R // 128)
        self.nc = R // self.coarse + 2
        band = self.trunc * R / self.coarse + 2.0  # coarse cells
        self.near = kernels.vertex_cpt(self.Vvox / np.float32(self.coarse), self.nc, np.float32(band))

    def __call__(self, P: np.ndarray) -> np.ndarray:
        R = self.wt.resolution
        Pv = (np.clip(P, 0.0, 1.0) * np.float32(R)).astype(np.float32)
        # queries in coarse-cell order: neighbouring queries walk the same vertices, which keeps them in
        # cache (random order was ~2x slower at 512^3)
        cell = (Pv // np.float32(self.coarse * 2)).astype(np.int64)
        order = np.argsort((cell[:, 0] * 4096 + cell[:, 1]) * 4096 + cell[:, 2], kind="stable")
        Ps = P[order]
        d = kernels.surface_distance(
            Pv[order], np.float32(self.coarse), self.Vvox, self.wt.faces, self.ring_ptr, self.ring_faces,
            self.near, self.nc, np.float32(self.trunc * R),
        )
        d = np.minimum(d / np.float32(R), np.float32(self.trunc)) * self.wt.sign(Ps)
        out = np.empty(len(P), np.float32)
        out[order] = d
        return out
