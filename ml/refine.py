"""Refine a coarse mesh with UltraShape 1.0, guided by one image of the object.

    python -m ml.refine --ckpt ultrashape_v1.pt --config configs/infer_dit_refine.yaml \\
        --image view.png --mesh coarse.glb --out refined.glb [--steps 50 --guidance 5.0 \\
        --octree-resolution 1024 --seed 42 --device cuda]

    # CPU smoke test with a tiny random checkpoint (seconds):
    python -m ml.refine --random-tiny --config configs/infer_dit_refine-tiny.yaml \\
        --image examples/images/x.png --mesh examples/meshes/x.glb --out /tmp/refined.glb

What happens (official UltraShape semantics unless noted):
 1. mesh -> centred and scaled into [-0.99, 0.99]^3 (official --scale 0.99); 204,800 uniform
    surface samples + 204,800 samples along sharp edges;
 2. the samples' occupied voxels at 128^3 -> up to 32,768 tokens with integer positions (RoPE);
    a mesh with fewer occupied voxels gets fewer tokens (the official pipeline crashes there);
 3. image: alpha crop, pad to square with a 15 % border, 1024 px, white background; the alpha mask
    drops background patches from the DINOv2 context;
 4. 50 Euler flow-matching steps with classifier-free guidance 5.0 (batched: one DiT call a step);
    optional speed-ups that change the result (off by default): refine.guidance_until, refine.cache_interval;
 5. VAE decode, coarse-to-fine occupancy grid up to octree_resolution^3, marching cubes;
 6. the mesh goes back to the input mesh's own frame (the official output stays normalised).
Bad inputs raise ValueError naming the file and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ml.config import ConfigError, load_config, parse_overrides
from ml.models.checkpoint import (
    UltraShapeConfig,
    UltraShapeModels,
    build_models,
    load_checkpoint,
    materialize,
    write_random_checkpoint,
)
from ml.models.flow_matching import sample_euler
from ml.models.vae import voxelize


@dataclass
class RefineSettings:
    steps: int = 50  # Euler steps (official default); the last one has dt = 0 and is skipped
    guidance: float = 5.0  # classifier-free guidance scale; < 0 turns guidance off
    octree_resolution: int = 1024  # final marching-cubes grid is octree_resolution^3 cells
    min_resolution: int = 63  # coarse-to-fine decoding starts at the first halving below this (64 for 1024)
    seed: int = 42  # seeds surface sampling, voxel choice and the initial noise
    num_uniform_points: int = 204800  # uniform surface samples (official refine script)
    num_sharp_points: int = 204800  # samples along sharp edges (official refine script)
    sharp_threshold: float = 0.985  # a vertex is sharp if some face normal has cos < this with its vertex normal
    normalize_scale: float = 0.99  # mesh is scaled to fit [-s, s]^3 (official --scale default)
    bounds: float = 1.0  # decoding box half-size (official box_v in the refine script)
    mc_level: float = 0.0  # iso level of the occupancy logits
    image_size: int = 1024  # preprocessed image size (official ImageProcessorV2 size)
    border_ratio: float = 0.15  # empty border around the object in the preprocessed image
    num_chunks: int = 200000  # query points per geometry-decoder call
    dtype: str = "bfloat16"  # weights/activations on CUDA: bfloat16 | float16 | float32 (CPU always float32)
    batched_cfg: bool = True  # one DiT call per step for conditional + unconditional
    guidance_until: float = 1.0  # CFG only while t < this (speed-up that changes results; 1.0 = official)
    # DeepCache-style reuse across steps (speed-up that changes results; 1 = off = official): a full DiT call every
    # cache_interval steps, in between only the first and last cache_depth blocks on the kept deep state
    cache_interval: int = 1
    cache_depth: int = 2  # blocks run fresh at each end of a cached step: 1..dit.depth//2 (~2*cache_depth/21 of a call)
    compile: bool = False  # torch.compile each DiT block (fuses norms, RoPE, residuals; CUDA only; ~1 min first call)
    flashvdm: bool = True  # official default: decode attending to the top third of latent tokens per chunk

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"refine.steps must be >= 2, got {self.steps}")
        if self.octree_resolution < 8:
            raise ValueError(f"refine.octree_resolution must be >= 8, got {self.octree_resolution}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"refine.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not 0 < self.normalize_scale <= 1:
            raise ValueError(f"refine.normalize_scale must be in (0, 1], got {self.normalize_scale}")
        if self.cache_interval < 1:
            raise ValueError(f"refine.cache_interval must be >= 1 (1 = no step caching, the official sampler), "
                             f"got {self.cache_interval}")
        if self.cache_depth < 1:
            raise ValueError(f"refine.cache_depth must be >= 1 (blocks run fresh on a cached step), got {self.cache_depth}")


@dataclass
class InferConfig:
    model: UltraShapeConfig = field(default_factory=UltraShapeConfig)  # network sizes (must match the checkpoint)
    refine: RefineSettings = field(default_factory=RefineSettings)  # inference settings

    def __post_init__(self):
        half = self.model.dit.depth // 2
        if self.refine.cache_depth > half:
            raise ValueError(f"refine.cache_depth ({self.refine.cache_depth}) must be in [1, model.dit.depth//2 = "
                             f"{half}]: a cached step runs the first and the last cache_depth blocks, which must be "
                             f"long-skip pairs")


# ----------------------------------------------------------------------------- inputs

def load_mesh(mesh_or_path) -> "trimesh.Trimesh":  # noqa: F821
    """A Trimesh from a path (glb/obj/ply/stl/off...) or a Trimesh/Scene; ValueError if unusable."""
    import trimesh

    name = str(mesh_or_path) if isinstance(mesh_or_path, (str, os.PathLike)) else "<mesh>"
    if isinstance(mesh_or_path, (str, os.PathLike)):
        p = Path(mesh_or_path)
        if not p.is_file():
            raise ValueError(f"{p}: mesh file not found. Pass an existing .glb/.obj/.ply/.stl/.off file with --mesh")
        try:
            mesh = trimesh.load(p, force="mesh", process=False)
        except Exception as e:  # noqa: BLE001 -- any loader failure means the same thing to the user
            raise ValueError(f"{p}: could not read the mesh ({type(e).__name__}: {e}). "
                             f"Export it as .glb, .obj or .ply and try again") from e
    elif isinstance(mesh_or_path, trimesh.Scene):
        mesh = mesh_or_path.to_mesh() if hasattr(mesh_or_path, "to_mesh") else mesh_or_path.dump(concatenate=True)
    else:
        mesh = mesh_or_path
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{name}: holds no triangles (point clouds and empty scenes cannot be refined). "
                         f"Pass a triangle mesh")
    mesh = trimesh.Trimesh(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), process=False)
    if not np.isfinite(mesh.vertices).all():
        raise ValueError(f"{name}: has NaN or infinite vertex coordinates. Repair the mesh and try again")
    if float(np.ptp(mesh.bounds, axis=0).max()) <= 0 or mesh.area <= 0:
        raise ValueError(f"{name}: is degenerate (zero size or zero area). Pass a mesh with real surface")
    return mesh


def normalization(mesh, scale: float) -> tuple[np.ndarray, float]:
    """(centre, factor): normalised = (x - centre) * factor puts the bbox in [-scale, scale]^3."""
    lo, hi = mesh.bounds
    return (lo + hi) / 2.0, 2.0 * scale / float((hi - lo).max())


def sample_surface(mesh, n_uniform: int, n_sharp: int, rng: np.random.Generator, sharp_threshold: float = 0.985):
    """Uniform samples (points, face normals) and samples along sharp edges (points, vertex normals).

    Sharp edges as officially: a vertex is sharp when the cosine between its normal and one of its
    faces' normals is below the threshold; an edge is sharp when both ends are; samples are spread
    over sharp edges by length. A mesh without sharp edges gets uniform samples only (the official
    code divides by zero there)."""
    import trimesh

    # Meshes are loaded with process=False (the answer must keep the client's vertices), so STL files
    # and seam-split exports have one vertex per face corner: each vertex normal then equals its one
    # face's normal and no edge is ever sharp. Weld a copy for sampling only (faces keep their order).
    mesh = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    mesh.merge_vertices()
    pts, fid = trimesh.sample.sample_surface(mesh, n_uniform, seed=rng)
    uniform = np.concatenate([pts, mesh.face_normals[fid]], axis=1).astype(np.float32)
    V, F_, FN, VN = mesh.vertices, mesh.faces, mesh.face_normals, mesh.vertex_normals
    cos_min = np.ones(len(V))
    for i in range(3):
        np.minimum.at(cos_min, F_[:, i], np.sum(VN[F_[:, i]] * FN, axis=-1))
    sharp = cos_min < sharp_threshold
    a = np.concatenate([F_[:, 0], F_[:, 1], F_[:, 2]])
    b = np.concatenate([F_[:, 1], F_[:, 2], F_[:, 0]])
    keep = sharp[a] & sharp[b]
    a, b = a[keep], b[keep]
    length = np.linalg.norm(V[b] - V[a], axis=-1)
    if n_sharp == 0 or len(a) == 0 or length.sum() <= 0:
        return uniform, np.zeros((0, 6), dtype=np.float32)
    e = rng.choice(len(a), size=n_sharp, p=length / length.sum())
    w = rng.random((n_sharp, 1))
    p = w * V[a[e]] + (1 - w) * V[b[e]]
    n = w * VN[a[e]] + (1 - w) * VN[b[e]]
    return uniform, np.concatenate([p, n], axis=1).astype(np.float32)


def _area_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA along one axis as taps: (idx, weight), each (dst, k), output d =
    sum_j weight[d, j] * input[idx[d, j]]. Pixel-area averaging when shrinking; when enlarging,
    pixel replication with a linear blend across source-pixel borders. A pixel touches at most
    ceil(src / dst) + 1 source pixels, so this is a band, not a dense (dst, src) matrix (which for
    an 8192-px upload took ~8 GB and 100 s)."""
    k = 2 if dst >= src else int(np.ceil(src / dst)) + 1
    idx = np.zeros((dst, k), dtype=np.int64)
    wt = np.zeros((dst, k), dtype=np.float64)
    if dst >= src:
        scale, inv = src / dst, dst / src
        for d in range(dst):
            sx = int(np.floor(d * scale))
            f = (d + 1) - (sx + 1) * inv
            f = 0.0 if f <= 0 else f - np.floor(f)
            idx[d] = min(sx, src - 1), min(sx + 1, src - 1)
            wt[d] = 1 - f, f
    else:
        scale = src / dst
        for d in range(dst):
            a, b = d * scale, (d + 1) * scale
            for j, s_ in enumerate(range(int(np.floor(a)), min(int(np.ceil(b)), src))):
                idx[d, j] = s_
                wt[d, j] = (min(b, s_ + 1) - max(a, s_)) / scale
    return idx, wt


def _resize_area(img: np.ndarray, w: int, h: int, rows_per_chunk: int = 256) -> np.ndarray:
    """uint8 (H, W, C) -> (h, w, C), OpenCV INTER_AREA semantics (separable, rounded).

    Output rows are made in chunks so the intermediates stay ~100 MB at any input size."""
    H, W_, C = img.shape
    # float64 as before: float32 sums land on the other side of .5 for ~2% of pixels
    iy, wy = _area_taps(H, h)
    ix, wx = _area_taps(W_, w)
    out = np.empty((h, w, C), dtype=np.uint8)
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, h)
        t = np.zeros((r1 - r0, W_, C), dtype=np.float64)
        for j in range(iy.shape[1]):  # vertical pass: (rows, W, C)
            t += wy[r0:r1, j, None, None] * img[iy[r0:r1, j]]
        o = np.zeros((r1 - r0, w, C), dtype=np.float64)
        for j in range(ix.shape[1]):  # horizontal pass: (rows, w, C)
            o += wx[None, :, j, None] * t[:, ix[:, j]]
        out[r0:r1] = np.clip(np.round(o), 0, 255)
    return out


def preprocess_image(image, size: int = 1024, border_ratio: float = 0.15, name: str = "<image>"):
    """PIL image -> (image (1, 3, size, size) in [-1, 1], mask (1, 1, size, size) in {-1, 1}).

    Official ImageProcessorV2: crop to the alpha's bounding box, centre it in a square with
    `border_ratio` free border, composite on white, resize (area, then bicubic; nearest for the
    mask), with OpenCV's resampling conventions reimplemented in numpy/torch (no OpenCV needed;
    values agree up to rounding, see tests/ml/models/test_models_parity.py).
    An image without alpha goes through background removal (rembg) when it is installed."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"{name}: expected a PIL image, got {type(image).__name__}")
    if image.mode not in ("RGBA", "LA") and not (image.mode == "P" and "transparency" in image.info):
        try:
            from rembg import remove  # optional: heavy (onnxruntime + a model download)
        except ImportError:
            raise ValueError(f"{name}: has no alpha channel, so the object cannot be told from the background, "
                             f"and background removal (the 'rembg' package) is not installed. Save the view as "
                             f"an RGBA PNG with a transparent background, or `pip install rembg`") from None
        image = remove(image)
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[..., 3]
    # occupied rows and columns, not np.nonzero: that is two int64 arrays per opaque pixel (1 GB at 8192 px)
    ys, xs = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if len(ys) == 0:
        raise ValueError(f"{name}: the alpha channel is empty (fully transparent). Pass an image where the "
                         f"object is opaque")
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0, x1 - x0  # official off-by-one: the last row/column of the box is cut
    if h == 0 or w == 0:
        raise ValueError(f"{name}: the object is a single line of pixels. Pass a real view of the object")
    side = max(rgba.shape[:2])
    desired = int(side * (1 - border_ratio))
    scale = desired / max(h, w)
    h2, w2 = int(h * scale), int(w * scale)
    if h2 == 0 or w2 == 0:
        # the official preprocessing fails here too (OpenCV refuses a 0-pixel resize target)
        raise ValueError(f"{name}: the object is too thin after cropping: its {w}x{h}-pixel box becomes "
                         f"{w2}x{h2} pixels when fitted into the {desired}-pixel square. Pass a view where "
                         f"the object is at least a few pixels wide and high")
    crop = _resize_area(rgba[y0:y1, x0:x1], w2, h2)
    canvas = np.zeros((side, side, 4), dtype=np.uint8)
    oy, ox = (side - h2) // 2, (side - w2) // 2
    canvas[oy:oy + h2, ox:ox + w2] = crop
    m = canvas[..., 3:].astype(np.float32) / 255.0
    rgb = (canvas[..., :3] * m + 255.0 * (1 - m)).clip(0, 255).astype(np.uint8)
    mask = (m[..., 0] * 255).clip(0, 255).astype(np.uint8)
    # OpenCV's conventions (what the official uses): bicubic with a = -0.75 (= torch's bicubic),
    # nearest taking source pixel floor(i * src / dst)
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
    rgb = t.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    near = np.minimum((np.arange(size) * (side / size)).astype(np.int64), side - 1)
    mask = mask[near][:, near]
    img_t = torch.from_numpy(rgb.copy()).float().permute(2, 0, 1)[None] / 255.0 * 2 - 1
    mask_t = torch.from_numpy(mask.copy()).float()[None, None] / 255.0 * 2 - 1
    return img_t, mask_t


def load_image(path) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: image file not found. Pass an existing PNG (RGBA, transparent background) with --image")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{p}: not a readable image ({e}). Pass a PNG with a transparent background") from e
    return img


# ----------------------------------------------------------------------------- pipeline

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RefinePipeline:
    """Holds the three networks on one device; __call__ refines one mesh."""

    def __init__(self, models: UltraShapeModels, config: InferConfig, device: str | torch.device = "cpu"):
        self.models = models
        self.config = config
        self.device = torch.device(device)
        self.dtype = _DTYPES[config.refine.dtype] if self.device.type == "cuda" else torch.float32
        models.to(self.device, self.dtype)
        for m in models.parts().values():
            m.eval().requires_grad_(False)
        if config.refine.compile and self.device.type == "cuda":
            models.dit.compile_blocks()
        self.timings: dict[str, float] = {}
        self.last: dict[str, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike, config_path: str | os.PathLike,
                        device: str | torch.device = "cpu", base_ckpt: str | os.PathLike | None = None,
                        overrides: dict | None = None) -> "RefinePipeline":
        """Build from a YAML config (configs/infer_dit_refine*.yaml) and an official-layout checkpoint."""
        config = load_config(config_path, InferConfig, overrides)
        dev = torch.device(device)
        dtype = _DTYPES[config.refine.dtype] if dev.type == "cuda" else torch.float32
        # build without memory, then allocate straight in the target dtype/device and load strictly
        models = build_models(config.model, device="meta")
        models.to(dtype=dtype)
        materialize(models, dev)
        load_checkpoint(models, ckpt, base=base_ckpt)
        return cls(models, config, dev)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def __call__(self, image, mesh, steps: int | None = None, guidance: float | None = None,
                 octree_resolution: int | None = None, seed: int | None = None, progress: bool = False,
                 image_name: str = "<image>", mesh_name: str = "<mesh>"):
        """Refined trimesh.Trimesh in the input mesh's frame.

        image: PIL image or path (RGBA with transparent background preferred); mesh: trimesh.Trimesh,
        Scene or path. steps/guidance/octree_resolution/seed default to the config's refine settings."""
        import trimesh

        s = self.config.refine
        steps = s.steps if steps is None else int(steps)
        guidance = s.guidance if guidance is None else float(guidance)
        res = s.octree_resolution if octree_resolution is None else int(octree_resolution)
        seed = s.seed if seed is None else int(seed)
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        if res < 8:
            raise ValueError(f"octree_resolution must be >= 8, got {res}")
        vcfg = self.config.model.vae
        t0 = time.perf_counter()
        if isinstance(image, (str, os.PathLike)):
            image_name, image = str(image), load_image(image)
        if isinstance(mesh, (str, os.PathLike)):
            mesh_name = str(mesh)
        # the image first: it is the cheaper one to reject
        img, mask = preprocess_image(image, s.image_size, s.border_ratio, image_name)
        mesh = load_mesh(mesh)
        rng = np.random.default_rng(seed)
        centre, factor = normalization(mesh, s.normalize_scale)
        norm = trimesh.Trimesh((mesh.vertices - centre) * factor, mesh.faces, process=False)
        uniform, sharp = sample_surface(norm, s.num_uniform_points, s.num_sharp_points, rng, s.sharp_threshold)
        pts = torch.from_numpy(np.concatenate([uniform, sharp])[:, :3])[None]
        gen = torch.Generator().manual_seed(seed)
        _, voxel_idx = voxelize(pts, vcfg.num_latents, vcfg.voxel_query_res, gen)
        voxel_idx = voxel_idx.to(self.device)
        self._sync()
        t1 = time.perf_counter()

        m = self.models
        cond, cond_mask = m.conditioner(img.to(self.device), mask.to(self.device))
        cond = cond.to(self.dtype)
        uncond = m.conditioner.unconditional(cond)
        both = torch.cat([cond, uncond])
        both_mask = torch.cat([cond_mask, torch.ones_like(cond_mask)])
        if bool(cond_mask.all()):
            cond_mask = both_mask = None
        vox2 = torch.cat([voxel_idx, voxel_idx])
        self._sync()
        t2 = time.perf_counter()

        def velocity(x, t, branch, cache=None):
            x = x.to(self.dtype)  # t stays float32: the timestep embedding is computed in float32
            if branch == "both":
                args = (x, t, both, vox2, both_mask)
            else:
                c, cm = (cond, cond_mask) if branch == "cond" else (uncond, None)
                args = (x, t, c, voxel_idx, cm)
            if cache is None:  # no step caching (refine.cache_interval 1): the plain forward
                return m.dit(*args)
            v, cache.h = m.dit.forward_cached(*args, cache_depth=cache.depth, h_mid=cache.h)
            return v

        K = voxel_idx.shape[1]
        noise = torch.randn((1, K, vcfg.embed_dim), generator=gen).to(self.device)
        z = sample_euler(velocity, noise, steps=steps, guidance=guidance, batched_cfg=s.batched_cfg,
                         progress=progress, guidance_until=s.guidance_until, cache_interval=s.cache_interval,
                         cache_depth=s.cache_depth)
        self._sync()
        t3 = time.perf_counter()
        tokens = m.vae.decode(z.to(self.dtype))
        counts: list = []
        v, f = m.vae.to_mesh(tokens, octree_resolution=res, bounds=s.bounds, level=s.mc_level,
                             num_chunks=s.num_chunks, min_resolution=s.min_resolution, progress=progress,
                             flashvdm=s.flashvdm, query_counts=counts)
        self._sync()
        t4 = time.perf_counter()
        if f.shape[0] == 0:
            raise RuntimeError(f"{mesh_name}: the decoded occupancy has no surface (the model predicted an empty "
                               f"shape). With real weights this means the inputs are far off what it was "
                               f"trained on; check that the image shows the same object as the mesh")
        verts = v.double().cpu().numpy() / factor + centre  # back to the input mesh's frame
        # marching cubes already shares vertices between cells: no merge pass needed
        out = trimesh.Trimesh(verts, f.cpu().numpy(), process=False)
        t5 = time.perf_counter()
        # what went into the sampler, for benchmarks and debugging (a few MB)
        self.last = {"noise": noise, "voxel_idx": voxel_idx, "cond": cond, "cond_mask": cond_mask, "latents": z}
        self.timings = {"inputs_s": t1 - t0, "condition_s": t2 - t1, "sampling_s": t3 - t2,
                        "decode_s": t4 - t3, "export_s": t5 - t4, "total_s": t5 - t0, "tokens": K,
                        "queries": sum(n for _, n in counts)}
        return out


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ml.refine", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="official-layout checkpoint (ultrashape_v1.pt or one our trainer exported)")
    ap.add_argument("--base-ckpt", help="checkpoint to take parts missing from --ckpt from (e.g. the released one)")
    ap.add_argument("--random-tiny", action="store_true", help="no checkpoint: random weights (smoke tests only)")
    ap.add_argument("--config", default="configs/infer_dit_refine.yaml")
    ap.add_argument("--image", required=True, help="view of the object, RGBA PNG with transparent background")
    ap.add_argument("--mesh", required=True, help="coarse mesh (.glb/.obj/.ply/.stl/.off)")
    ap.add_argument("--out", required=True, help="refined mesh (.glb, .obj, .ply, ...)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--octree-resolution", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. refine.dtype=float32")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.random_tiny:
            import tempfile

            cfg = load_config(args.config, InferConfig, overrides)
            tmp = Path(tempfile.mkdtemp()) / "random.pt"
            write_random_checkpoint(cfg.model, tmp, seed=0)
            ckpt = tmp
        elif not args.ckpt:
            raise ValueError("--ckpt is required (or --random-tiny for a smoke test)")
        else:
            ckpt = args.ckpt
        pipe = RefinePipeline.from_checkpoint(ckpt, args.config, device=args.device, base_ckpt=args.base_ckpt,
                                              overrides=overrides)
        out = pipe(load_image(args.image), args.mesh, steps=args.steps, guidance=args.guidance,
                   octree_resolution=args.octree_resolution, seed=args.seed, progress=True,
                   image_name=args.image, mesh_name=args.mesh)
        outp = Path(args.out)
        outp.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = outp.with_name(outp.stem + ".partial" + outp.suffix)
        out.export(tmp_out)
        os.replace(tmp_out, outp)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = pipe.timings
    print(f"wrote {outp}: {len(out.vertices)} vertices, {len(out.faces)} faces, watertight={out.is_watertight}; "
          f"{t['tokens']} tokens; " + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k.endswith("_s")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
