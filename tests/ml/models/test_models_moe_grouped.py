"""The MoE's grouped-GEMM expert path (ml.models.dit.MoE._experts_grouped, what CUDA bf16 runs) computes what the
per-expert loop computes: outputs, input gradients and every parameter's gradient, biases included."""

from __future__ import annotations

import copy

import pytest
import torch

from ml.models.dit import MoE

pytestmark = pytest.mark.unit


def _moe(seed=0, experts=4, dim=32):
    torch.manual_seed(seed)
    m = MoE(dim, num_experts=experts, top_k=2, aux_alpha=0.01).train()
    for e in list(m.experts) + [m.shared_experts]:  # non-zero biases, so a dropped or misplaced bias shows
        torch.nn.init.normal_(e.net[0].proj.bias, std=0.5)
        torch.nn.init.normal_(e.net[2].bias, std=0.5)
    return m


def _run(m, impl, x, autocast=False):
    m = copy.deepcopy(m)
    m.experts_impl = impl
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    gy = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * gy).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("tokens", [37, 3])  # 3 tokens x top-2 over 4 experts: some experts get no rows
def test_grouped_experts_match_the_loop_in_float32(tokens):
    m = _moe()
    x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(1))
    ya, ga, pa = _run(m, "loop", x)
    yb, gb, pb = _run(m, "grouped", x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    for n, g in pa.items():
        if g is None:  # the loop skips an expert with no rows: the grouped path gives it an exact zero gradient
            assert not pb[n].any(), n
        else:
            torch.testing.assert_close(pb[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert all(g is not None for g in pb.values()), "grouped: every expert gets a gradient (data parallel needs it)"


def test_grouped_experts_under_bf16_autocast_stay_near_the_loop():
    m = _moe(seed=2)
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3))
    ref = _run(m, "loop", x)[0]
    yb = _run(m, "grouped", x, autocast=True)[0]
    ya = _run(m, "loop", x, autocast=True)[0]
    assert yb.dtype == torch.float32
    # both bf16 paths sit at bf16 rounding distance from float32, and from each other
    assert float((ya - ref).norm() / ref.norm()) < 2e-2
    assert float((yb - ref).norm() / ref.norm()) < 2e-2
    assert float((yb - ya).norm() / ref.norm()) < 2e-2


def test_auto_picks_the_loop_off_cuda_and_rejects_nothing_else():
    m = _moe()
    assert m.experts_impl == "auto"
    calls = []
    orig = MoE._experts_grouped
    MoE._experts_grouped = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        m(torch.randn(1, 5, 32))
        assert calls == []  # float32 on CPU: the per-expert loop (parity with the official code)
        m.experts_impl = "grouped"
        m(torch.randn(1, 5, 32))
        assert calls == [1]
    finally:
        MoE._experts_grouped = orig


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device tool's H100)")
def test_grouped_experts_on_cuda_bf16_match_the_loop():
    """What training and refine run on the GPU: auto picks the grouped GEMMs for bf16 on CUDA."""
    m = _moe(seed=4, experts=8, dim=256).cuda()
    x = torch.randn(1, 4096, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    outs = {}
    for impl in ("loop", "auto"):
        mm = copy.deepcopy(m)
        mm.experts_impl = impl
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mm(xx)
        y.float().square().mean().backward()
        outs[impl] = (y.detach(), xx.grad, {n: p.grad for n, p in mm.named_parameters()})
    (ya, ga, pa), (yb, gb, pb) = outs["loop"], outs["auto"]
    assert float((yb - ya).norm() / ya.norm()) < 1e-2
    assert float((gb - ga).norm() / ga.norm()) < 2e-2
    for n, g in pa.items():
        assert float((pb[n] - g).norm() / g.norm().clamp(min=1e-12)) < 3e-2, n
