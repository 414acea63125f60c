"""Coarse-to-fine volume decoding and a sparse marching cubes in torch (runs on GPU or CPU).

The official code decodes occupancy logits on a dense (r0+1)^3 grid at r0 = 64 or so, then at each
finer octree level only near the surface, leaves the rest NaN, and runs a CUDA-only sparse marching
cubes (cubvh). We do the same refinement, but fill every point not queried at a level with the
trilinear upsampling of the coarser level instead of NaN: the sign is right there by construction
(those points are far from the surface), so the final grid is complete, marching cubes sees no holes
and the mesh is closed. The outermost grid layer is forced outside so the surface never leaves the
box open.

Marching cubes uses the classic 256-case triangle table. We do not ship a copy of anyone's table: it
is derived once, at first use, by asking scikit-image's marching cubes (method="lorensen") for each
of the 256 corner sign patterns of a single 2x2x2 cell, and caching the triangles as edge triples.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# corner i of a cell sits at offset _CORNERS[i] = (dx, dy, dz); bit i of the case code is corner i
_CORNERS = [(x, y, z) for z in (0, 1) for y in (0, 1) for x in (0, 1)]
# the 12 cell edges as (corner a, corner b) with b = a + one unit step along one axis
_EDGES = [(a, b) for a, b in itertools.combinations(range(8), 2)
          if sum(abs(p - q) for p, q in zip(_CORNERS[a], _CORNERS[b])) == 1]


@functools.lru_cache(maxsize=1)
def _triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """(256, 5, 3) int edge ids (-1 padded) and (256,) triangle counts."""
    from skimage import measure  # only needed once per process

    mid = {tuple((np.add(_CORNERS[a], _CORNERS[b])) / 2): e for e, (a, b) in enumerate(_EDGES)}
    table = -np.ones((256, 5, 3), dtype=np.int64)
    count = np.zeros(256, dtype=np.int64)
    for case in range(1, 255):
        vol = np.full((2, 2, 2), -1.0)
        for i, (x, y, z) in enumerate(_CORNERS):
            if case >> i & 1:
                vol[x, y, z] = 1.0
        verts, faces, _, _ = measure.marching_cubes(vol, 0.0, method="lorensen")
        for t, face in enumerate(faces):
            table[case, t] = [mid[tuple(np.round(verts[j], 3))] for j in face]
        count[case] = len(faces)
    return table, count


def marching_cubes(grid: torch.Tensor, level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-surface of a complete scalar grid (R+1, R+1, R+1), 'inside' = value > level.

    Returns vertices (V, 3) in grid index units (float32) and faces (F, 3) int64. Only the cells
    the surface crosses are touched after one pass computing the case codes.
    """
    if grid.ndim != 3:
        raise ValueError(f"marching_cubes wants a 3-D grid, got shape {tuple(grid.shape)}")
    dev = grid.device
    table_np, count_np = _triangle_table()
    table, count = torch.from_numpy(table_np).to(dev), torch.from_numpy(count_np).to(dev)
    inside = grid > level
    R0, R1, R2 = (s - 1 for s in grid.shape)
    code = torch.zeros((R0, R1, R2), dtype=torch.int32, device=dev)
    for i, (dx, dy, dz) in enumerate(_CORNERS):
        code |= inside[dx:dx + R0, dy:dy + R1, dz:dz + R2].int() << i
    cells = torch.nonzero((code > 0) & (code < 255))  # (M, 3)
    if cells.shape[0] == 0:
        return torch.zeros((0, 3), device=dev), torch.zeros((0, 3), dtype=torch.int64, device=dev)
    codes = code[cells[:, 0], cells[:, 1], cells[:, 2]].long()
    ntri = count[codes]
    cell_of_tri = torch.repeat_interleave(torch.arange(cells.shape[0], device=dev), ntri)
    first = torch.cumsum(ntri, 0) - ntri
    slot = torch.arange(cell_of_tri.shape[0], device=dev) - first[cell_of_tri]
    local = table[codes[cell_of_tri], slot]  # (T, 3) local edge ids
    # global edge id = (linear index of the edge's lower corner) * 3 + axis
    edge_a = torch.tensor([a for a, _ in _EDGES], device=dev)
    edge_axis = torch.tensor([[i for i in range(3) if _CORNERS[b][i] != _CORNERS[a][i]][0] for a, b in _EDGES], device=dev)
    corner_off = torch.tensor(_CORNERS, device=dev)
    p0 = cells[cell_of_tri].unsqueeze(1) + corner_off[edge_a[local]]  # (T, 3, 3)
    axis = edge_axis[local]  # (T, 3)
    S1, S2 = grid.shape[1], grid.shape[2]
    gid = ((p0[..., 0] * S1 + p0[..., 1]) * S2 + p0[..., 2]) * 3 + axis
    uniq, inv = torch.unique(gid.flatten(), return_inverse=True)
    lin, ax = uniq // 3, uniq % 3
    start = torch.stack([lin // (S1 * S2), (lin // S2) % S1, lin % S2], dim=-1)
    end = start + F.one_hot(ax, 3)
    g0 = grid[start[:, 0], start[:, 1], start[:, 2]].float()
    g1 = grid[end[:, 0], end[:, 1], end[:, 2]].float()
    w = ((level - g0) / (g1 - g0)).clamp(0, 1).unsqueeze(-1)
    verts = start.float() + w * (end - start).float()
    faces = inv.view(-1, 3)
    return verts, faces


def _near_surface(grid: torch.Tensor, level: float) -> torch.Tensor:
    """Points whose sign differs from a 6-neighbour, or whose logit is small (|x| < 0.95, official)."""
    s = grid > level
    m = torch.zeros_like(s)
    for d in range(3):
        n = s.shape[d]
        a, b = s.narrow(d, 0, n - 1), s.narrow(d, 1, n - 1)
        diff = a != b
        m.narrow(d, 0, n - 1).logical_or_(diff)
        m.narrow(d, 1, n - 1).logical_or_(diff)
    return m | ((grid - level).abs() < 0.95)


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(mask[None, None].half() if mask.is_cuda else mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def octree_resolutions(octree_resolution: int, min_resolution: int = 63) -> list[int]:
    """1024 -> [64, 128, 256, 512, 1024] (official schedule)."""
    res = []
    r = octree_resolution
    if r < min_resolution:
        res.append(r)
    while r >= min_resolution:
        res.append(r)
        r //= 2
    return res[::-1]


@torch.no_grad()
def decode_volume(
    query_fn: Callable[[torch.Tensor], torch.Tensor],
    bounds: float,
    octree_resolution: int,
    device: torch.device | str = "cpu",
    level: float = 0.0,
    num_chunks: int = 100_000,
    min_resolution: int = 63,
    progress: bool = False,
    query_counts: list | None = None,
) -> torch.Tensor:
    """Logit grid (R+1)^3 on [-bounds, bounds]^3, coarse to fine.

    query_fn maps points (n, 3) float32 to logits (n,); it gets spatially compact chunks of at most
    num_chunks points. Returns a complete float32 grid (no NaN). query_counts, if given, receives
    (resolution, points queried) per level.
    """
    from tqdm.auto import tqdm

    resolutions = octree_resolutions(octree_resolution, min_resolution)
    dev = torch.device(device)
    stats = query_counts if query_counts is not None else []

    def run(points: torch.Tensor) -> torch.Tensor:
        # visit the points cell by cell (16^3 cells over the box), so that every chunk is spatially
        # compact: a query_fn that picks the latent tokens relevant to a chunk (FlashVDM) needs that
        cell = ((points + bounds) / (2 * bounds) * 16).long().clamp(0, 15)
        order = torch.argsort((cell[:, 0] * 16 + cell[:, 1]) * 16 + cell[:, 2])
        out = torch.empty(points.shape[0], device=dev)
        for s in tqdm(range(0, points.shape[0], num_chunks), disable=not progress, leave=False,
                      desc=f"volume r{r}"):
            idx = order[s:s + num_chunks]
            out[idx] = query_fn(points[idx]).float()
        stats.append((r, int(points.shape[0])))
        return out

    grid = None
    for li, r in enumerate(resolutions):
        step = 2.0 * bounds / r
        if grid is None:
            ax = torch.linspace(-bounds, bounds, r + 1, device=dev)
            pts = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).view(-1, 3)
            grid = run(pts).view(r + 1, r + 1, r + 1)
            continue
        last = li == len(resolutions) - 1
        near = _near_surface(grid, level)
        if not last:
            near = _dilate(near)
        fine = torch.zeros((r + 1,) * 3, dtype=torch.bool, device=dev)
        idx = torch.nonzero(near)
        fine[idx[:, 0] * 2, idx[:, 1] * 2, idx[:, 2] * 2] = True
        for _ in range(2 if last else 1):
            fine = _dilate(fine)
        up = F.interpolate(grid[None, None], size=(r + 1,) * 3, mode="trilinear", align_corners=True)[0, 0]
        del grid
        qidx = torch.nonzero(fine)
        pts = qidx.float() * step - bounds
        up[qidx[:, 0], qidx[:, 1], qidx[:, 2]] = run(pts)
        grid = up
    # close the box: the outer layer is outside, so every surface is closed
    lo = level - 1.0
    grid[0], grid[-1], grid[:, 0], grid[:, -1], grid[:, :, 0], grid[:, :, -1] = lo, lo, lo, lo, lo, lo
    return grid
