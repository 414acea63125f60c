"""Engine pieces on the real tiny RefineDiT (no DeepSpeed process group needed): LR schedule, DeepSpeed config,
LoRA, activation checkpointing, the static-graph patch for data parallelism, and the shipped configs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ml.config import ConfigError, load_config
from ml.models.checkpoint import build_models
from ml.training.config import TrainConfig
from ml.training.engine import (apply_lora, deepspeed_config, enable_activation_checkpointing, lr_factor,
                                make_graph_static, merge_lora_state_dict)
from training_fixtures import ROOT, TINY

pytestmark = pytest.mark.unit


@pytest.fixture
def cfg() -> TrainConfig:
    return load_config(TINY, TrainConfig)


def _dit(cfg, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_models(cfg.model.arch).dit


def _inputs(cfg, n=24, zero_ctx=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = cfg.model.arch.dit
    x = torch.randn(2, n, d.in_channels, generator=g)
    vidx = torch.randint(0, 32, (2, n, 3), generator=g)
    ctx = torch.randn(2, 7, d.context_dim, generator=g)
    if zero_ctx:
        ctx[0] = 0  # a CFG-dropped sample
    return x, torch.rand(2, generator=g), ctx, vidx


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, 10, 100, 1e-6, 1e-3) for s in range(0, 101)]
    assert f[0] == pytest.approx(1e-6) and f[10] == pytest.approx(1.0) and f[100] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # rising warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then only falling
    assert f[55] == pytest.approx(1e-3 + 0.5 * (1 - 1e-3), rel=1e-6)  # cosine midpoint


def test_deepspeed_config_from_train_config(cfg):
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 1 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 2 and not ds["bf16"]["enabled"]
    d = replace(cfg.deepspeed, zero_stage=3, offload_optimizer=True, offload_param=True, precision="bf16")
    ds = deepspeed_config(replace(cfg, deepspeed=d), world_size=1)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["optimizer"]["type"] == "AdamW"
    ds = deepspeed_config(replace(cfg, deepspeed=replace(cfg.deepspeed, zero_stage=0, precision="autocast")), 1)
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0  # ZeRO-0: engine.clip_gradients clips, not DeepSpeed's per-tensor loop
    # bf16 at ZeRO-0: our MasterAdamW keeps the fp32 masters, not DeepSpeed's bf16 optimizer; matmuls under autocast
    ds = deepspeed_config(replace(cfg, deepspeed=replace(cfg.deepspeed, zero_stage=0, precision="bf16")), 1)
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.0


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="offload_param"):
        load_config(TINY, TrainConfig, {"deepspeed.offload_param": True})
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(TINY, TrainConfig, {"train.max_steps": 3})
    with pytest.raises(ConfigError, match="did you mean 'train.grad_accum'"):
        load_config(TINY, TrainConfig, {"train.grad_acum": 2})


def test_shipped_configs_match_the_inference_architectures():
    from ml.refine import InferConfig

    for train, infer in (("train_dit_refine.yaml", "infer_dit_refine.yaml"),
                         ("train_dit_refine-tiny.yaml", "infer_dit_refine-tiny.yaml")):
        t = load_config(ROOT / "configs" / train, TrainConfig).model.arch
        i = load_config(ROOT / "configs" / infer, InferConfig).model
        # the weights are the same networks; only the training token budget differs
        assert replace(t, vae=replace(t.vae, num_latents=i.vae.num_latents)) == i, train
    full = load_config(ROOT / "configs" / "train_dit_refine.yaml", TrainConfig)
    assert full.model.arch.vae.num_latents == 8192 and full.data.pc_size == 163840  # official training sizes
    assert full.optim.lr == 1e-5 and full.train.grad_accum == 4 and full.model.cfg_drop == 0.1


def test_lora_trains_adapters_only_and_merges_exactly(cfg):
    dit = _dit(cfg)
    x, t, ctx, vidx = _inputs(cfg)
    with torch.no_grad():
        base = dit(x, t, ctx, vidx)
    n = apply_lora(dit, rank=4, alpha=4.0, targets=["to_q", "to_k", "to_v", "out_proj", "fc1", "fc2"])
    assert n > 0
    trainable = {k for k, p in dit.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    with torch.no_grad():
        assert torch.equal(dit(x, t, ctx, vidx), base)  # B = 0: the adapters start as a no-op
        for name, p in dit.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
        adapted = dit(x, t, ctx, vidx)
    assert not torch.allclose(adapted, base)
    merged = _dit(cfg, seed=5)
    merged.load_state_dict(merge_lora_state_dict(dit), strict=True)  # the released key set, adapters folded in
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, ctx, vidx), adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="match no nn.Linear"):
        apply_lora(_dit(cfg), 4, 4.0, ["nope"])


def test_activation_checkpointing_same_gradients_same_keys(cfg):
    a, b = _dit(cfg), _dit(cfg)
    keys = list(b.state_dict())
    assert enable_activation_checkpointing(b, max_blocks=2) == 2
    assert enable_activation_checkpointing(_dit(cfg)) == cfg.model.arch.dit.depth
    assert list(b.state_dict()) == keys
    x, t, ctx, vidx = _inputs(cfg)
    for m in (a, b):
        torch.manual_seed(0)
        m(x, t, ctx, vidx).square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_static_graph_same_output_and_every_parameter_gets_a_gradient(cfg):
    # one token routed to 2 of 4 experts, and an all-zero context: ml.models skips work for both
    x, t, ctx, vidx = _inputs(cfg, n=1, zero_ctx=True)
    ctx[1] = 0
    plain, static = _dit(cfg), _dit(cfg)
    assert make_graph_static(static) > 0
    outs = []
    for m in (plain, static):
        torch.manual_seed(0)
        y = m(x, t, ctx, vidx)
        y.square().mean().backward()
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    missing_plain = [n for n, p in plain.named_parameters() if p.grad is None]
    missing_static = [n for n, p in static.named_parameters() if p.grad is None]
    assert missing_plain, "the test must exercise skipped work (empty experts / zero context)"
    assert missing_static == []
    for (n, pa), (_, pb) in zip(plain.named_parameters(), static.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)
        else:
            assert not pb.grad.any(), n  # skipped work gets exactly zero gradient


def _cached_models_and_batch(cfg, tmp_path):
    """Tiny models with a latent cache under tmp_path, and one fixed sample (uid 'a') on a sphere."""
    from ml.training.step import TrainModels

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = build_models(cfg.model.arch)
    tm = TrainModels(models, cfg, torch.device("cpu"), tmp_path / "cache")
    g = torch.Generator().manual_seed(0)
    d = torch.randn(1, 2560, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    return tm, {"uid": ["a"], "surface": torch.cat([0.8 * d, d, torch.zeros(1, 2560, 1)], dim=-1)}


def test_latent_cache_encodes_once_then_resamples_the_posterior(cfg, tmp_path):
    tm, batch = _cached_models_and_batch(cfg, tmp_path)
    z1, v1 = tm.encode(batch)
    assert (tmp_path / "cache" / "a.pt").is_file()
    calls = []
    hook = tm.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    tm.vae.encode_tokens = lambda *a, **k: calls.append(1)  # the encoder must not run again
    z2, v2 = tm.encode(batch)
    hook.remove()
    assert not calls and torch.equal(v1, v2) and z1.shape == z2.shape
    assert not torch.equal(z1, z2)  # a fresh posterior sample around the cached mean


def test_latent_cache_leaves_the_global_rng_as_a_cached_sample_does(cfg, tmp_path):
    """A resumed run finds the cache filled; the first run filled it. The global RNG (which every later draw
    of the run uses) must end in the same state either way, or the resume is no longer bit-exact."""
    tm, batch = _cached_models_and_batch(cfg, tmp_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        z_miss, v_miss = tm.encode(batch)  # not cached yet: runs the encoder
        after_miss = torch.get_rng_state()
        torch.manual_seed(5)
        z_hit, v_hit = tm.encode(batch)  # cached
        after_hit = torch.get_rng_state()
    assert torch.equal(after_miss, after_hit)
    assert torch.equal(v_miss, v_hit) and torch.equal(z_miss, z_hit)  # same posterior sample too


@pytest.mark.slow
def test_compiled_blocks_same_loss_and_gradients_with_checkpointing(cfg):
    """model.compile: true (engine.compile_blocks, then activation checkpointing over the compiled blocks) trains
    the same numbers as eager, for a conditional and a CFG-dropped sample; parameter names do not change."""
    from ml.training.engine import compile_blocks

    eager, comp = _dit(cfg), _dit(cfg)
    keys = list(comp.state_dict())
    assert compile_blocks(comp) == cfg.model.arch.dit.depth
    assert compile_blocks(comp) == 0  # idempotent
    enable_activation_checkpointing(comp, max_blocks=2)
    assert list(comp.state_dict()) == keys
    for zero_ctx in (False, True):
        x, t, ctx, vidx = _inputs(cfg, zero_ctx=zero_ctx)
        losses = []
        for m in (eager, comp):
            m.zero_grad(set_to_none=True)
            loss = m(x, t, ctx, vidx).square().mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (n, pa), (_, pb) in zip(eager.named_parameters(), comp.named_parameters()):
            if pa.grad is None:
                assert pb.grad is None or not pb.grad.any(), n
            else:
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_compile_refused_with_zero3(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="model.compile"):
        load_config(TINY, TrainConfig, {"model.compile": True, "deepspeed.zero_stage": 3})


CLIP_SCRIPT = r"""
import sys, torch
from ml.config import load_config
from ml.training.config import TrainConfig
from ml.training.engine import build_engine, clip_gradients, init_distributed
cfg = load_config(sys.argv[1], TrainConfig, {"deepspeed.zero_stage": 0, "deepspeed.precision": "autocast",
                                             "deepspeed.dist_backend": "gloo", "optim.grad_clip": 0.5,
                                             "train.grad_accum": 2, "optim.warmup_steps": 0})
init_distributed(cfg)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
engine = build_engine(model, cfg, 1)
x = torch.randn(32, 8) * 10
norms = []
for micro in range(2):
    engine.backward(engine(x).square().mean() * 100)
    grads = [p.grad.clone() for p in model.parameters()]
    norm = clip_gradients(engine, cfg)
    if micro == 0:
        assert norm is None, "not at the accumulation boundary: no clipping yet"
        engine.step()  # as the trainer does after every micro-batch: DeepSpeed only counts it here
        continue
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert before > 0.5 * 10, before
    assert abs(float(norm) - float(before)) < 1e-4 * float(before), (norm, before)
    assert abs(float(after) - 0.5) < 1e-4, after
    engine.step()
print("CLIP OK", float(norm))
"""


def test_zero0_clipping_is_ours_and_exact():
    import subprocess
    import sys

    from training_fixtures import env

    p = subprocess.run([sys.executable, "-c", CLIP_SCRIPT, str(TINY)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env())
    assert p.returncode == 0 and "CLIP OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


FOLD_SCRIPT = r"""
import sys, torch
import ml.training.engine as E
from ml.config import load_config
from ml.training.config import TrainConfig
cfg = load_config(sys.argv[1], TrainConfig, {"deepspeed.zero_stage": 0, "deepspeed.precision": "autocast",
                                             "deepspeed.dist_backend": "gloo", "optim.grad_clip": 0.5,
                                             "train.grad_accum": 1, "optim.warmup_steps": 0})
E.init_distributed(cfg)
plain = E.build_optimizer
E.build_optimizer = lambda params, cfg: torch.optim.AdamW(params, lr=1e-2, fused=True)  # what CUDA gets
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
engine = E.build_engine(model, cfg, 1)
assert engine.optimizer.defaults["fused"], type(engine.optimizer)
x = torch.randn(32, 8) * 10
for step in range(3):
    engine.backward(engine(x).square().mean() * 100 * (step + 1))
    grads = [p.grad.clone() for p in model.parameters()]
    norm = E.optimizer_step(engine, cfg)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert abs(float(norm) - float(want)) < 1e-4 * float(want), (step, norm, want)  # this step's norm, not a stale one
    assert getattr(engine.optimizer, "grad_scale", None) is None, "the clip factor outlived its step"
print("FOLD OK")
"""


def test_zero0_fused_step_clips_by_folding_and_forgets_the_factor():
    import subprocess
    import sys

    from training_fixtures import env

    p = subprocess.run([sys.executable, "-c", FOLD_SCRIPT, str(TINY)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env())
    assert p.returncode == 0 and "FOLD OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def _batch_with_view(tm_batch):
    tm, batch = tm_batch
    batch["image"] = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch["mask"] = torch.ones(1, 1, 112, 112)
    return tm, batch


def test_flop_counting_leaves_the_random_draws_alone(cfg, tmp_path):
    """The first micro-batch counts FLOPs on a throwaway forward; the loss (its t, noise and CFG drop) must be the one
    an uncounted step draws, or a resumed run (which counts again) would leave the uninterrupted run's path."""
    tm, batch = _batch_with_view(_cached_models_and_batch(cfg, tmp_path))
    losses = []
    for count in (True, False):
        gen = torch.Generator().manual_seed(5)
        torch.manual_seed(6)
        losses.append(tm.loss(tm.dit, batch, train=True, gen=gen, count_flops=count).detach())
        losses.append(torch.rand(3, generator=gen))  # where each generator stands afterwards
        losses.append(torch.rand(3))
    for a, b in zip(losses[:3], losses[3:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert tm.train_flops_per_sample() > 0


@pytest.mark.slow
def test_flop_counting_step_leaves_the_blocks_compiled(cfg, tmp_path):
    """ml.training counts FLOPs on its first micro-batch (TrainModels.loss(count_flops=True)). Under FlopCounterMode
    dynamo would mark the compiled blocks 'skip' for good and the run would train in eager with model.compile on
    (seen on the H100: no speed-up and no Triton kernel in the step's profile); and an eager forward of a
    checkpointed block recomputed compiled fails (CheckpointError, also seen there)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ml.training.engine import compile_blocks

    tm, batch = _batch_with_view(_cached_models_and_batch(cfg, tmp_path))
    compile_blocks(tm.dit)
    enable_activation_checkpointing(tm.dit, max_blocks=2)
    torch._dynamo.reset()
    counters.clear()
    tm.loss(tm.dit, batch, train=True, count_flops=True).backward()
    assert tm.train_flops_per_sample() > 0
    assert counters["stats"]["unique_graphs"] > 0, "the blocks did not compile on the counted step"
    tm.loss(tm.dit, batch, train=True).backward()  # a later step (maybe CFG-dropped: its own graphs) runs too


def test_clipping_folded_into_fused_adamw_matches_a_separate_clip_pass():
    """ZeRO-0 on CUDA clips by handing the fused AdamW a grad_scale instead of rewriting every gradient first:
    the update must equal clip_grad_norm_ followed by the same optimizer, and the scale must not outlive the step."""
    import copy

    from ml.training.engine import fold_clip

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, fused=True)  # fused runs on CPU too
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    x = torch.randn(32, 8) * 10
    for step in range(3):
        for m in (a, b):
            m.zero_grad()
            (m(x).square().mean() * 100).backward()
        norm_b = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
        scale = fold_clip(opt_a, list(a.parameters()), 0.5)
        assert scale is not None and float(scale) > 1.0, "these gradients are far above the clip: it must act"
        torch.testing.assert_close(opt_a.grad_scale_norm, norm_b)
        opt_a.step()
        opt_b.step()
        opt_a.grad_scale = None
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # a plain (not fused) optimizer cannot take a scale: the caller clips in place instead
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2)
    assert fold_clip(plain, list(a.parameters()), 0.5) is None and getattr(plain, "grad_scale", None) is None


@pytest.mark.parametrize("accum,world,accum_dtype,want", [(1, 1, "fp32", torch.bfloat16), (4, 1, "fp32", torch.float32),
                                                         (1, 2, "fp32", torch.float32), (4, 2, "bf16", torch.bfloat16)])
def test_master_weights_sum_gradients_in_the_configured_dtype(cfg, accum, world, accum_dtype, want):
    """precision bf16 at ZeRO-0: MasterAdamW's gradient buffer is fp32 only where gradients are summed (micro-batches
    or ranks) and deepspeed.grad_accum_dtype asks for fp32; the module's weights become bf16 views of its buffer."""
    from ml.training.engine import build_master_optimizer

    c = replace(cfg, train=replace(cfg.train, grad_accum=accum),
                deepspeed=replace(cfg.deepspeed, zero_stage=0, precision="bf16", grad_accum_dtype=accum_dtype))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = build_master_optimizer(model, list(model.parameters()), c, world)
    assert opt.grad_dtype == want
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # weight decay only on matrices (the groups build_optimizer makes)
    assert [g["weight_decay"] for g in opt.param_groups] == [c.optim.weight_decay, 0.0]
