"""Numerical parity with the official UltraShape modules (reference data in tests/data/official/).

The references were produced by tests/data/official/make_reference.py, which runs the official
modules (outside this project, transformers 4.37.2 as officially pinned) on random weights at tiny
sizes on CPU in float32. Here we load the very same weights into our models, strictly, feed the same
inputs and compare. Tolerances are float32 rounding plus, for the conditioner, the difference between
torchvision's and our resize of the same tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.models import (
    ConditionerConfig,
    ImageConditioner,
    RefineDiT,
    RefineDiTConfig,
    ShapeVAE,
    ShapeVAEConfig,
    euler_sigmas,
    interpolate,
    load_part,
    sample_euler,
)

REF = Path(__file__).resolve().parents[2] / "data" / "official"
pytestmark = pytest.mark.unit


def ref(name):
    return torch.load(REF / name, map_location="cpu", weights_only=True)


def tiny_dit(c) -> RefineDiT:
    return RefineDiT(RefineDiTConfig(
        in_channels=c["in_channels"], hidden_size=c["hidden_size"], context_dim=c["context_dim"], depth=c["depth"],
        num_heads=c["num_heads"], qkv_bias=c["qkv_bias"], qk_norm=c["qk_norm"], num_moe_layers=c["num_moe_layers"],
        num_experts=c["num_experts"], moe_top_k=c["moe_top_k"]))


def close(a, b, atol, rtol=1e-4):
    err = (a.float() - b.float()).abs().max().item()
    print(f"max abs error {err:.3g}")
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), f"max abs error {err:.3g}"
    return err


def test_dit_matches_official_eval_and_train():
    r = ref("dit_tiny.pt")
    dit = tiny_dit(r["config"])
    load_part(dit, r["state_dict"], "dit", "dit_tiny.pt")
    dit.eval()
    with torch.no_grad():
        out = dit(r["x"], r["t"], r["ctx"], r["voxel_idx"])
    close(out, r["out_eval"], atol=2e-5)
    # training mode: the MoE takes the official training route, and its aux loss feeds the gradient
    dit.train()
    out = dit(r["x"], r["t"], r["ctx"], r["voxel_idx"])
    close(out.detach(), r["out_train"], atol=2e-5)
    out.pow(2).mean().backward()
    params = dict(dit.named_parameters())
    for k, g in r["grads"].items():
        close(params[k].grad, g, atol=1e-6, rtol=1e-3)
    assert dit.moe_aux_loss() is not None and dit.moe_aux_loss().item() > 0


def test_dit_interleaved_heads_matter():
    """Guard against a 'plain split' regression: permuting heads the obvious way changes the output."""
    r = ref("dit_tiny.pt")
    dit = tiny_dit(r["config"])
    load_part(dit, r["state_dict"], "dit", "dit_tiny.pt")
    dit.eval()
    import ml.models.dit as dm

    orig = dm._interleaved_heads
    try:
        def plain(parts, H):
            B, T, C = parts[0].shape
            return [p.view(B, T, H, C // H).transpose(1, 2) for p in parts]
        dm._interleaved_heads = plain
        with torch.no_grad():
            out = dit(r["x"], r["t"], r["ctx"], r["voxel_idx"])
    finally:
        dm._interleaved_heads = orig
    assert (out - r["out_eval"]).abs().max() > 1e-3


def test_vae_matches_official():
    r = ref("vae_tiny.pt")
    c = r["config"]
    vae = ShapeVAE(ShapeVAEConfig(
        num_latents=c["num_latents"], embed_dim=c["embed_dim"], width=c["width"], heads=c["heads"],
        num_encoder_layers=c["num_encoder_layers"], num_decoder_layers=c["num_decoder_layers"],
        point_feats=c["point_feats"], downsample_ratio=c["downsample_ratio"], qkv_bias=c["qkv_bias"],
        qk_norm=c["qk_norm"], num_freqs=c["num_freqs"], include_pi=c["include_pi"], scale_factor=c["scale_factor"],
        geo_decoder_mlp_expand_ratio=c["geo_decoder_mlp_expand_ratio"], geo_decoder_ln_post=c["geo_decoder_ln_post"],
        voxel_query_res=c["voxel_query_res"]))
    load_part(vae, r["state_dict"], "vae", "vae_tiny.pt")
    vae.eval()
    with torch.no_grad():
        # all occupied voxels are kept (fewer than num_latents), in the official's random order
        z, vidx = vae.encode(r["surface"], sample_posterior=False, voxel_idx=r["voxel_idx"])
        close(z / c["scale_factor"], r["latent_mode"], atol=2e-5)
        tokens = vae.decode(r["latent_mode"] * c["scale_factor"])
        close(tokens, r["tokens"], atol=5e-5)
        close(vae.query(r["tokens"], r["queries"]), r["logits"], atol=2e-5)
        # our voxeliser finds the same occupied set as the official one
        _, mine = vae.encode(r["surface"], sample_posterior=False)
    # our voxeliser draws from the same occupied set, as many as the official keeps
    as_set = lambda v: {tuple(x) for x in v[0].tolist()}  # noqa: E731
    occupied = as_set(((r["surface"][..., :3] + 1) / 2 * c["voxel_query_res"]).floor().long())
    assert len(as_set(mine)) == len(as_set(r["voxel_idx"])) == min(len(occupied), c["num_latents"])
    assert as_set(mine) <= occupied and as_set(r["voxel_idx"]) <= occupied


def _tiny_conditioner(r) -> ImageConditioner:
    d = r["dinov2_config"]
    cond = ImageConditioner(ConditionerConfig(
        hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"], intermediate_size=d["hidden_size"] * d["mlp_ratio"],
        patch_size=d["patch_size"], pretrain_image_size=d["image_size"], image_size=r["image_size"]))
    load_part(cond, r["state_dict"], "conditioner", "conditioner_tiny.pt")
    return cond.eval()


def test_conditioner_matches_official_transformers_437():
    r = ref("conditioner_tiny.pt")
    cond = _tiny_conditioner(r)
    with torch.no_grad():
        plain, keep = cond(r["image"])
        assert keep.all()
        close(plain, r["out_plain"], atol=2e-4, rtol=1e-3)
        masked, keep = cond(r["image"], r["mask"])
    assert masked.shape == r["out_masked"].shape
    # padding rows are -1 exactly where the official has them
    pad_ref = (r["out_masked"] == -1).all(-1)
    assert torch.equal(~keep, pad_ref)
    close(masked, r["out_masked"], atol=2e-4, rtol=1e-3)


def test_schedule_and_paths_match_official():
    r = ref("schedule.pt")
    steps = len(r["timesteps"])
    sig = euler_sigmas(steps)
    close(sig, r["sigmas"], atol=1e-7)
    assert torch.allclose(r["timesteps"] / 1000.0, sig[:-1])

    def toy(x, t, c):
        return torch.tanh(c - x) * (1.0 + t.view(-1, 1, 1))

    c = r["c"]

    def cond_fn(x, t, branch):
        cc = torch.cat([c, torch.zeros_like(c)]) if branch == "both" else (c if branch == "cond" else 0 * c)
        return toy(x, t, cc)

    for batched in (True, False):
        out = sample_euler(cond_fn, r["x0"], steps=steps, guidance=5.0, batched_cfg=batched)
        close(out, r["euler_cfg5_out"], atol=1e-5)
    xt, ut = interpolate(r["path_x0"], r["path_x1"], r["t"])
    close(xt, r["path_xt"], atol=1e-6)
    close(ut, r["path_ut"], atol=1e-6)


def test_image_preprocessing_close_to_official():
    """Same geometry as ImageProcessorV2 (crop box, border, centring, white background); pixel values
    differ only by PIL's vs OpenCV's resampling filters."""
    from PIL import Image

    from ml.refine import preprocess_image

    r = ref("preprocess.pt")
    img, mask = preprocess_image(Image.open(REF / "preprocess_input.png"), r["size"], r["border_ratio"])
    assert img.shape == r["image"].shape and mask.shape == r["mask"].shape
    agree = ((mask > 0) == (r["mask"] > 0)).float().mean().item()
    diff = (img - r["image"]).abs()
    print(f"mask agreement {agree:.4f}; image mean abs diff {diff.mean():.4f}, max {diff.max():.3f} (range [-1, 1])")
    assert agree > 0.99
    assert diff.mean() < 0.02
