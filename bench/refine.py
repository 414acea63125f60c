"""Refine latency at the official sizes, random weights, bf16, one GPU.

    CUDA_VISIBLE_DEVICES=0 python bench/refine.py --out bench-refine.json       # H100: ~6 minutes
    python bench/refine.py --tiny --device cpu                                   # smoke test, seconds

Prints (and writes as JSON):
  1. DiT step time at 32,768 tokens with classifier-free guidance (batch 2 = cond + uncond), per
     attention backend, with and without torch.compile of every block (refine.compile), and the achieved
     TFLOP/s against the step's FLOP count (the floor: ~0.64 PFLOP a step, 57 % of it attention).
  2. End-to-end refine latency (50 steps, octree 1024) through ml.refine.RefinePipeline, split into
     inputs / conditioning / sampling / decoding / export.
  3. Speed-ups that change the numbers (fewer steps, guidance only early, DiT step caching, and a "fast"
     preset combining them, aimed at 20 s end to end): their time, and the distance of their result from
     the plain bf16 50-step result. Each variant also prints an H100 estimate from the README's measured
     figures (h100_estimate), which says before a GPU run which combinations can reach 20 s.

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


# Part 3's default variants: the fast preset first (a variant past --budget-s is skipped), fewer steps, guidance
# only early, DiT step caching (refine.cache_interval / cache_depth) alone and combined with guidance_until.
# On an H100 they sample for ~170 s together (h100_estimate), hence --budget-s 420.
DEFAULT_VARIANTS = "fast,16,10,16@0.5,50@0.3+c3d2,50+c3d2,50@0.3+c2d2,50+c2d2"

# GPU figures from the README models section (one H100 80GB, bf16, official sizes, 32,768 tokens). Used only for
# the printed estimates (h100_estimate); every timing the bench reports is measured on the machine it runs on.
H100_GUIDED_CALL_S = 1.34  # one DiT call with batched CFG (batch 2), zero-context skip on
H100_COND_CALL_S = 0.67  # a conditional-only call (batch 1): about half of a guided one
H100_DECODE_S = 9.6  # volume decoding + marching cubes, octree 1024, FlashVDM on
H100_INPUTS_COND_S = 3.5  # inputs (2.4 s) + conditioning (1.1 s)

# The fast preset, aimed at <= 20 s end to end on one H100. Estimate from the figures above (h100_estimate
# walks sample_euler's own schedule; a cached call costs 2d/21 = 4/21 = 0.190 of a full one at d = 2):
#   16 steps -> 15 DiT calls at t = i/15, i = 0..14; guidance while t < 0.3: i = 0..4 (5 guided, 10 cond-only)
#   full calls every 4th step, plus one where guidance stops (i = 5): guided full i = 0, 4 (2), guided cached
#   i = 1, 2, 3 (3); cond full i = 5, 8, 12 (3), cond cached i = 6, 7, 9, 10, 11, 13, 14 (7)
#   sampling = 2 x 1.34 + 3 x 1.34 x 0.190 + 3 x 0.67 + 7 x 0.67 x 0.190 = 2.68 + 0.77 + 2.01 + 0.89 = 6.35 s
#   end to end = 6.35 + 9.6 (decode) + 3.5 (inputs + conditioning) = 19.4 s (vs 65.7 + 13.1 = 78.8 s plain)
# The last cache_depth blocks are MoE blocks (3 expert FFNs a token instead of 1), so by FLOPs a cached call is
# ~0.20 of a full one rather than 0.19 (dit_flops); at 32k tokens attention dominates and the difference is small.
# The figures are on the safe side: the one measured 12-step run took 25.2 s end to end, where this gives 27.8 s.
# Whether its mesh is close enough to the plain one is what part 3 measures (with --ckpt: real Chamfer / F-score).
FAST_PRESET = "16@0.3+c4d2"


def parse_variant(spec: str) -> tuple[int, float, int, int]:
    """'steps[@guidance_until][+cINTERVAL[dDEPTH]]' or 'fast' -> (steps, guidance_until, cache_interval, cache_depth)."""
    import re

    m = re.fullmatch(r"(\d+)(?:@([0-9.]+))?(?:\+c(\d+)(?:d(\d+))?)?", FAST_PRESET if spec == "fast" else spec)
    if not m:
        raise SystemExit(f"--variants: cannot read {spec!r}; expected steps[@guidance_until][+cINTERVAL[dDEPTH]], "
                         f"e.g. 16, 16@0.5, 50+c2d2, 50@0.3+c3d2, or 'fast'")
    steps, until, k, d = m.groups()
    return int(steps), float(until) if until else 1.0, int(k) if k else 1, int(d) if d else 2


def h100_estimate(steps: int, until: float, interval: int, depth: int, n_blocks: int = 21,
                  guidance: float = 5.0) -> tuple[float, str]:
    """(seconds, arithmetic) of a variant's end-to-end time on one H100 at the official sizes, from the README
    figures above: sample_euler runs its real schedule with a velocity function that only adds up each call's
    cost (a cached call: 2 * depth / n_blocks of a full one)."""
    from ml.models.flow_matching import sample_euler

    n = {("both", "full"): 0, ("both", "cached"): 0, ("cond", "full"): 0, ("cond", "cached"): 0}

    def count(x, t, branch, cache=None):
        kind = "cached" if cache is not None and cache.h is not None else "full"
        n[("both" if branch == "both" else "cond", kind)] += 1
        if cache is not None and cache.h is None:
            cache.h = x  # stands for the kept deep state: the schedule only asks whether there is one
        return torch.zeros_like(x)

    sample_euler(count, torch.zeros(1, 1, 1), steps=steps, guidance=guidance, guidance_until=until,
                 cache_interval=interval, cache_depth=depth)
    frac = 2 * depth / n_blocks
    g, c = H100_GUIDED_CALL_S, H100_COND_CALL_S
    sampling = (n[("both", "full")] * g + n[("both", "cached")] * g * frac
                + n[("cond", "full")] * c + n[("cond", "cached")] * c * frac)
    total = sampling + H100_DECODE_S + H100_INPUTS_COND_S
    text = (f"{n[('both', 'full')]}x{g} + {n[('both', 'cached')]}x{g}x{frac:.3f} + {n[('cond', 'full')]}x{c} + "
            f"{n[('cond', 'cached')]}x{c}x{frac:.3f} = {sampling:.2f} s sampling + {H100_DECODE_S} + "
            f"{H100_INPUTS_COND_S} = {total:.1f} s")
    return total, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "infer_dit_refine.yaml"))
    ap.add_argument("--tiny", action="store_true", help="use configs/infer_dit_refine-tiny.yaml (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--octree", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3, help="timed DiT steps per variant (after 2 warm-ups)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip optional parts past this wall time")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="part 3: comma list of steps[@guidance_until][+cINTERVAL[dDEPTH]] (e.g. 50@0.3+c3d2: "
                         "guidance while t < 0.3, full DiT every 3rd step, cached steps run 2+2 blocks) or 'fast'")
    ap.add_argument("--logit-slope", type=float, default=200.0,
                    help="occupancy logit per unit of signed distance of the stand-in shape (sets the band width)")
    ap.add_argument("--ckpt", default=None, help="real weights (ultrashape_v1.pt): then the real occupancy field is "
                    "decoded (no stand-in shape) and part 3's Chamfer / F-score measure real quality")
    ap.add_argument("--parts", default="dit,e2e,variants,compile",
                    help="which parts to run: dit, e2e, e2efast (the fast preset end to end, then plain again warm), "
                         "variants, decode (decoding alone, flashvdm on/off), compile")
    ap.add_argument("--compile", action="store_true",
                    help="refine.compile: compile every DiT block before parts 2 and 3 (part 1 then times it too)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    specs = [s for s in args.variants.split(",") if s]
    for spec in specs:  # a typo fails here, not after the minutes parts 1 and 2 take
        parse_variant(spec)
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
    if args.compile:
        cfg.refine.compile = True
        models.dit.compile_blocks()
        with torch.no_grad():
            models.dit(x, tt, ctx, vox2)  # compile now, not inside the first timed call
            models.dit(x[:1], tt[:1], ctx[:1], vox2[:1])  # and the conditional-only shape
        res["compiled"] = True
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
        log(f"end to end [plain bf16, {args.steps} steps, octree {args.octree}]: {json.dumps(e2e['plain'])}")
        if "e2efast" in parts:
            # the fast preset through the whole pipeline (warm models, same inputs): measured, not estimated
            steps_f, until, interval, depth = parse_variant("fast")
            r = cfg.refine
            saved = (r.guidance_until, r.cache_interval, r.cache_depth)
            r.guidance_until, r.cache_interval, r.cache_depth = until, interval, depth
            with best_ctx():
                out_f = pipe(im, mesh, steps=steps_f, guidance=r.guidance, octree_resolution=args.octree, seed=42)
            r.guidance_until, r.cache_interval, r.cache_depth = saved
            e2e["fast"] = dict(pipe.timings, preset=FAST_PRESET, faces=len(out_f.faces),
                               watertight=bool(out_f.is_watertight))
            log(f"end to end [fast preset {FAST_PRESET}, octree {args.octree}, warm]: {json.dumps(e2e['fast'])}")
            with best_ctx():  # plain again, warm, so that its inputs/conditioning are not first-call figures
                pipe(im, mesh, steps=args.steps, guidance=cfg.refine.guidance, octree_resolution=args.octree, seed=42)
            e2e["plain_warm"] = dict(pipe.timings)
            log(f"end to end [plain bf16, {args.steps} steps, octree {args.octree}, warm]: "
                f"{json.dumps(e2e['plain_warm'])}")
        if not args.ckpt:
            del vae.geo_decoder.query_cached  # back to the real method
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

            def fn(xx, t, branch, cache=None):  # as ml/refine.py's velocity
                xx = xx.to(dtype)
                if branch == "both":
                    args = (xx, t, both, pv2, bmask)
                else:
                    args = (xx, t, cond if branch == "cond" else torch.zeros_like(cond), pv,
                            cmask if branch == "cond" else None)
                if cache is None:
                    return models.dit(*args)
                v, cache.h = models.dit.forward_cached(*args, cache_depth=cache.depth, h_mid=cache.h)
                return v

            def run(steps, until=1.0, interval=1, depth=2):
                sync(dev)
                a = time.perf_counter()
                z = sample_euler(fn, noise, steps=steps, guidance=cfg.refine.guidance, guidance_until=until,
                                 cache_interval=interval, cache_depth=depth)
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
            for spec in specs:
                if time.perf_counter() - t_start > args.budget_s:
                    log(f"budget reached: skipping variant {spec}")
                    continue
                steps, until, interval, depth = parse_variant(spec)
                z, t_s = run(steps, until, interval, depth)
                rel = ((z - z_ref).norm() / z_ref.norm()).item()
                ch, fs = chamfer_fscore(mesh_pts(z), p_ref)
                est = e2e["plain"]["total_s"] - e2e["plain"]["sampling_s"] + t_s
                h100, h100_text = h100_estimate(steps, until, interval, depth, guidance=cfg.refine.guidance)
                name = f"fast ({FAST_PRESET})" if spec == "fast" else spec
                var[name] = {"steps": steps, "guidance_until": until, "cache_interval": interval, "cache_depth": depth,
                             "sampling_s": t_s, "e2e_estimate_s": est, "latent_rel_l2": rel, "chamfer": ch,
                             "fscore_0.01": fs, "h100_estimate_s": h100}
                log(f"variant {name}: sampling {t_s:.2f} s -> end to end ~{est:.1f} s; latents rel L2 {rel:.3f}; "
                    f"random-field mesh vs plain: Chamfer {ch:.4f}, F@0.01 {fs:.3f}; H100 estimate "
                    f"(README figures) {h100_text}")

    res["variants"] = var

    # ---------------------------------------------------------------- 4. compile (exact)
    if "compile" in parts and dev.type == "cuda" and time.perf_counter() - t_start < args.budget_s:
        a = time.perf_counter()
        models.dit.compile_blocks()  # what refine.compile: true does
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
