"""Headless RGBA renders on the CPU: our own z-buffer rasteriser (kernels.rasterize), no GL, no display.

    views, cameras = render_views(vertices01, faces, num_views=16, size=512)

Why not OpenGL/Mesa: CI and pods have neither a display nor the same GL stack, and a 1 M-face sculpt
rasterises in ~0.05 s per 512^2 view in compiled code, so there is nothing to win. Shading is flat (face
normals), two-sided (sculpts are not reliably oriented), grey clay, transparent background: the official
image loader composites the alpha onto white and crops to it.

Cameras: perspective, looking at the bounding-box centre from `num_views` azimuths evenly spaced around
+Y (up), elevations cycled from a list, at a distance where the bounding sphere fills the frame.
Saved per view in OpenCV convention (x right, y down, z forward) in the normalised [0,1] frame of the
samples: `c2w` 4x4 (camera to world), `K` 3x3 intrinsics in pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ml.processing import kernels

ALBEDO = np.array([0.78, 0.76, 0.72], np.float32)


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    fwd = target - eye
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, np.float64))
    if np.linalg.norm(right) < 1e-8:  # looking straight along up
        right = np.cross(fwd, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, fwd, eye
    return c2w


def cameras_for(vertices01: np.ndarray, num_views: int, size: int, fov_deg: float, elevations_deg) -> list[dict]:
    lo, hi = vertices01.min(0).astype(np.float64), vertices01.max(0).astype(np.float64)
    target = (lo + hi) / 2
    radius = float(np.linalg.norm(vertices01.astype(np.float64) - target, axis=1).max()) or 0.5
    half = math.radians(fov_deg) / 2
    dist = radius / math.sin(half) * 1.02
    f = (size / 2) / math.tan(half)
    # OpenCV convention (what cameras.json says): pixel i's centre is at coordinate i, so the image
    # centre is (size - 1) / 2. render() adds the 0.5 back for the rasteriser, which samples x + 0.5.
    c = size / 2 - 0.5
    K = [[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]]
    cams = []
    for i in range(num_views):
        az = 2 * math.pi * i / num_views
        el = math.radians(elevations_deg[i % len(elevations_deg)])
        eye = target + dist * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
        cams.append(
            {
                "index": i,
                "azimuth_deg": math.degrees(az),
                "elevation_deg": math.degrees(el),
                "distance": dist,
                "fov_deg": fov_deg,
                "width": size,
                "height": size,
                "K": K,
                "c2w": look_at(eye, target).tolist(),
            }
        )
    return cams


def render(vertices01: np.ndarray, faces: np.ndarray, face_normals: np.ndarray, cam: dict) -> np.ndarray:
    """One view -> (H,W,4) uint8 RGBA."""
    H, W = cam["height"], cam["width"]
    c2w = np.asarray(cam["c2w"])
    K = np.asarray(cam["K"])
    R, t = c2w[:3, :3], c2w[:3, 3]
    pc = (vertices01.astype(np.float64) - t) @ R  # world -> camera (R orthonormal)
    z = pc[:, 2]
    invz = np.where(z > 1e-9, 1.0 / np.maximum(z, 1e-9), -1.0)
    xy = np.empty((len(pc), 2))
    # K is OpenCV's (pixel centres at integers); the rasteriser's pixel x spans [x, x + 1)
    xy[:, 0] = K[0, 0] * pc[:, 0] * invz + K[0, 2] + 0.5
    xy[:, 1] = K[1, 1] * pc[:, 1] * invz + K[1, 2] + 0.5
    face_id = np.full((H, W), -1, np.int32)
    zbuf = np.zeros((H, W), np.float64)
    kernels.rasterize(xy, invz, faces, H, W, face_id, zbuf)
    # key light from the camera's upper left plus a headlight, both two-sided
    key = R @ np.array([-0.45, -0.6, 0.66])
    key /= np.linalg.norm(key)
    view = R[:, 2]
    nk = np.abs(face_normals @ key)
    nv = np.abs(face_normals @ view)
    shade = (0.22 + 0.55 * nk + 0.28 * nv).astype(np.float32)
    hit = face_id >= 0
    img = np.zeros((H, W, 4), np.uint8)
    col = np.clip(shade[face_id[hit]][:, None] * ALBEDO * 255.0, 0, 255)
    img[hit, :3] = col.astype(np.uint8)
    img[hit, 3] = 255
    return img


def render_views(vertices01, faces, face_normals, num_views=16, size=512, fov_deg=40.0, elevations_deg=(20.0,)):
    cams = cameras_for(vertices01, num_views, size, fov_deg, list(elevations_deg))
    F = np.ascontiguousarray(faces, dtype=np.int64)
    return [render(vertices01, F, face_normals, c) for c in cams], cams


def contact_sheet(rows: list[tuple[str, list[str]]], thumb: int = 128) -> Image.Image:
    """One row per mesh: its label and up to 6 views, composited on white."""
    from PIL import ImageDraw

    cols = max([len(v) for _, v in rows] + [1])
    label_h = 14
    sheet = Image.new("RGB", (cols * thumb, max(1, len(rows)) * (thumb + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, paths) in enumerate(rows):
        y = r * (thumb + label_h)
        draw.text((3, y + 1), label[:120], fill=(0, 0, 0))
        for c, p in enumerate(paths):
            with Image.open(p) as im:
                im = im.convert("RGBA")
                im.thumbnail((thumb, thumb))
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                sheet.paste(Image.alpha_composite(bg, im).convert("RGB"), (c * thumb, y + label_h))
    return sheet
