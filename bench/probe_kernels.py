"""Kernel probes behind the speed work: what a change could buy before it is built (one GPU, bf16).

    python bench/probe_kernels.py                 # H100: ~1 minute

1. MoE experts: a loop of per-expert matmuls (what ml.models.dit.MoE runs) against torch._grouped_mm, forward
   and backward, at the training (8,192 tokens, top-2) and refine (2 x 32,769 tokens) sizes.
2. fp8 (e4m3, row-wise scales) against bf16 for the DiT's linear shapes at the refine size, quantisation of the
   activation included: what an fp8 DiT could save.
3. SDPA backends at the refine and training self-attention sizes (forward; forward + backward for training).
4. The frozen encoders of a training step (ShapeVAE encode of 163,840 points, DINOv2-L at 1022 px), each alone.
Each section prints its own lines; a section that fails prints why and the others still run.
"""

from __future__ import annotations

import statistics
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16


def bench(fn, n=10, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)  # ms


def moe_probe():
    C, inner, E = 2048, 8192, 8
    w1 = torch.randn(E, C, inner, device=DEV, dtype=BF) * 0.02
    w2 = torch.randn(E, inner, C, device=DEV, dtype=BF) * 0.02
    w1.requires_grad_(True), w2.requires_grad_(True)
    for name, rows in (("train 8192x2", 8192 * 2), ("refine 2x32769x2", 2 * 32769 * 2)):
        counts = torch.full((E,), rows // E, dtype=torch.long)
        counts[0] += rows - int(counts.sum())
        x = torch.randn(rows, C, device=DEV, dtype=BF, requires_grad=True)
        offs = torch.cumsum(counts, 0).to(DEV, torch.int32)
        cl = counts.tolist()

        def loop():
            outs, s = [], 0
            for e, n in enumerate(cl):
                h = F.gelu(x[s:s + n] @ w1[e])
                outs.append(h @ w2[e])
                s += n
            return torch.cat(outs)

        def grouped():
            h = F.gelu(torch._grouped_mm(x, w1, offs=offs))
            return torch._grouped_mm(h, w2, offs=offs)

        with torch.no_grad():
            ref, got = loop(), grouped()
        err = (ref.float() - got.float()).abs().max().item() / ref.float().abs().max().item()
        for label, fn in (("loop", loop), ("grouped_mm", grouped)):
            f = bench(lambda: fn(), n=8)
            fb = bench(lambda: fn().float().square().mean().backward(), n=8)
            print(f"  moe {name:18s} {label:10s} fwd {f:7.2f} ms  fwd+bwd {fb:7.2f} ms", flush=True)
        print(f"  moe {name:18s} grouped vs loop max rel diff {err:.2e}", flush=True)


def fp8_probe():
    M = 2 * 32769
    shapes = {"qkv": (2048, 6144), "out": (2048, 2048), "fc1": (2048, 8192), "fc2": (8192, 2048)}
    tot_bf, tot_f8 = 0.0, 0.0
    for name, (K, N) in shapes.items():
        x = torch.randn(M, K, device=DEV, dtype=BF)
        w = torch.randn(N, K, device=DEV, dtype=BF) * 0.02
        wscale = w.float().abs().amax(dim=1, keepdim=True) / 448.0
        w8 = (w.float() / wscale).to(torch.float8_e4m3fn)
        t_bf = bench(lambda: F.linear(x, w))

        def f8():
            s = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
            x8 = (x.float() / s).to(torch.float8_e4m3fn)
            return torch._scaled_mm(x8, w8.t(), scale_a=s, scale_b=wscale.t(), out_dtype=BF)

        def f8_only():
            return torch._scaled_mm(x8, w8.t(), scale_a=s, scale_b=wscale.t(), out_dtype=BF)

        s = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        x8 = (x.float() / s).to(torch.float8_e4m3fn)
        ref = F.linear(x, w).float()
        err = ((f8().float() - ref).norm() / ref.norm()).item()
        t_f8, t_f8mm = bench(f8), bench(f8_only)
        tot_bf += t_bf
        tot_f8 += t_f8
        print(f"  fp8 {name:4s} M={M} K={K} N={N}: bf16 {t_bf:6.2f} ms ({2 * M * K * N / t_bf / 1e9:5.0f} TFLOP/s), "
              f"fp8 matmul {t_f8mm:6.2f} ms, fp8 + eager quantisation {t_f8:6.2f} ms, rel err {err:.2e}", flush=True)
    print(f"  fp8 one dense block's linears: bf16 {tot_bf:.2f} ms vs fp8+quant {tot_f8:.2f} ms", flush=True)


def sdpa_probe():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, B, T, grad in (("refine self 2x32769", 2, 32769, False), ("train self 1x8193", 1, 8193, True),
                             ("train cross 8193x5330", 1, None, True)):
        H, d = 16, 128
        q = torch.randn(B, H, T or 8193, d, device=DEV, dtype=BF, requires_grad=grad)
        S = 5330 if T is None else T
        k = torch.randn(B, H, S, d, device=DEV, dtype=BF, requires_grad=grad)
        v = torch.randn(B, H, S, d, device=DEV, dtype=BF, requires_grad=grad)
        flops = 4 * B * H * q.shape[2] * S * d
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    if grad:
                        f = bench(lambda: F.scaled_dot_product_attention(q, k, v), n=6)
                        fb = bench(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward(), n=6)
                        print(f"  sdpa {name:22s} {be.name:16s} fwd {f:7.2f} ms ({flops / f / 1e9:4.0f} TFLOP/s) "
                              f"bwd {fb - f:7.2f} ms ({2.5 * flops / (fb - f) / 1e9:4.0f} TFLOP/s)", flush=True)
                    else:
                        with torch.no_grad():
                            f = bench(lambda: F.scaled_dot_product_attention(q, k, v), n=4)
                        print(f"  sdpa {name:22s} {be.name:16s} fwd {f:7.2f} ms ({flops / f / 1e9:4.0f} TFLOP/s)",
                              flush=True)
            except Exception as e:  # a backend that refuses these sizes
                print(f"  sdpa {name:22s} {be.name:16s} unavailable: {str(e).splitlines()[0][:120]}", flush=True)


def encoder_probe():
    from ml.config import load_config
    from ml.models.checkpoint import build_models
    from ml.training.config import TrainConfig

    cfg = load_config("configs/train_dit_refine.yaml", TrainConfig, {"model.weights": None})
    torch.manual_seed(0)
    m = build_models(cfg.model.arch, device=DEV)
    vae = m.vae.to(BF).eval().requires_grad_(False)
    cond = m.conditioner.to(BF).eval().requires_grad_(False)
    n = cfg.data.pc_size
    d = torch.randn(1, n, 3)
    d = d / d.norm(dim=-1, keepdim=True)
    surface = torch.cat([d * 0.8, d, torch.zeros(1, n, 1)], dim=-1).to(DEV, BF)
    s = cfg.data.image_size
    img = torch.rand(1, 3, s, s, device=DEV, dtype=BF) * 2 - 1
    mask = torch.ones(1, 1, s, s, device=DEV, dtype=BF)
    from ml.models.vae import voxelize

    with torch.no_grad():
        t_vox = bench(lambda: voxelize(surface[..., :3], vae.cfg.num_latents, vae.cfg.voxel_query_res), n=8)
        _, vidx = voxelize(surface[..., :3], vae.cfg.num_latents, vae.cfg.voxel_query_res)
        t_enc = bench(lambda: vae.encode_tokens(surface, voxel_idx=vidx), n=8)
        t_all = bench(lambda: vae.encode(surface), n=8)
        t_dino = bench(lambda: cond(img, mask), n=8)
    print(f"  encoders: voxelize {t_vox:.2f} ms, VAE encode_tokens (given voxels) {t_enc:.2f} ms, VAE encode "
          f"(all) {t_all:.2f} ms, DINOv2-L {s}px {t_dino:.2f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
        vae.encode(surface)
        cond(img, mask)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)


def main() -> int:
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name, fn in (("moe", moe_probe), ("fp8", fp8_probe), ("sdpa", sdpa_probe), ("encoders", encoder_probe)):
        try:
            fn()
        except Exception:
            print(f"  {name}: FAILED\n" + traceback.format_exc()[-1500:], flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
