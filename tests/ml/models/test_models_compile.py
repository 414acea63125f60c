"""refine.compile: every RefineDiT block compiled (ml.models.dit.compile_blocks) gives the eager numbers, for the
plain forward, the CFG batch with a zero (unconditional) context, and the step-cached partial forward."""

from __future__ import annotations

import pytest
import torch

from ml.models.dit import RefineDiT, RefineDiTConfig

pytestmark = pytest.mark.slow

CFG = RefineDiTConfig(in_channels=8, hidden_size=48, context_dim=32, depth=5, num_heads=2,
                      num_moe_layers=2, num_experts=4, moe_top_k=2)


def test_compiled_blocks_match_eager_in_inference():
    torch.manual_seed(0)
    eager = RefineDiT(CFG).eval()
    comp = RefineDiT(CFG).eval()
    comp.load_state_dict(eager.state_dict())
    assert comp.compile_blocks() is comp
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 20, 8, generator=g), torch.rand(2, generator=g)
    ctx, vox = torch.randn(2, 6, 32, generator=g), torch.randint(0, 128, (2, 20, 3), generator=g)
    ctx[1] = 0  # the unconditional half of a CFG batch: its cross-attention is skipped
    with torch.no_grad():
        torch.testing.assert_close(comp(x, t, ctx, vox), eager(x, t, ctx, vox), rtol=1e-5, atol=1e-5)
        va, ha = eager.forward_cached(x, t, ctx, vox, cache_depth=2)
        vb, hb = comp.forward_cached(x, t, ctx, vox, cache_depth=2)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-5)
        t2 = t * 0.5
        va2, _ = eager.forward_cached(x, t2, ctx, vox, cache_depth=2, h_mid=ha)
        vb2, _ = comp.forward_cached(x, t2, ctx, vox, cache_depth=2, h_mid=hb)
        torch.testing.assert_close(vb2, va2, rtol=1e-5, atol=1e-5)
    assert all(getattr(b, "_compiled", False) for b in comp.blocks)


def test_other_token_counts_do_not_compile_once_each():
    """A refine server or a training run meets many token counts (shapes with fewer occupied voxels than
    num_latents): after the first change the blocks compile once with a symbolic length, not once per count."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    dit = RefineDiT(CFG).eval().compile_blocks()
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(2)
    graphs = []
    with torch.no_grad():
        for n in (20, 17, 13, 11, 9):
            x, t = torch.randn(1, n, 8, generator=g), torch.rand(1, generator=g)
            ctx, vox = torch.randn(1, 6, 32, generator=g), torch.randint(0, 128, (1, n, 3), generator=g)
            dit(x, t, ctx, vox)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0
    # a static compile per count would add graphs[0] graphs at every step; automatic dynamic settles after a few
    assert graphs[-1] == graphs[-2] and graphs[-1] <= 3 * graphs[0], f"recompiled for every token count: {graphs}"
