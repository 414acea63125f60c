"""MasterAdamW (ml/training/master.py): bf16 weights, fp32 master weights and moments in flat buffers.

The reference is torch.optim.AdamW on an fp32 copy of the model fed the same gradients: the masters must follow it.
Adam is nearly invariant to the gradient's scale, so tests of scaling and averaging use a large eps, where the
update depends on the gradient's size."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ml.training.master import MasterAdamW

pytestmark = pytest.mark.unit

LAMBDAS = [1.0, 0.5, 0.0, 2.0, 0.25, 1.0, 0.7]  # LR factors per step; the 0.0 step must leave the masters unchanged


def _model(seed: int = 0, hidden: int = 16, dtype: torch.dtype = torch.bfloat16, extra: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden),
                               nn.LayerNorm(hidden), nn.Linear(hidden, 4)]
    if extra:
        layers.append(nn.Linear(4, 4))  # used or skipped by _loss(skip_last=...)
    return nn.Sequential(*layers).to(dtype)


def _groups(model: nn.Module, wd: float = 0.1) -> list[dict]:
    # matrices decay, biases and norm scales do not (the usual AdamW split; two groups with different settings)
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _params(model: nn.Module) -> list[nn.Parameter]:
    # the optimizer's parameter order (matrices first, then the rest) for comparing with master_params()
    return [p for g in _groups(model) for p in g["params"]]


def _loss(model: nn.Module, seed: int, skip_last: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 8, generator=g).to(next(model.parameters()).dtype)
    y = model[:-1](x) if skip_last else model(x)
    return (y.float() - 0.3).pow(2).mean()


def _backward(model: nn.Module, seed: int, **kw) -> list[torch.Tensor]:
    """Backward through the hooks, returning the same gradients (from the same graph) in optimizer param order."""
    loss = _loss(model, seed, **kw)
    params = _params(model)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    loss.backward()
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.get_total_norm([g.float() for g in grads])


def _reference(model: nn.Module, wd: float = 0.1, eps: float = 1e-8):
    ref = _model(dtype=torch.float32)
    with torch.no_grad():
        for r, p in zip(ref.parameters(), model.parameters()):
            r.copy_(p.float())  # bf16 -> fp32 exactly: starts equal to the masters
    opt = torch.optim.AdamW(_groups(ref, wd), lr=1e-2, eps=eps, fused=False, foreach=False)
    return ref, opt


def _lambda(step: int) -> float:
    return LAMBDAS[step % len(LAMBDAS)]


def _assert_follows(opt: MasterAdamW, model: nn.Module, ref: nn.Module) -> None:
    for m, p, r in zip(opt.master_params(), _params(model), _params(ref)):
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)
        assert m.shape == p.shape
        assert torch.equal(p.detach(), m.to(torch.bfloat16))  # the weights are the masters rounded to nearest


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [None, 3.0])
def test_follows_torch_adamw_with_lambdalr(grad_dtype, scale):
    model = _model()
    eps = 1e-8 if scale is None else 0.1  # large eps: the update then depends on the size of the (scaled) gradient
    opt = MasterAdamW(_groups(model), lr=1e-2, eps=eps, grad_dtype=grad_dtype)
    ref, ref_opt = _reference(model, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, _lambda)
    assert all(g["initial_lr"] == 1e-2 for g in opt.param_groups)
    for step in range(6):
        grads = _backward(model, seed=step)
        assert all(p.grad is None for p in model.parameters())  # the hooks moved every gradient
        if scale is not None:
            opt.grad_scale = torch.tensor([scale])
        before = [m.clone() for m in opt.master_params()]
        opt.step()
        for r, g in zip(_params(ref), grads):
            r.grad = g.float() if scale is None else g.float() / scale
        ref_opt.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        if _lambda(step) == 0.0:  # LambdaLR's lr reached the update: lr 0 moves nothing (decay is lr * wd too)
            assert all(torch.equal(a, b) for a, b in zip(before, opt.master_params()))
        else:
            assert not all(torch.equal(a, b) for a, b in zip(before, opt.master_params()))
        sched.step()
        ref_sched.step()
        _assert_follows(opt, model, ref)


def test_grad_scale_divides_the_gradients():
    # the same gradients, once divided by grad_scale inside step() and once by 4 before: the same masters
    scaled, plain = _model(), _model(seed=0)
    opt_s = MasterAdamW(_groups(scaled), lr=1e-2, eps=0.1, grad_dtype=torch.float32)
    opt_p = MasterAdamW(_groups(plain), lr=1e-2, eps=0.1, grad_dtype=torch.float32)
    _loss(scaled, 0).backward()
    (_loss(plain, 0) / 4).backward()  # a power of two: the bf16 gradients are exactly a quarter
    opt_s.grad_scale = torch.tensor(4.0)
    opt_s.step()
    opt_p.step()
    assert all(torch.equal(a, b) for a, b in zip(opt_s.master_params(), opt_p.master_params()))
    unscaled = _model()
    opt_u = MasterAdamW(_groups(unscaled), lr=1e-2, eps=0.1)
    _loss(unscaled, 0).backward()
    opt_u.step()
    assert not torch.equal(opt_u.master_params()[0], opt_s.master_params()[0])


def test_accumulation_in_fp32_adds_micro_batches():
    model = _model()
    opt = MasterAdamW(_groups(model), lr=1e-2, eps=0.1, grad_dtype=torch.float32)
    ref, ref_opt = _reference(model, eps=0.1)
    g1 = _backward(model, seed=1)
    g2 = _backward(model, seed=2)
    assert all(p.grad is None for p in model.parameters())
    summed = [a.float() + b.float() for a, b in zip(g1, g2)]
    torch.testing.assert_close(opt.grad_norm(), _norm(summed), rtol=1e-6, atol=0)
    opt.step()
    for r, g in zip(_params(ref), summed):
        r.grad = g
    ref_opt.step()
    _assert_follows(opt, model, ref)

    # one backward of the summed loss gives the same gradients up to bf16 rounding of that single pass
    one = _model()
    opt_one = MasterAdamW(_groups(one), lr=1e-2, eps=0.1, grad_dtype=torch.float32)
    (_loss(one, 1) + _loss(one, 2)).backward()
    torch.testing.assert_close(opt_one.grad_norm(), _norm(summed), rtol=1e-2, atol=0)


def test_zero_grad_makes_the_next_backward_copy():
    model = _model()
    opt = MasterAdamW(_groups(model), lr=1e-2)
    _backward(model, seed=1)
    opt.zero_grad()
    g2 = _backward(model, seed=2)
    torch.testing.assert_close(opt.grad_norm(), _norm(g2), rtol=1e-6, atol=0)

    # step() resets too: the second step sees only its own gradients
    ref, ref_opt = _reference(model)
    opt.step()
    for r, g in zip(_params(ref), g2):
        r.grad = g.float()
    ref_opt.step()
    g3 = _backward(model, seed=3)
    opt.step()
    for r, g in zip(_params(ref), g3):
        r.grad = g.float()
    ref_opt.step()
    _assert_follows(opt, model, ref)


def test_grad_norm():
    model = _model()
    opt = MasterAdamW(_groups(model), lr=1e-2)
    assert opt.grad_norm().item() == 0.0 and opt.grad_norm().dtype == torch.float32
    grads = _backward(model, seed=5)
    norm = opt.grad_norm()
    assert norm.ndim == 0 and norm.dtype == torch.float32 and norm.item() > 0
    torch.testing.assert_close(norm, _norm(grads), rtol=1e-6, atol=0)
    opt.step()
    assert opt.grad_norm().item() == 0.0


def test_a_parameter_without_gradient_gets_no_stale_one():
    model = _model(extra=True)
    opt = MasterAdamW(_groups(model), lr=1e-2)
    _backward(model, seed=1)  # the extra layer gets a gradient here
    opt.step()
    grads = _backward(model, seed=2, skip_last=True)  # ... and none here: its slice must not keep the old one
    torch.testing.assert_close(opt.grad_norm(), _norm(grads), rtol=1e-6, atol=0)


def test_state_dict_round_trip_is_bit_exact(tmp_path):
    def build(seed: int):
        model = _model(seed=seed)
        opt = MasterAdamW(_groups(model), lr=1e-2, weight_decay=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, _lambda)

    def train(model, opt, sched, steps):
        for s in steps:
            _loss(model, s).backward()
            opt.step()
            sched.step()

    model, opt, sched = build(0)
    train(model, opt, sched, range(3))
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)

    model2, opt2, sched2 = build(1)  # other initial weights: everything must come from the checkpoint
    sd = torch.load(path, weights_only=False)
    opt2.load_state_dict(sd["optimizer"])
    sched2.load_state_dict(sd["scheduler"])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    train(model, opt, sched, range(3, 5))
    train(model2, opt2, sched2, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(opt.master_params(), opt2.master_params()))
    assert opt.state_dict()["flat"][0]["step"] == opt2.state_dict()["flat"][0]["step"] == 5

    other = _model(hidden=12)
    with pytest.raises(ValueError, match=r"param group 0 does not match.*\(12, 8\)"):
        MasterAdamW(_groups(other)).load_state_dict(torch.load(path, weights_only=False)["optimizer"])
    with pytest.raises(ValueError, match="not saved by MasterAdamW"):
        opt2.load_state_dict(torch.optim.AdamW(_model(dtype=torch.float32).parameters()).state_dict())


def test_an_empty_group_is_skipped():
    model = _model()
    opt = MasterAdamW([{"params": list(model.parameters())}, {"params": [], "weight_decay": 0.0}], lr=1e-2)
    grads = _backward(model, seed=1)
    torch.testing.assert_close(opt.grad_norm(), _norm(grads), rtol=1e-6, atol=0)
    opt.step()
    assert [f["step"] for f in opt.state_dict()["flat"]] == [1, 0]


def test_only_bf16_trainable_params_are_accepted():
    with pytest.raises(ValueError, match=r"torch.float32.*bf16 weights"):
        MasterAdamW(_model(dtype=torch.float32).parameters())
    frozen = _model()
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        MasterAdamW(frozen.parameters())


def test_params_become_views_of_one_buffer_and_compile_sees_updates():
    model = _model()
    ids = [id(p) for p in model.parameters()]
    values = [p.detach().clone() for p in model.parameters()]
    opt = MasterAdamW(_groups(model), lr=1e-2)
    assert [id(p) for p in model.parameters()] == ids and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
    storages = {p.untyped_storage().data_ptr() for p in _groups(model)[0]["params"]}
    assert len(storages) == 1  # one flat buffer per group: the update writes every weight in one pass

    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(3, 8).to(torch.bfloat16)
    compiled(x).float().pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters()) and opt.grad_norm().item() > 0
    opt.step()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))  # the compiled module reads the updated weights in place


def test_sync_masters_after_a_weights_only_load_and_replaced_params_are_caught():
    model = _model()
    opt = MasterAdamW(_groups(model), lr=1e-2)
    model.load_state_dict(_model(seed=7).state_dict())  # in place: the params stay views of the flat buffer
    assert not torch.equal(opt.master_params()[0], _params(model)[0].float())
    opt.sync_masters()
    assert all(torch.equal(m, p.float()) for m, p in zip(opt.master_params(), _params(model)))

    model.to("cpu")  # what deepspeed.initialize does: already there, so the params stay views
    _loss(model, 0).backward()
    opt.step()
    model.float()  # replaces every p.data: the optimizer's writes would no longer reach the model
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="was replaced after the optimizer was built"):
        opt.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # one thread, as the reference below: a bf16 CPU matmul's rounding depends on how its sums are split over threads
    torch.set_num_threads(1)
    try:
        model = _model()
        opt = MasterAdamW(_groups(model), lr=1e-2, eps=0.1, grad_dtype=torch.float32)
        _loss(model, seed=10 + rank).backward()
        opt.all_reduce_grads()
        norm = opt.grad_norm()
        opt.grad_scale = torch.tensor(1.5)
        opt.step()
        if rank == 0:
            torch.save({"norm": norm, "masters": opt.master_params()}, out)
    finally:
        # leave together: a rank that tears gloo down while its peer still holds the pair can abort at exit
        # ("terminate called without an active exception", one run in a few under pytest)
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_all_reduce_averages_two_ranks(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)

    model = _model()
    threads = torch.get_num_threads()  # an earlier test in this process may have changed it: pin it like the ranks
    torch.set_num_threads(1)
    try:
        g0, g1 = _backward(model, seed=10), _backward(model, seed=11)
    finally:
        torch.set_num_threads(threads)
    mean = [(a.float() + b.float()) / 2 for a, b in zip(g0, g1)]
    torch.testing.assert_close(got["norm"], _norm(mean), rtol=1e-6, atol=0)
    ref, ref_opt = _reference(model, eps=0.1)
    for r, g in zip(_params(ref), mean):
        r.grad = g / 1.5
    ref_opt.step()
    for m, r in zip(got["masters"], _params(ref)):
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)


def test_without_process_group_all_reduce_does_nothing():
    model = _model()
    opt = MasterAdamW(_groups(model), lr=1e-2)
    grads = _backward(model, seed=1)
    opt.all_reduce_grads()
    torch.testing.assert_close(opt.grad_norm(), _norm(grads), rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_matches_the_torch_fallback(grad_dtype):
    pytest.importorskip("triton")
    # sizes that leave a masked tail in the last block, two groups, grad_scale and an lr schedule
    shapes = [(1000, 37), (4097,), (3, 5, 7), (1,)]
    torch.manual_seed(0)
    base = [torch.randn(s).to(torch.bfloat16) for s in shapes]

    def build(device: str):
        ps = [nn.Parameter(b.clone().to(device)) for b in base]
        opt = MasterAdamW([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:]}], lr=1e-3, eps=1e-6,
                          grad_dtype=grad_dtype)
        return ps, opt, torch.optim.lr_scheduler.LambdaLR(opt, _lambda)

    gpu, cpu = build("cuda"), build("cpu")
    for step in range(4):
        grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
        for (ps, opt, sched), dev in ((gpu, "cuda"), (cpu, "cpu")):
            (sum((p.float() * g.to(dev).float()).sum() for p, g in zip(ps, grads))).backward()
            opt.grad_scale = torch.tensor(1.25, device=dev)
            opt.step()
            sched.step()
    for a, b in zip(gpu[1].master_params(), cpu[1].master_params()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    for a, m, b in zip(gpu[0], gpu[1].master_params(), cpu[0]):
        assert torch.equal(a, m.to(torch.bfloat16))  # the kernel rounds to nearest even, as torch's copy_ does
        # at most one bf16 ulp apart where the fp32 masters straddle a rounding boundary
        torch.testing.assert_close(a.detach().cpu().float(), b.detach().float(), rtol=8e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_reaches_past_2_to_the_31_elements():
    pytest.importorskip("triton")
    # the 3 B-parameter DiT's decayed group is larger than int32 offsets reach (~47 GB of GPU memory here)
    p = nn.Parameter(torch.zeros(2**31 + 5, dtype=torch.bfloat16, device="cuda"))
    opt = MasterAdamW([p], lr=1e-3)
    p.sum().backward()  # gradient 1 everywhere: Adam's first step moves every weight by -lr
    opt.step()
    master = opt.master_params()[0]
    assert torch.allclose(master, torch.full((), -1e-3, device="cuda"), rtol=1e-5, atol=0)
    assert torch.equal(p[-5:], master[-5:].to(torch.bfloat16))
