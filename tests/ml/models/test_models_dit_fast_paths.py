"""The RefineDiT's fast paths compute what the plain formulas compute (ml/models/dit.py): RoPE with the folded
sign table, the sorted MoE dispatch and its gather-only backward, the copy-free q/k/v head split, and the
`skip_zero_context` switch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ml.models.dit as dm
from ml.models.dit import MoE, RefineDiT, RefineDiTConfig

CFG = RefineDiTConfig(in_channels=8, hidden_size=48, context_dim=32, depth=5, num_heads=2,
                      num_moe_layers=2, num_experts=4, moe_top_k=2)


def test_rope_tables_match_rotate_half():
    g = torch.Generator().manual_seed(0)
    vox = torch.randint(0, 128, (2, 11, 3), generator=g)
    x = torch.randn(2, 3, 12, 24, generator=g, dtype=torch.float64)
    cos, sin = dm.rope_3d(vox, 24)
    cos = torch.cat([torch.ones_like(cos[:, :1]), cos], 1)[:, None].double()
    sin = torch.cat([torch.zeros_like(sin[:, :1]), sin], 1)[:, None].double()
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * cos + torch.cat([-x2, x1], -1) * sin
    c, s = dm.rope_tables(vox, 24, 10000.0, torch.float64)
    torch.testing.assert_close(dm.apply_rope(x, c, s), ref, rtol=1e-12, atol=1e-12)
    assert (dm.apply_rope(x, c, s)[:, :, 0] == x[:, :, 0]).all()  # timestep token: angle 0


def test_joined_finds_split_parts_only():
    y = torch.randn(2, 5, 18)
    assert dm._joined(list(y.split(6, dim=-1))) is y
    assert dm._joined([y[..., :6].clone(), y[..., 6:12], y[..., 12:]]) is None
    assert dm._joined([y[..., 6:12], y[..., :6], y[..., 12:]]) is None  # out of order
    assert dm._joined([torch.randn(2, 5, 6), torch.randn(2, 5, 6)]) is None


def test_moe_matches_dense_reference_values_and_gradients():
    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, top_k=2, aux_alpha=0.0).double().train()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    x.grad = None
    # reference: every expert on every token, weighted by the top-k softmax weights (zero elsewhere)
    scores = F.linear(x, moe.gate.weight).softmax(-1)
    w, idx = scores.topk(2, dim=-1)
    dense = torch.zeros_like(scores).scatter(-1, idx, w)
    ref = sum(dense[..., e:e + 1] * ex(x) for e, ex in enumerate(moe.experts)) + moe.shared_experts(x)
    (ref * gy).sum().backward()
    want = [x.grad] + [p.grad for p in moe.parameters()]
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_moe_under_autocast_stays_near_float32():
    torch.manual_seed(1)
    moe = MoE(32, num_experts=4, top_k=2, aux_alpha=0.01).train()
    x = torch.randn(2, 40, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.float32  # gate-weighted sum in float32, as before the sorted dispatch
    assert float((y - ref).norm() / ref.norm()) < 2e-2


def test_skip_zero_context_off_same_output_and_every_gradient():
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 9, 8, generator=g), torch.rand(2, generator=g)
    ctx, vox = torch.randn(2, 6, 32, generator=g), torch.randint(0, 128, (2, 9, 3), generator=g)
    ctx[:] = 0.0  # both rows unconditional: the skip leaves every cross-attention weight without gradient
    outs, missing = [], []
    for skip in (True, False):
        torch.manual_seed(0)
        dit = RefineDiT(CFG).train()
        dit.skip_zero_context = skip
        for b in dit.blocks:
            if b.use_moe:
                b.moe.every_expert = True
        y = dit(x, t, ctx, vox)
        y.square().mean().backward()
        outs.append(y)
        missing.append([n for n, p in dit.named_parameters() if p.grad is None])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    assert any(".attn2." in n for n in missing[0]) and missing[1] == []
