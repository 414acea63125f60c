"""Regenerate the official reference data in this folder. Run OUTSIDE the project's environment.

This script is ours; it imports the official UltraShape 1.0 code from a checkout that is never part
of this repository, instantiates the official modules, and writes:
  {vae,dit,conditioner}_keys.json   full-size parameter names and shapes (built on the meta device)
  dit_tiny.pt, vae_tiny.pt, conditioner_tiny.pt, schedule.pt, preprocess.pt (+ preprocess_input.png)
                                    tiny official models' random weights, inputs and outputs (CPU, fp32)
tests/ml/models/test_models_parity.py loads those weights into our models and compares.

Environment used (a scratch venv, not the project's):
  python -m venv /work/.devcache/offvenv      # + a .pth pointing at the project venv's site-packages
  pip install --no-deps diffusers==0.30.0 omegaconf antlr4-python3-runtime==4.9.3 torchvision==0.28.0 \\
      transformers==4.37.2 tokenizers==0.15.2 huggingface_hub==0.24.6 torchdiffeq==0.2.5 \\
      opencv-python-headless                # transformers 4.37.2 and diffusers 0.30.0 = the official pins
  git -C <mirror> archive HEAD ultrashape configs | tar x -C /work/.devcache/official
  : > ultrashape/__init__.py; : > ultrashape/models/__init__.py; : > ultrashape/models/autoencoders/__init__.py
      (those package __init__s pull in the whole training stack; we import the modules directly)
  /work/.devcache/offvenv/bin/python tests/data/official/make_reference.py --official /work/.devcache/official

Stubs (modules the official files import but the compared code paths never call): flash_attn (only
the padded cross-attention path, which needs CUDA), cubvh (CUDA marching cubes), timm (imported,
unused), torchvision's C-op registration (its transforms are pure PyTorch and are used as is).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def install_stubs() -> None:
    import importlib.machinery

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def unavailable(*a, **k):
        raise RuntimeError("stubbed: not available on CPU")

    mod("flash_attn", flash_attn_varlen_func=unavailable)
    mod("cubvh", sparse_marching_cubes=unavailable)
    mod("timm")
    mod("timm.models")
    mod("timm.models.vision_transformer", PatchEmbed=None, Attention=None, Mlp=None)
    mod("torchvision._meta_registrations")


def shapes(sd: dict) -> dict:
    return {k: list(v.shape) for k, v in sd.items()}


def perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    """Norm weights start at exactly 1 and biases at 0; nudge every 1-D parameter (and DINOv2's
    tokens) so that a swapped or dropped mapping cannot hide behind an identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "token" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                    patch_size=14, image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0,
                    use_swiglu_ffn=False, qkv_bias=True, hidden_act="gelu")
DINOV2_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                   patch_size=14, image_size=56, layer_norm_eps=1e-6, layerscale_value=1.0)
DIT_TINY = dict(input_size=64, in_channels=8, hidden_size=48, context_dim=32, depth=5, num_heads=2,
                qk_norm=True, qk_norm_type="rms", qkv_bias=False, num_moe_layers=2, num_experts=4, moe_top_k=2)
VAE_TINY = dict(num_latents=64, embed_dim=8, width=32, heads=2, num_decoder_layers=1, num_encoder_layers=1,
                pc_size=1280, pc_sharpedge_size=0, point_feats=4, downsample_ratio=20, qkv_bias=False,
                qk_norm=True, num_freqs=8, include_pi=False, scale_factor=1.0039506158752403,
                geo_decoder_mlp_expand_ratio=4, geo_decoder_ln_post=True, enable_flashvdm=False,
                voxel_query=True, voxel_query_res=16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="checkout of PKU-YuanGroup/UltraShape-1.0 (patched inits)")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    install_stubs()
    sys.path.insert(0, args.official)
    import yaml
    from ultrashape.models.autoencoders.model import ShapeVAE
    from ultrashape.models.conditioner_mask import SingleImageEncoder
    from ultrashape.models.denoisers.dit_mask import RefineDiT
    from ultrashape.models.diffusion.transport.path import ICPlan
    from ultrashape.schedulers import FlowMatchEulerDiscreteScheduler

    out = Path(args.out)
    cfg = yaml.safe_load(open(Path(args.official) / "configs/infer_dit_refine.yaml"))["model"]["params"]

    # ---- 1. full-size key lists, on the meta device (no memory) ----
    with torch.device("meta"):
        dit = RefineDiT(**cfg["dit_cfg"]["params"])
        vae = ShapeVAE(**cfg["vae_config"]["params"])
        cond = SingleImageEncoder(main_image_encoder={"type": "DinoImageEncoder", "kwargs": {
            "config": DINOV2_LARGE, "image_size": 1022, "use_cls_token": True}}, drop_ratio=0.0)
    for name, m in (("dit", dit), ("vae", vae), ("conditioner", cond)):
        (out / f"{name}_keys.json").write_text(json.dumps(shapes(m.state_dict()), indent=0) + "\n")
        print(name, len(m.state_dict()), "keys", sum(int(np.prod(s)) for s in shapes(m.state_dict()).values()), "params")

    g = torch.Generator().manual_seed(1234)

    # ---- 2. tiny DiT: eval outputs, train outputs and gradients (MoE aux loss path) ----
    torch.manual_seed(0)
    dit = RefineDiT(**DIT_TINY)
    perturb(dit, g)
    B, N, S = 2, 40, 12
    x = torch.randn(B, N, 8, generator=g)
    t = torch.rand(B, generator=g)
    ctx = torch.randn(B, S, 32, generator=g)
    vox = torch.randint(0, 128, (B, N, 3), generator=g)
    dit.eval()
    with torch.no_grad():
        out_eval = dit(x, t, {"main": ctx}, voxel_cond=vox)
    dit.train()
    out_train = dit(x, t, {"main": ctx}, voxel_cond=vox)
    (out_train.pow(2).mean()).backward()
    grads = {k: p.grad.clone() for k, p in dit.named_parameters()
             if k in ("x_embedder.weight", "blocks.3.moe.gate.weight", "blocks.4.moe.experts.0.net.0.proj.weight",
                      "blocks.0.attn1.to_q.weight", "blocks.1.attn2.to_k.weight")}
    torch.save({"config": DIT_TINY, "state_dict": dit.state_dict(), "x": x, "t": t, "ctx": ctx, "voxel_idx": vox,
                "out_eval": out_eval, "out_train": out_train.detach(), "grads": grads}, out / "dit_tiny.pt")

    # ---- 3. tiny VAE: encoder (posterior mode), decoder tokens, occupancy logits ----
    torch.manual_seed(0)
    vae = ShapeVAE(**VAE_TINY)
    perturb(vae, g)
    vae.eval()
    P = VAE_TINY["pc_size"]  # = num_latents * downsample_ratio: the encoder keeps every point
    d = torch.randn(1, P, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    pts = 0.3 * d  # a small sphere: fewer occupied 16^3 voxels than num_latents, so all are kept
    normals = d
    label = torch.zeros(1, P, 1)
    surface = torch.cat([pts, normals, label], dim=-1)
    with torch.no_grad():
        mean, vidx = vae.encode(surface, sample_posterior=False, need_voxel=True)
        tokens = vae(mean)  # post_kl + transformer (what pipelines call after / scale_factor)
        queries = torch.rand(1, 500, 3, generator=g) * 2 - 1
        logits = vae.query(tokens, queries)
    torch.save({"config": VAE_TINY, "state_dict": vae.state_dict(), "surface": surface, "voxel_idx": vidx,
                "latent_mode": mean, "tokens": tokens, "queries": queries, "logits": logits}, out / "vae_tiny.pt")

    # ---- 4. tiny conditioner (DINOv2 via transformers 4.37.2): masked and unmasked ----
    torch.manual_seed(0)
    cond = SingleImageEncoder(main_image_encoder={"type": "DinoImageEncoder", "kwargs": {
        "config": DINOV2_TINY, "image_size": 112, "use_cls_token": True}}, drop_ratio=0.0)
    perturb(cond, g)
    image = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    mask = torch.full((2, 1, 128, 128), -1.0)
    mask[0, 0][((yy - 64) ** 2 + (xx - 60) ** 2) < 40 ** 2] = 1.0
    mask[1, 0][((yy - 50) ** 2 / 20 ** 2 + (xx - 70) ** 2 / 45 ** 2) < 1] = 1.0
    with torch.no_grad():
        masked = cond(image, mask=mask)["main"]
        plain = cond(image)["main"]
    torch.save({"dinov2_config": DINOV2_TINY, "image_size": 112, "state_dict": cond.state_dict(), "image": image,
                "mask": mask, "out_masked": masked, "out_plain": plain}, out / "conditioner_tiny.pt")

    # ---- 5. time convention: scheduler sigmas, an Euler+CFG run on a toy field, the training path ----
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    steps = 50
    sched.set_timesteps(steps, sigmas=np.linspace(0, 1, steps))
    x0 = torch.randn(1, 16, 4, generator=g)
    c = torch.randn(1, 16, 4, generator=g)

    def toy(xx, tt, cc):  # any smooth field that depends on x, t and the condition
        return torch.tanh(cc - xx) * (1.0 + tt.view(-1, 1, 1))

    lat = x0.clone()
    for tt in sched.timesteps:
        t01 = (tt.expand(2) / 1000.0)
        v = toy(torch.cat([lat, lat]), t01, torch.cat([c, torch.zeros_like(c)]))
        vc, vu = v.chunk(2)
        lat = sched.step(vu + 5.0 * (vc - vu), tt, lat).prev_sample
    t_tr = torch.rand(3, generator=g)
    a0, a1 = torch.randn(3, 16, 4, generator=g), torch.randn(3, 16, 4, generator=g)
    _, xt, ut = ICPlan().plan(t_tr, a0, a1)
    torch.save({"sigmas": sched.sigmas.clone(), "timesteps": sched.timesteps.clone(), "x0": x0, "c": c,
                "euler_cfg5_out": lat, "t": t_tr, "path_x0": a0, "path_x1": a1, "path_xt": xt, "path_ut": ut},
               out / "schedule.pt")
    # ---- 6. image preprocessing (ImageProcessorV2: alpha crop, 15 % border, white background, resize) ----
    from PIL import Image

    from ultrashape.preprocessors import ImageProcessorV2

    H, W = 180, 240
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb = np.stack([xx / W * 255, yy / H * 255, (xx + yy) % 97 / 97 * 255], -1)
    d = ((xx - 130) / 70) ** 2 + ((yy - 95) / 50) ** 2
    alpha = np.clip((1.15 - d) / 0.3, 0, 1) * 255  # a soft-edged ellipse
    rgba = np.concatenate([rgb, alpha[..., None]], -1).round().astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(out / "preprocess_input.png")
    o = ImageProcessorV2(size=256)(Image.open(out / "preprocess_input.png"))
    torch.save({"size": 256, "border_ratio": 0.15, "image": o["image"], "mask": o["mask"]}, out / "preprocess.pt")
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
