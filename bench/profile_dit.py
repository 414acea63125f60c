"""Where the RefineDiT's training forward + backward spends its time, at the official sizes.

    python bench/profile_dit.py --out /tmp/prof                     # GPU: timings + torch.profiler tables
    python bench/profile_dit.py --config configs/train_dit_refine-tiny.yaml --tokens 64 --image-tokens 16 --out /tmp/p

What it runs: the DiT alone (random weights, 8,192 latent tokens + the timestep token, 5,330 image tokens,
batch 1), the flow-matching loss and its backward, in the precision the trainer uses (fp32 weights under bf16
autocast; `--bf16-weights` for bf16 weights). It prints the median forward and backward times (device
events), then each sub-module's forward and backward alone (one dense block, one MoE block, and their
attention / MLP / MoE parts), and writes torch.profiler's kernel table (by self device time) under --out.
The encoders and the optimizer are bench/train_step.py's business.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ml.config import load_config  # noqa: E402
from ml.training.config import TrainConfig  # noqa: E402


def timed(fn, n: int, warmup: int, cuda: bool) -> float:
    """Median seconds of fn() over n runs after warmup runs (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fwd_bwd_times(module_fwd, inputs_fn, n, warmup, cuda, autocast_ctx):
    """(forward s, backward s) of module_fwd(*inputs) with a random-projection loss."""
    def fwd():
        with autocast_ctx():
            return module_fwd(*inputs_fn())

    def fb():
        with autocast_ctx():
            out = module_fwd(*inputs_fn())
        out.float().square().mean().backward()

    f = timed(fwd, n, warmup, cuda)
    total = timed(fb, n, warmup, cuda)
    return f, total - f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train_dit_refine.yaml")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--image-tokens", type=int, default=5330)
    ap.add_argument("--bf16-weights", action="store_true", help="bf16 parameters instead of fp32 + autocast")
    ap.add_argument("--compile", choices=["none", "blocks", "dense"], default="none",
                    help="torch.compile every block (blocks) or only the 15 dense ones (dense: the MoE blocks' "
                         "host-synced dispatch stays eager)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-parts", action="store_true", help="skip the per-module timings")
    ap.add_argument("--no-profile", action="store_true", help="skip torch.profiler")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or ("bf16" if args.bf16_weights else "autocast") + ("" if args.compile == "none" else f"-compile-{args.compile}")

    cfg = load_config(args.config, TrainConfig, {})
    from ml.models.dit import RefineDiT

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    torch.manual_seed(0)
    with torch.device(dev):
        dit = RefineDiT(cfg.model.arch.dit)
    if args.bf16_weights:
        dit = dit.to(torch.bfloat16)
    if args.compile != "none":
        torch._dynamo.config.cache_size_limit = 64  # 21 block instances share the code; never fall back to eager
        for b in dit.blocks:
            if args.compile == "blocks" or not b.use_moe:
                b.compile(dynamic=False)
    dit.train()
    wdt = next(dit.parameters()).dtype
    amp = nullcontext if args.bf16_weights else (lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
    dc = cfg.model.arch.dit
    N, S = args.tokens, args.image_tokens
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, N, dc.in_channels, device=dev, generator=g).to(wdt)
    vidx = torch.randperm(128**3, device=dev, generator=g)[:N]
    vidx = torch.stack([vidx // 128**2, (vidx // 128) % 128, vidx % 128], -1)[None]
    cond = torch.randn(1, S, dc.context_dim, device=dev, generator=g).to(wdt)
    t = torch.rand(1, device=dev, generator=g).to(wdt)
    target = torch.randn(1, N, dc.in_channels, device=dev, generator=g)

    def fwd():
        with amp():
            return F.mse_loss(dit(x, t, cond, vidx).float(), target)

    def step():
        fwd().backward()

    res = {"label": label, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "tokens": N, "image_tokens": S, "weights": str(wdt)}
    f = timed(fwd, args.steps, 2, cuda)
    fb = timed(step, args.steps, 2, cuda)
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        fwd()
    flops = fc.get_total_flops()
    res.update(fwd_s=f, bwd_s=fb - f, fwd_bwd_s=fb, fwd_tflop=flops / 1e12,
               tflops_per_s=3 * flops / fb / 1e12, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    print(f"[{label}] DiT fwd {f:.4f} s + bwd {fb - f:.4f} s = {fb:.4f} s; {3 * flops / fb / 1e12:.0f} TFLOP/s "
          f"({3 * flops / 1e12:.1f} TFLOP)", flush=True)

    if not args.no_parts:
        # Each part alone, on the hidden states it would see (random, with grad), fp32 weights under autocast.
        C = dc.hidden_size
        hd = dc.head_dim
        from ml.models.dit import rope_tables

        # the tables RefineDiT.forward builds: in q/k's dtype (bf16 under autocast)
        cos, sin = rope_tables(vidx, hd, dc.rope_theta, torch.bfloat16)
        h0 = torch.randn(1, N + 1, C, device=dev, dtype=wdt, requires_grad=True)
        h1 = torch.randn(1, N + 1, C, device=dev, dtype=wdt, requires_grad=True)
        dense, moe = dit.blocks[0], dit.blocks[-1]
        parts = {
            "dense block": (lambda h: dense(h, cond, None, cos, sin), lambda: (h0,)),
            "moe block (+skip)": (lambda h, s: moe(h, cond, None, cos, sin, skip=s), lambda: (h0, h1)),
            "self-attention": (lambda h: dense.attn1(h, cos, sin), lambda: (h0,)),
            "cross-attention": (lambda h: dense.attn2(h, cond, None), lambda: (h0,)),
            "mlp": (lambda h: dense.mlp(h), lambda: (h0,)),
            "moe": (lambda h: moe.moe(h), lambda: (h0,)),
            "layernorm": (lambda h: dense.norm1(h), lambda: (h0,)),
        }
        res["parts"] = {}
        for name, (fn, inp) in parts.items():
            pf, pb = fwd_bwd_times(fn, inp, args.steps, 2, cuda, amp)
            res["parts"][name] = {"fwd_s": pf, "bwd_s": pb}
            print(f"  {name:20s} fwd {pf * 1e3:8.2f} ms  bwd {pb * 1e3:8.2f} ms  bwd/fwd {pb / max(pf, 1e-9):.2f}",
                  flush=True)

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=True) as prof:
            for _ in range(2):
                step()
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
        shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=30,
                                                                     max_name_column_width=50, max_shapes_column_width=70)
        (out / f"profile_{label}.txt").write_text(table + "\n\n" + shapes)
        print(table[:6000], flush=True)
    with open(out / "profile_dit.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
