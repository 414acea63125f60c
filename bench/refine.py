"""Refine latency at the official sizes, random weights, bf16, one GPU.

    CUDA_VISIBLE_DEVICES=0 python bench/refine.py --out bench-refine.json       # H100: ~3 minutes
    python bench/refine.py --tiny --device cpu                                   # smoke test, seconds

Prints (and writes as JSON):
  1. DiT step time at 32,768 tokens with classifier-free guidance (batch 2 = cond + uncond), per
     attention backend, with and without torch.compile of the q/k-norm + RoPE, and the achieved
     TFLOP/s against the step's FLOP count (the floor: ~0.64 PFLOP a step, 57 % of it attention).
  2. End-to-end refine latency (50 steps, octree 1024) through ml.refine.RefinePipeline, split into
     inputs / conditioning / sampling / decoding / export.
  3. Speed-ups that change the numbers (fewer steps, guidance only early): their time, and the
     distance of their result from the plain bf16 50-step result.

Random weights and the occupancy field. Every network runs at full size, so all timings of the DiT,
DINOv2 and the VAE are what the real weights cost. But a random VAE decoder's occupancy field changes
sign every few hundredths of a unit: at octree 1024 it would need ~1e8 near-surface queries where a
real shape needs ~1e7. So in part 2 the field handed to the coarse-to-fine decoder is the full random
decoder's output (computed at every query, so its cost is counted) scaled by 0.01, plus the occupancy
of a real-looking shape (a torus fused to a box; the coarse mesh given to the pipeline is that shape).
The query counts, marching-cubes work and output size are then those of a real shape.
In part 3 the distances are measured twice: on the final latents (relative L2) and on meshes decoded
from the pure random field at octree 128 (Chamfer distance and F-score at tau = 0.01, in the
normalised [-1, 1] frame). With random weights these only say how far the sampler's output moves;
with the released weights the same script measures what matters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.config import load_config  # noqa: E402
from ml.models import build_models  # noqa: E402
from ml.refine import InferConfig, RefinePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOVE = torch.tensor([120.0, -8.0, 45.0])  # where the coarse mesh sits in its own file


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def dit_flops(cfg, tokens: int, ctx: int, batch: int) -> float:
    """Forward FLOPs of one DiT call (2 per multiply-add)."""
    C, T = cfg.hidden_size, tokens + 1
    per_tok = 4 * 2 * C * C + 2 * 2 * C * C  # self q,k,v,o + cross q,o
    per_tok += 4 * T * C + 4 * ctx * C  # attention scores + weighted sums
    dense_ffn = 2 * 2 * C * 4 * C
    n_moe = cfg.num_moe_layers
    blocks = (cfg.depth - n_moe) * (per_tok + dense_ffn) + n_moe * (per_tok + (cfg.moe_top_k + 1) * dense_ffn)
    skips = (cfg.depth - cfg.depth // 2 - 1) * 2 * 2 * C * C
    kv_ctx = cfg.depth * 2 * 2 * ctx * cfg.context_dim * C / T  # per token share of context k/v projections
    return batch * T * (blocks + skips + kv_ctx)


def shape_sdf(p: torch.Tensor) -> torch.Tensor:
    """Signed distance (< 0 inside) of a torus fused to a box, in the normalised frame."""
    R, r = 0.55, 0.22
    q = torch.stack([p[..., [0, 2]].norm(dim=-1) - R, p[..., 1]], dim=-1)
    torus = q.norm(dim=-1) - r
    b = torch.tensor([0.35, 0.5, 0.35], device=p.device)
    d = (p - torch.tensor([0.0, 0.3, 0.0], device=p.device)).abs() - b
    box = d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)
    return torch.minimum(torus, box)


def shape_mesh():
    """The coarse input mesh: the same shape, meshed at 96^3 (with sharp box edges), moved to a
    non-normalised frame as a user's file would be."""
    import trimesh

    from ml.models.mesh_extract import marching_cubes

    R = 96
    ax = torch.linspace(-1, 1, R + 1)
    g = -shape_sdf(torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1))
    v, f = marching_cubes(g, 0.0)
    m = trimesh.Trimesh((v * 2 / R - 1).numpy(), f.numpy(), process=False)
    if m.volume < 0:
        m.invert()
    m.apply_scale(37.0)
    m.apply_translation(MOVE.numpy())
    return m


def sample_points(v: torch.Tensor, f: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    tri = v[f]
    area = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
    idx = torch.multinomial(area.float().cpu(), n, replacement=True, generator=g).to(v.device)
    u = torch.rand(n, 2, generator=g).to(v.device)
    flip = u.sum(-1) > 1
    u[flip] = 1 - u[flip]
    t = tri[idx]
    return t[:, 0] + u[:, :1] * (t[:, 1] - t[:, 0]) + u[:, 1:] * (t[:, 2] - t[:, 0])


def chamfer_fscore(a: torch.Tensor, b: torch.Tensor, tau: float = 0.01) -> tuple[float, float]:
    def nn(x, y):
        return torch.cat([torch.cdist(x[i:i + 4096], y).min(dim=1).values for i in range(0, len(x), 4096)])

    da, db = nn(a, b), nn(b, a)
    chamfer = (da.mean() + db.mean()).item() / 2
    p, r = (da < tau).float().mean().item(), (db < tau).float().mean().item()
    return chamfer, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "infer_dit_refine.yaml"))
    ap.add_argument("--tiny", action="store_true", help="use configs/infer_dit_refine-tiny.yaml (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--octree", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3, help="timed DiT steps per variant (after 2 warm-ups)")
    ap.add_argument("--budget-s", type=float, default=200, help="skip optional parts past this wall time")
    ap.add_argument("--variants", default="16,10,16@0.5", help="steps[@guidance_until] list for part 3")
    ap.add_argument("--logit-slope", type=float, default=200.0,
                    help="occupancy logit per unit of signed distance of the stand-in shape (sets the band width)")
    ap.add_argument("--ckpt", default=None, help="real weights (ultrashape_v1.pt): then the real occupancy field is "
                    "decoded (no stand-in shape) and part 3's Chamfer / F-score measure real quality")
    ap.add_argument("--parts", default="dit,e2e,variants,compile",
                    help="which parts to run: dit, e2e, variants, decode (decoding alone, flashvdm on/off), compile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    cfg_path = ROOT / "configs" / "infer_dit_refine-tiny.yaml" if args.tiny else Path(args.config)
    cfg = load_config(cfg_path, InferConfig)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.tiny:
        args.octree = min(args.octree, 64)
    res: dict = {"config": str(cfg_path), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "dtype": str(dtype)}
    log(json.dumps(res))

    t0 = time.perf_counter()
    torch.manual_seed(0)
    models = build_models(cfg.model, device=dev)
    if args.ckpt:
        from ml.models import load_checkpoint

        load_checkpoint(models, args.ckpt)
    models.to(dtype=dtype)
    for m in models.parts().values():
        m.eval().requires_grad_(False)
    sync(dev)
    res["build_s"] = time.perf_counter() - t0
    log(f"built random models in {res['build_s']:.1f} s")

    # ---------------------------------------------------------------- 1. DiT step
    dcfg = cfg.model.dit
    N = cfg.model.vae.num_latents
    S = cfg.model.conditioner.num_tokens
    R = cfg.model.vae.voxel_query_res
    g = torch.Generator().manual_seed(0)
    lin = torch.randperm(R ** 3, generator=g)[:N]
    vox = torch.stack([lin // (R * R), (lin // R) % R, lin % R], -1)[None].to(dev)
    x = torch.randn(2, N, dcfg.in_channels, generator=g).to(dev, dtype)
    ctx = torch.cat([torch.randn(1, S, dcfg.context_dim, generator=g), torch.zeros(1, S, dcfg.context_dim)]).to(dev, dtype)
    tt = torch.full((2,), 0.5, device=dev, dtype=dtype)
    vox2 = torch.cat([vox, vox])
    flops = dit_flops(dcfg, N, S, 2)
    res["dit_step_tflop"] = flops / 1e12
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if dev.type != "cuda":
        backends = {"default": None}

    def time_step(label):
        times = []
        with torch.no_grad():
            for i in range(2 + args.iters):
                sync(dev)
                a = time.perf_counter()
                models.dit(x, tt, ctx, vox2)
                sync(dev)
                if i >= 2:
                    times.append(time.perf_counter() - a)
        med = statistics.median(times)
        log(f"DiT step [{label}] {N} tokens x2 (CFG): median {med:.3f} s over {len(times)} "
            f"({flops / med / 1e12:.0f} TFLOP/s); all {[round(t, 3) for t in times]}")
        return med

    parts = set(args.parts.split(","))
    steps_t = {}
    for name, be in (backends.items() if "dit" in parts else []):
        try:
            if be is None:
                steps_t[name] = time_step(name)
            else:
                with sdpa_kernel([be]):
                    steps_t[name] = time_step(name)
        except Exception as e:  # noqa: BLE001 -- a backend may not support these shapes here
            log(f"DiT step [{name}] unavailable: {type(e).__name__}: {str(e)[:200]}")
    best = min(steps_t, key=steps_t.get) if steps_t else "default"
    res["dit_step_s"] = steps_t
    res["best_backend"] = best
    best_ctx = (lambda: sdpa_kernel([backends[best]])) if backends.get(best) is not None else (lambda: torch.no_grad())

    # ---------------------------------------------------------------- 2. end to end
    import trimesh
    from PIL import Image, ImageDraw

    mesh = shape_mesh()
    im = Image.new("RGBA", (768, 768), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((150, 250, 620, 560), fill=(180, 140, 90, 255))
    ImageDraw.Draw(im).rectangle((280, 120, 480, 420), fill=(120, 120, 140, 255))
    cfg.refine.octree_resolution = args.octree
    pipe = RefinePipeline(models, cfg, dev)
    vae = models.vae
    raw_query = vae.geo_decoder.query_cached

    from ml.refine import normalization

    centre, factor = normalization(mesh, cfg.refine.normalize_scale)
    centre_t = torch.tensor(centre, device=dev, dtype=torch.float32)

    def real_shape_query(points, k, v, topk=None):
        # full random decoder cost at every query, plus the input shape's occupancy (see module doc):
        # model frame -> input frame -> the shape's own frame (shape_mesh scales by 37, moves by MOVE)
        p_shape = (points.float() / factor + centre_t - MOVE.to(dev)) / 37.0
        return raw_query(points, k, v, topk) * 0.01 + (-shape_sdf(p_shape) * args.logit_slope).to(k.dtype)

    if not args.ckpt:
        vae.geo_decoder.query_cached = real_shape_query
    e2e: dict = {}
    if "decode" in parts:
        # decoding alone: random latents through the full decoder, stand-in shape field (module doc)
        with torch.no_grad():
            z = torch.randn(1, N, dcfg.in_channels, generator=torch.Generator().manual_seed(3)).to(dev)
            for fv in (True, False):
                counts: list = []
                sync(dev)
                a = time.perf_counter()
                tokens = vae.decode(z.to(dtype))
                v, f = vae.to_mesh(tokens, octree_resolution=args.octree, bounds=1.0, flashvdm=fv,
                                   num_chunks=cfg.refine.num_chunks, query_counts=counts)
                sync(dev)
                e2e[f"decode_flashvdm_{fv}"] = {"decode_s": time.perf_counter() - a, "faces": int(f.shape[0]),
                                               "queries": counts}
                log(f"decode octree {args.octree} flashvdm={fv}: {json.dumps(e2e[f'decode_flashvdm_{fv}'])}")
                if time.perf_counter() - t_start > args.budget_s:
                    break
    if "e2e" in parts:
        with best_ctx():
            out = pipe(im, mesh, steps=args.steps, guidance=cfg.refine.guidance, octree_resolution=args.octree, seed=42)
        e2e["plain"] = dict(pipe.timings)
        e2e["plain"].update(faces=len(out.faces), watertight=bool(out.is_watertight))
        if not args.ckpt:
            del vae.geo_decoder.query_cached  # back to the real method
        log(f"end to end [plain bf16, {args.steps} steps, octree {args.octree}]: {json.dumps(e2e['plain'])}")
        # the mesh comes back in the input frame, around the input
        res["e2e_bbox_err"] = float(np.abs(out.bounds - mesh.bounds).max() / np.ptp(mesh.bounds, axis=0).max())
        log(f"output bbox vs input bbox (relative): {res['e2e_bbox_err']:.4f}")
    res["e2e"] = e2e
    var: dict = {}
    if "e2e" in parts and "variants" in parts:
        # ---------------------------------------------------------------- 3. speed-ups that change numbers
        # same conditioning, tokens and noise as a fresh plain run; compare latents and random-field meshes
        from ml.models.flow_matching import sample_euler

        last = pipe.last
        with torch.no_grad(), best_ctx():
            cond, cmask = last["cond"], last["cond_mask"]
            both = torch.cat([cond, torch.zeros_like(cond)])
            bmask = None if cmask is None else torch.cat([cmask, torch.ones_like(cmask)])
            pv = last["voxel_idx"]
            pv2 = torch.cat([pv, pv])
            noise = last["noise"]

            def fn(xx, t, branch):
                xx = xx.to(dtype)
                if branch == "both":
                    return models.dit(xx, t, both, pv2, bmask)
                return models.dit(xx, t, cond if branch == "cond" else torch.zeros_like(cond), pv,
                                  cmask if branch == "cond" else None)

            def run(steps, until=1.0):
                sync(dev)
                a = time.perf_counter()
                z = sample_euler(fn, noise, steps=steps, guidance=cfg.refine.guidance, guidance_until=until)
                sync(dev)
                return z, time.perf_counter() - a

            def mesh_pts(z):
                tokens = vae.decode(z.to(dtype))
                res_cmp = 32 if args.tiny else (args.octree if args.ckpt else 128)
                v, f = vae.to_mesh(tokens, octree_resolution=res_cmp, bounds=1.0, flashvdm=cfg.refine.flashvdm)
                return sample_points(v.float(), f, 50_000, torch.Generator().manual_seed(0))

            z_ref, t_ref = last["latents"], e2e["plain"]["sampling_s"]
            p_ref = mesh_pts(z_ref)
            var = {"plain": {"sampling_s": t_ref}}
            for spec in [s for s in args.variants.split(",") if s]:
                if time.perf_counter() - t_start > args.budget_s:
                    log(f"budget reached: skipping variant {spec}")
                    continue
                steps, _, until = spec.partition("@")
                z, t_s = run(int(steps), float(until) if until else 1.0)
                rel = ((z - z_ref).norm() / z_ref.norm()).item()
                ch, fs = chamfer_fscore(mesh_pts(z), p_ref)
                est = e2e["plain"]["total_s"] - e2e["plain"]["sampling_s"] + t_s
                var[spec] = {"sampling_s": t_s, "e2e_estimate_s": est, "latent_rel_l2": rel, "chamfer": ch, "fscore_0.01": fs}
                log(f"variant {spec}: sampling {t_s:.2f} s -> end to end ~{est:.1f} s; latents rel L2 {rel:.3f}; "
                    f"random-field mesh vs plain: Chamfer {ch:.4f}, F@0.01 {fs:.3f}")

    res["variants"] = var

    # ---------------------------------------------------------------- 4. compile (exact)
    if "compile" in parts and dev.type == "cuda" and time.perf_counter() - t_start < args.budget_s:
        a = time.perf_counter()
        models.dit.compile_kernels()
        with best_ctx():
            with torch.no_grad():
                models.dit(x, tt, ctx, vox2)
        sync(dev)
        res["compile_s"] = time.perf_counter() - a
        with best_ctx():
            res["dit_step_s"][best + "+compile"] = time_step(best + "+compile")
    res["wall_s"] = time.perf_counter() - t_start
    log(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
