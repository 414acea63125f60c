"""DeepCache-style step caching (RefineDiT.forward_cached, sample_euler's cache_interval / cache_depth): off is
the plain sampler bit for bit, a cached call with the state of the same inputs is the full call, the schedule
runs the full DiT when it says it does, and bad settings are clear errors. CPU float32, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.config import load_config
from ml.models.dit import RefineDiT, RefineDiTConfig, rope_tables
from ml.models.flow_matching import euler_sigmas, sample_euler
from ml.refine import InferConfig

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "infer_dit_refine-tiny.yaml"
# the tiny shipped layout (depth 5: one skip pair at most for cache_depth 2) and a deeper one (depth 7, half 3:
# three skip pairs, so a wrong pairing of the last blocks' skips shows)
CFGS = {
    "depth5": RefineDiTConfig(in_channels=8, hidden_size=48, context_dim=32, depth=5, num_heads=2,
                              num_moe_layers=2, num_experts=4, moe_top_k=2),
    "depth7": RefineDiTConfig(in_channels=8, hidden_size=48, context_dim=32, depth=7, num_heads=2,
                              num_moe_layers=2, num_experts=4, moe_top_k=2),
}
pytestmark = pytest.mark.unit


def _dit(cfg: RefineDiTConfig, seed: int = 0) -> RefineDiT:
    torch.manual_seed(seed)
    return RefineDiT(cfg).eval()


def _inputs(cfg: RefineDiTConfig, seed: int = 1, tokens: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, cfg.in_channels, generator=g)
    t = torch.tensor([0.3, 0.3])
    ctx = torch.randn(1, 6, cfg.context_dim, generator=g)
    both = torch.cat([ctx, torch.zeros_like(ctx)])  # row 1 is the unconditional branch (zero-context skip)
    vox = torch.randint(0, 64, (1, tokens, 3), generator=g).expand(2, -1, -1)
    return x, t, both, vox


class _BlockCounter:
    """Counts calls of each DiT block with forward hooks (how many blocks a call really ran)."""

    def __init__(self, dit: RefineDiT):
        self.n = [0] * len(dit.blocks)
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(dit.blocks)]

    def _hook(self, i):
        def h(mod, inp, out):
            self.n[i] += 1
        return h

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", list(CFGS))
def test_cached_call_on_the_same_inputs_is_the_full_call(name):
    cfg = CFGS[name]
    dit = _dit(cfg)
    x, t, ctx, vox = _inputs(cfg)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, -2:] = False  # padded context tokens go through the cached path too
    with torch.no_grad():
        ref = dit(x, t, ctx, vox, mask)
        for d in range(1, cfg.depth // 2 + 1):
            counter = _BlockCounter(dit)
            full, h_mid = dit.forward_cached(x, t, ctx, vox, mask, cache_depth=d)
            assert counter.n == [1] * cfg.depth  # a full call runs every block once
            assert torch.equal(full, ref), f"d={d}: the full call differs from forward()"
            assert h_mid.shape == (2, 1 + x.shape[1], cfg.hidden_size)
            counter.n = [0] * cfg.depth
            cached, kept = dit.forward_cached(x, t, ctx, vox, mask, cache_depth=d, h_mid=h_mid)
            counter.close()
            # 2d blocks: the first d (fresh skips) and the last d (on the kept state)
            assert counter.n == [1] * d + [0] * (cfg.depth - 2 * d) + [1] * d
            assert kept is h_mid
            assert torch.equal(cached, ref), f"d={d}: cached call with the same inputs' state differs"
            # and the kept state really is used: another one gives another answer
            other, _ = dit.forward_cached(x, t, ctx, vox, mask, cache_depth=d, h_mid=h_mid + 1.0)
            assert not torch.allclose(other, ref)


def test_cached_call_pairs_each_deep_block_with_its_own_skip():
    """With a kept state from other inputs, only the shallow blocks' skips carry this call's x: a cached call
    must equal a hand-written pass where block depth-1-j takes block j's output."""
    cfg = CFGS["depth7"]
    dit = _dit(cfg)
    x, t, ctx, vox = _inputs(cfg)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        for d in (2, 3):
            _, h_old = dit.forward_cached(x2, t + 0.1, ctx, vox, cache_depth=d)
            got, _ = dit.forward_cached(x, t, ctx, vox, cache_depth=d, h_mid=h_old)
            h = torch.cat([dit.t_embedder(t), dit.x_embedder(x)], dim=1)
            cos, sin = rope_tables(vox, cfg.head_dim, cfg.rope_theta, torch.float32)
            outs = []
            for j in range(d):
                h = dit.blocks[j](h, ctx, None, cos, sin)
                outs.append(h)
            h = h_old
            for j in reversed(range(d)):  # block depth-1-j pops block j's output
                h = dit.blocks[cfg.depth - 1 - j](h, ctx, None, cos, sin, skip=outs[j])
            torch.testing.assert_close(got, dit.final_layer(h), rtol=0, atol=1e-6)


def _fn_for(dit, ctx, vox):
    """The refine pipeline's cond_fn shape (ml/refine.py velocity): plain forward, or forward_cached."""
    cond, both = ctx[:1], ctx
    vox1 = vox[:1]

    def fn(x, t, branch, cache=None):
        if branch == "both":
            args = (x, t, both, vox)
        else:
            args = (x, t, cond if branch == "cond" else torch.zeros_like(cond), vox1)
        if cache is None:
            return dit(*args)
        v, cache.h = dit.forward_cached(*args, cache_depth=cache.depth, h_mid=cache.h)
        return v

    return fn


def _plain_fn(dit, ctx, vox):
    """A cond_fn of the old three-argument contract (it must keep working when caching is off)."""
    fn = _fn_for(dit, ctx, vox)
    return lambda x, t, branch: fn(x, t, branch)


@pytest.mark.parametrize("batched", [True, False])
def test_interval_one_is_the_plain_sampler_bit_for_bit(batched):
    cfg = CFGS["depth5"]
    dit = _dit(cfg)
    x, _, ctx, vox = _inputs(cfg)
    noise = x[:1]
    plain = sample_euler(_plain_fn(dit, ctx, vox), noise, steps=6, guidance=5.0, batched_cfg=batched)
    same = sample_euler(_fn_for(dit, ctx, vox), noise, steps=6, guidance=5.0, batched_cfg=batched,
                        cache_interval=1, cache_depth=2)
    assert torch.equal(plain, same)
    # and a cond_fn without the `cache` keyword is never given one when caching is off
    late = sample_euler(_plain_fn(dit, ctx, vox), noise, steps=6, guidance=5.0, batched_cfg=batched,
                        guidance_until=0.5, cache_interval=1)
    assert late.shape == noise.shape


def _expected_full_steps(steps: int, k: int, guidance_until: float) -> set[int]:
    """The schedule as documented in sample_euler: calls at steps 0..steps-2 (the last has dt = 0); full when
    i % k == 0 or the guidance mode differs from the previous call's (the first call counts as a change)."""
    sig = euler_sigmas(steps)
    full, prev = set(), None
    for i in range(steps - 1):
        guided = float(sig[i]) < guidance_until
        if i % k == 0 or guided != prev:
            full.add(i)
        prev = guided
    return full


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("steps,k,until", [(9, 2, 1.0), (10, 3, 1.0), (12, 4, 0.3), (11, 3, 0.5)])
def test_interval_k_runs_the_full_dit_on_schedule(batched, steps, k, until):
    cfg = CFGS["depth7"]
    dit = _dit(cfg)
    x, _, ctx, vox = _inputs(cfg)
    noise = x[:1]
    counter = _BlockCounter(dit)
    try:
        out = sample_euler(_fn_for(dit, ctx, vox), noise, steps=steps, guidance=5.0, batched_cfg=batched,
                           guidance_until=until, cache_interval=k, cache_depth=2)
    finally:
        counter.close()
    full = _expected_full_steps(steps, k, until)
    sig = euler_sigmas(steps)
    # DiT calls per step: 2 when guided with split CFG (cond, uncond), else 1
    per_step = [2 if (not batched and float(sig[i]) < until) else 1 for i in range(steps - 1)]
    n_full = sum(per_step[i] for i in full)
    n_all = sum(per_step)
    # the middle block runs only in full calls; block 0 in every call
    assert counter.n[cfg.depth // 2] == n_full
    assert counter.n[0] == n_all
    assert n_full < n_all  # the schedule did skip work (else this test checks nothing)
    plain = sample_euler(_fn_for(dit, ctx, vox), noise, steps=steps, guidance=5.0, batched_cfg=batched,
                         guidance_until=until)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)  # caching changes the numbers


def test_cached_batched_and_split_cfg_agree():
    """Cond and uncond cached together (batched) or each alone (split) are the same computation."""
    cfg = CFGS["depth7"]
    dit = _dit(cfg)
    x, _, ctx, vox = _inputs(cfg)
    a = sample_euler(_fn_for(dit, ctx, vox), x[:1], steps=8, guidance=5.0, batched_cfg=True, cache_interval=3)
    b = sample_euler(_fn_for(dit, ctx, vox), x[:1], steps=8, guidance=5.0, batched_cfg=False, cache_interval=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_cond_fn_that_ignores_the_cache_is_an_error():
    noise = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="cache.h"):
        sample_euler(lambda x, t, branch, cache=None: torch.zeros_like(x), noise, steps=4, cache_interval=2)


def test_bad_cache_settings_are_clear_errors():
    cfg = CFGS["depth5"]
    dit = _dit(cfg)
    x, t, ctx, vox = _inputs(cfg)
    noise = x[:1]
    fn = _fn_for(dit, ctx, vox)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"refine\.cache_interval"):
            sample_euler(fn, noise, steps=4, cache_interval=bad)
    with pytest.raises(ValueError, match=r"refine\.cache_depth"):
        sample_euler(fn, noise, steps=4, cache_interval=2, cache_depth=0)
    for bad in (0, cfg.depth // 2 + 1):
        with pytest.raises(ValueError, match=r"refine\.cache_depth.*\[1, depth//2 = 2\]"):
            dit.forward_cached(x, t, ctx, vox, cache_depth=bad)
    _, h = dit.forward_cached(x, t, ctx, vox, cache_depth=1)
    with pytest.raises(ValueError, match="different batch layout"):
        dit.forward_cached(x[:1], t[:1], ctx[:1], vox[:1], cache_depth=1, h_mid=h)
    # the config: ConfigError (a ValueError) naming the key
    with pytest.raises(ValueError, match=r"refine\.cache_interval"):
        load_config(TINY, InferConfig, {"refine.cache_interval": 0})
    with pytest.raises(ValueError, match=r"refine\.cache_depth"):
        load_config(TINY, InferConfig, {"refine.cache_depth": 0})
    with pytest.raises(ValueError, match=r"refine\.cache_depth \(3\).*model\.dit\.depth//2 = 2"):
        load_config(TINY, InferConfig, {"refine.cache_depth": 3})
    ok = load_config(TINY, InferConfig, {"refine.cache_interval": 3, "refine.cache_depth": 2})
    assert (ok.refine.cache_interval, ok.refine.cache_depth) == (3, 2)
    shipped = load_config(ROOT / "configs" / "infer_dit_refine.yaml", InferConfig)
    assert shipped.refine.cache_interval == 1  # off officially
