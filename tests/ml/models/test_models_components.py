"""Behaviour of the pieces: voxel tokens, masking, CFG drop, MoE routing, flow matching, meshing."""

from __future__ import annotations

import math

import pytest
import torch

from ml.models import (
    ConditionerConfig,
    ImageConditioner,
    RefineDiT,
    RefineDiTConfig,
    ShapeVAE,
    ShapeVAEConfig,
    flow_matching_loss,
    interpolate,
    sample_euler,
    voxelize,
)
from ml.models.mesh_extract import decode_volume, marching_cubes

pytestmark = pytest.mark.unit

TINY_DIT = RefineDiTConfig(in_channels=8, hidden_size=48, context_dim=32, depth=5, num_heads=2,
                           num_moe_layers=2, num_experts=4)


def _dit(seed=0):
    torch.manual_seed(seed)
    return RefineDiT(TINY_DIT).eval()


def test_fewer_voxels_than_tokens():
    """A shape occupying fewer voxels than num_latents gets fewer tokens, and everything downstream
    (encoder, DiT, decoder) runs at that count (the official pipeline crashes here)."""
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(1, 3000, 3, generator=g) * 0.1  # a tiny blob: a handful of 32^3 voxels
    cent, vidx = voxelize(pts, max_tokens=512, resolution=32, generator=g)
    K = vidx.shape[1]
    assert 0 < K < 512 and cent.shape == (1, K, 3)
    assert len({tuple(v) for v in vidx[0].tolist()}) == K  # unique voxels
    torch.manual_seed(0)
    vae = ShapeVAE(ShapeVAEConfig(num_latents=512, embed_dim=8, width=32, heads=2, num_encoder_layers=1,
                                  num_decoder_layers=1, voxel_query_res=32)).eval()
    surface = torch.cat([pts, torch.randn(1, 3000, 3), torch.zeros(1, 3000, 1)], dim=-1)
    with torch.no_grad():
        z, vidx2 = vae.encode(surface, generator=torch.Generator().manual_seed(1))
        assert z.shape == (1, vidx2.shape[1], 8) and vidx2.shape[1] < 512
        v = _dit()(z, torch.rand(1), torch.randn(1, 5, 32), vidx2)
        assert v.shape == z.shape and torch.isfinite(v).all()
        assert vae.decode(z).shape == (1, vidx2.shape[1], 32)


def test_voxelize_batch_uses_the_smallest_count():
    g = torch.Generator().manual_seed(0)
    big = torch.rand(1, 4000, 3, generator=g) * 2 - 1
    small = torch.rand(1, 4000, 3, generator=g) * 0.2
    _, v = voxelize(torch.cat([big, small]), max_tokens=10_000, resolution=16, generator=g)
    _, vs = voxelize(small, max_tokens=10_000, resolution=16, generator=g)
    assert v.shape[1] == vs.shape[1]


def test_dit_padding_mask_equals_truncation():
    dit = _dit()
    g = torch.Generator().manual_seed(1)
    x, t, vox = torch.randn(2, 9, 8, generator=g), torch.rand(2, generator=g), torch.randint(0, 128, (2, 9, 3), generator=g)
    ctx = torch.randn(2, 6, 32, generator=g)
    padded = ctx.clone()
    padded[1, 4:] = -1.0  # sample 1 has only 4 real tokens (official padding marker)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        explicit = dit(x, t, padded, vox, mask)
        auto = dit(x, t, padded, vox)  # detected from the -1 rows
        alone = dit(x[1:], t[1:], ctx[1:, :4], vox[1:])
        first = dit(x[:1], t[:1], ctx[:1], vox[:1])
    assert torch.allclose(explicit, auto)
    assert torch.allclose(explicit[1:], alone, atol=1e-5)
    assert torch.allclose(explicit[:1], first, atol=1e-5)


def test_dit_is_permutation_equivariant_over_tokens():
    """Positions live in the RoPE indices, not in the token order."""
    dit = _dit()
    g = torch.Generator().manual_seed(2)
    x, vox = torch.randn(1, 12, 8, generator=g), torch.randint(0, 128, (1, 12, 3), generator=g)
    ctx, t = torch.randn(1, 5, 32, generator=g), torch.rand(1, generator=g)
    perm = torch.randperm(12, generator=g)
    with torch.no_grad():
        a = dit(x, t, ctx, vox)
        b = dit(x[:, perm], t, ctx, vox[:, perm])
    assert torch.allclose(a[:, perm], b, atol=1e-5)


def test_moe_matches_dense_per_token_reference():
    dit = _dit()
    moe = dit.blocks[-1].moe
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        y = moe(x)
        flat = x.reshape(-1, 48)
        scores = (flat @ moe.gate.weight.T).softmax(-1)
        w, idx = scores.topk(2, dim=-1)
        ref = torch.stack([sum(w[i, j] * moe.experts[int(idx[i, j])](flat[i]) for j in range(2)) for i in range(len(flat))])
        ref = ref + moe.shared_experts(flat)
    assert torch.allclose(y.reshape(-1, 48), ref, atol=1e-5)


def test_moe_aux_loss_only_in_training():
    dit = _dit()
    x, vox = torch.randn(1, 10, 8), torch.randint(0, 128, (1, 10, 3))
    ctx, t = torch.randn(1, 4, 32), torch.rand(1)
    dit.train()
    dit(x, t, ctx, vox).sum().backward()
    aux = dit.moe_aux_loss()
    # alpha * E * sum_i P_i f_i >= alpha (equality for perfectly uniform routing)
    assert aux is not None and aux.item() >= 2 * 0.01 * 0.99


def test_conditioner_masking_and_cfg_drop():
    torch.manual_seed(0)
    cond = ImageConditioner(ConditionerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=128, pretrain_image_size=56, image_size=56,
                                              drop_ratio=0.5)).eval()
    img = torch.rand(4, 3, 64, 64) * 2 - 1
    mask = -torch.ones(4, 1, 64, 64)
    mask[:, :, 10:30, 10:30] = 1.0  # object in the top-left: 2x2 patches at 56 px
    with torch.no_grad():
        tok, keep = cond(img, mask)
        assert tok.shape == (4, 1 + 4, 32) and keep.all()  # CLS + the 4 patches the object touches
        full, _ = cond(img)
        assert full.shape[1] == cond.cfg.num_tokens == 17
        g = torch.Generator().manual_seed(0)
        dropped, keep_d = cond(img, mask, disable_drop=False, generator=g)
    gone = (dropped == 0).flatten(1).all(1)
    assert 0 < gone.sum() < 4  # seed 0 drops some, not all, of the 4 samples at drop_ratio 0.5
    assert torch.equal(dropped[~gone], tok[~gone]) and keep_d.all()
    assert torch.equal(cond.unconditional(tok), torch.zeros_like(tok))


def test_flow_matching_loss_and_oracle():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 10, 8, generator=g)
    t = torch.rand(4, generator=g)
    noise = torch.randn(4, 10, 8, generator=g)
    oracle = lambda xt, tt: x1 - noise  # noqa: E731 -- the exact target velocity
    assert flow_matching_loss(oracle, x1, t=t, noise=noise).item() == 0.0
    zero = lambda xt, tt: torch.zeros_like(xt)  # noqa: E731
    assert math.isclose(flow_matching_loss(zero, x1, t=t, noise=noise).item(), ((x1 - noise) ** 2).mean().item(), rel_tol=1e-6)
    xt, u = interpolate(noise, x1, torch.zeros(4))
    assert torch.equal(xt, noise)  # t = 0 is noise
    xt, u = interpolate(noise, x1, torch.ones(4))
    assert torch.equal(xt, x1)  # t = 1 is data
    # an exact velocity field transports noise to data with Euler steps
    target = torch.randn(1, 10, 8, generator=g)
    x0 = torch.randn(1, 10, 8, generator=g)
    v = lambda x, tt, branch: (target - x0).expand_as(x)  # noqa: E731
    assert torch.allclose(sample_euler(v, x0, steps=7, guidance=-1), target, atol=1e-5)


def test_batched_cfg_equals_two_passes_on_the_dit():
    dit = _dit()
    g = torch.Generator().manual_seed(3)
    ctx, vox = torch.randn(1, 6, 32, generator=g), torch.randint(0, 128, (1, 10, 3), generator=g)
    noise = torch.randn(1, 10, 8, generator=g)
    both_ctx = torch.cat([ctx, torch.zeros_like(ctx)])

    def fn(x, t, branch):
        if branch == "both":
            return dit(x, t, both_ctx, torch.cat([vox, vox]))
        return dit(x, t, ctx if branch == "cond" else torch.zeros_like(ctx), vox)

    a = sample_euler(fn, noise, steps=5, guidance=5.0, batched_cfg=True)
    b = sample_euler(fn, noise, steps=5, guidance=5.0, batched_cfg=False)
    assert torch.allclose(a, b, atol=1e-4)


def _sphere_fn(r=0.5):
    return lambda p: r - p.norm(dim=-1)  # > 0 inside


def test_marching_cubes_sphere_is_closed_and_outward():
    import trimesh

    R = 32
    ax = torch.linspace(-1, 1, R + 1)
    grid = _sphere_fn()(torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1))
    v, f = marching_cubes(grid, 0.0)
    m = trimesh.Trimesh((v * 2 / R - 1).numpy(), f.numpy())
    assert m.is_watertight and m.is_winding_consistent
    vol = abs(m.volume)
    assert abs(vol - 4 / 3 * math.pi * 0.125) / (4 / 3 * math.pi * 0.125) < 0.03


def test_coarse_to_fine_equals_dense_near_the_surface():
    fn = _sphere_fn(0.6)
    fine = decode_volume(fn, 1.0, 128, min_resolution=63)  # levels 64 -> 128
    ax = torch.linspace(-1, 1, 129)
    dense = fn(torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1))
    band = dense.abs() < 0.05
    assert torch.allclose(fine[band], dense[band], atol=1e-6)
    assert torch.equal(fine[1:-1, 1:-1, 1:-1] > 0, dense[1:-1, 1:-1, 1:-1] > 0)  # signs agree everywhere inside


def test_vae_to_mesh_is_closed_and_outward():
    import trimesh

    torch.manual_seed(0)
    vae = ShapeVAE(ShapeVAEConfig(num_latents=64, embed_dim=8, width=32, heads=2, num_encoder_layers=1,
                                  num_decoder_layers=1)).eval()
    with torch.no_grad():
        # push the occupancy head's bias up so the random field has an interior to mesh
        vae.geo_decoder.output_proj.bias.fill_(0.3)
        tokens = vae.decode(torch.randn(1, 20, 8))
        v, f = vae.to_mesh(tokens, octree_resolution=24, bounds=1.0)
    m = trimesh.Trimesh(v.numpy(), f.numpy())
    assert len(f) > 0 and m.is_watertight and m.volume > 0
    assert v.abs().max() <= 1.0 + 1e-6


def test_cached_decoder_query_equals_forward_and_flashvdm_is_close():
    torch.manual_seed(0)
    vae = ShapeVAE(ShapeVAEConfig(num_latents=96, embed_dim=8, width=32, heads=2, num_encoder_layers=1,
                                  num_decoder_layers=1)).eval()
    with torch.no_grad():
        tokens = vae.decode(torch.randn(1, 96, 8))
        pts = torch.rand(700, 3) * 0.2 - 0.1  # a compact chunk, as decode_volume hands out
        k, v = vae.geo_decoder.keys_values(tokens)
        exact = vae.query(tokens, pts[None])[0]
        assert torch.allclose(vae.geo_decoder.query_cached(pts, k, v), exact, atol=1e-5)
        top = vae.geo_decoder.query_cached(pts, k, v, topk=32)
    assert not torch.allclose(top, exact)  # it really drops tokens
    assert torch.corrcoef(torch.stack([top, exact]))[0, 1] > 0.9  # but keeps the field's shape


def test_decode_volume_reports_query_counts_and_scatters_back():
    counts = []
    fn = _sphere_fn(0.5)
    grid = decode_volume(fn, 1.0, 64, min_resolution=31, query_counts=counts, num_chunks=777)
    assert [r for r, _ in counts] == [32, 64] and counts[0][1] == 33 ** 3 and 0 < counts[1][1] < 65 ** 3
    ax = torch.linspace(-1, 1, 65)
    dense = fn(torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1))
    band = dense.abs() < 0.03
    assert torch.allclose(grid[band], dense[band], atol=1e-6)


def test_zero_context_shortcut_is_exact():
    """The unconditional branch's cross-attention is skipped (its output is out_proj's bias);
    results equal the full computation, forward and backward."""
    import ml.models.dit as dm

    dit = _dit()
    g = torch.Generator().manual_seed(5)
    x, vox = torch.randn(3, 9, 8, generator=g), torch.randint(0, 128, (3, 9, 3), generator=g)
    ctx = torch.randn(3, 6, 32, generator=g)
    ctx[1] = 0.0  # the unconditional row
    t = torch.rand(3, generator=g)
    dit.train()
    a = dit(x, t, ctx, vox)
    a.square().mean().backward()
    ga = {k: p.grad.clone() for k, p in dit.named_parameters() if p.grad is not None}
    dit.zero_grad()
    orig = dm.CrossAttention.forward
    try:  # the same model with the shortcut disabled
        dm.CrossAttention.forward = lambda self, x, c, m=None, live=None: orig(self, x, c, m, None)
        b = dit(x, t, ctx, vox)
        b.square().mean().backward()
    finally:
        dm.CrossAttention.forward = orig
    assert torch.allclose(a, b, atol=1e-6)
    for k, p in dit.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ga[k], p.grad, atol=1e-6), k


def test_moe_every_expert_gives_idle_experts_zero_gradients():
    dit = _dit()
    moe = dit.blocks[-1].moe
    x = torch.randn(1, 1, 48)  # one token: 2 of the 4 experts get nothing
    moe.train()
    y = moe(x)
    y.sum().backward()
    assert sum(e.net[0].proj.weight.grad is None for e in moe.experts) == 2
    moe.zero_grad(set_to_none=True)
    moe.every_expert = True
    y2 = moe(x)
    y2.sum().backward()
    assert torch.equal(y, y2)
    grads = [e.net[0].proj.weight.grad for e in moe.experts]
    assert all(g is not None for g in grads) and sum(bool(g.abs().sum() == 0) for g in grads) == 2


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    dit = _dit()
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, 20, 8, generator=g), torch.rand(2, generator=g)
    ctx, vox = torch.randn(2, 6, 32, generator=g), torch.randint(0, 128, (2, 20, 3), generator=g)
    with torch.no_grad():
        a = dit(x, t, ctx, vox)
        b = dit.compile_kernels()(x, t, ctx, vox)
    assert torch.allclose(a, b, atol=1e-5)
