"""AdamW for bf16 weights with fp32 master weights and moments in flat buffers, updated in one memory pass.

Why it exists: at ZeRO-0 on one H100 the refine DiT (3.05 B parameters) trained with fp32 weights under bf16
autocast pays ~25 ms per step for casting the weights to bf16 in forward and the gradients back to fp32 in backward,
and torch's fused AdamW plus a separate clipping pass costs 47 ms, about twice what its memory traffic needs.
Here the module's weights are bf16 (no casts), the fp32 copies live only in this optimizer, and one Triton kernel
per param group reads grad, master, exp_avg and exp_avg_sq once and writes master, both moments and the bf16
weights (28 bytes per parameter with bf16 grads, ~85 GB for 3.05 B: ~28 ms at H100 bandwidth).

    opt = MasterAdamW(groups, lr=1e-4, grad_dtype=torch.float32)  # fp32 grads when accumulating micro-batches
    loss.backward()                 # hooks move each p.grad into the flat grad buffer, p.grad stays None
    opt.all_reduce_grads()          # only with several ranks; the 1/world_size is folded into the update
    opt.grad_scale = torch.clamp(opt.grad_norm() / max_norm, min=1.0)   # clipping, no host sync
    opt.step(); opt.zero_grad()

Gradients are collected by post-accumulate-grad hooks: the first gradient of a parameter after a zero is copied
into its slice of the flat buffer, later ones (accumulation) are added, so there is no zeroing pass. A parameter
whose gradient did not arrive has its slice zeroed before the buffer is used (so a stale gradient is never applied);
unlike torch's AdamW, which skips such a parameter, it is then updated with a zero gradient (its moments decay and
weight decay applies) unless no parameter of its group got a gradient, in which case the group is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch fallback below does the same math
    triton = None

# Elements per Triton program: 4096 fp32 lanes keep enough bytes in flight per SM for a bandwidth-bound kernel.
_BLOCK = 4096
# The fallback works in chunks so its fp32 temporaries stay small (the flat buffers can hold billions of elements).
_FALLBACK_CHUNK = 1 << 24


if triton is not None:

    @triton.jit
    def _adamw_kernel(grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, param_ptr, scale_ptr, n_elements,
                      decay, beta1, beta2, step_size, bias_correction2_sqrt, eps, divisor, BLOCK: tl.constexpr):
        # int64 offsets: a group of the 3 B-parameter DiT has more than 2**31 elements
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        # scale_ptr holds grad_scale (clipping), divisor the world size of a SUM all-reduce: both divide the grad
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) / (tl.load(scale_ptr) * divisor)
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        # the same order of operations as torch.optim.AdamW's single-tensor path
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        p = p - step_size * (m / denom)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        # fp32 -> bf16 rounds to nearest even, as torch's copy_ does
        tl.store(param_ptr + offs, p.to(tl.bfloat16), mask=mask)


class _FlatGroup:
    """The flat buffers of one param group and where each parameter lives in them."""

    def __init__(self, params: list[nn.Parameter], grad_dtype: torch.dtype, device: torch.device) -> None:
        self.params = params
        self.shapes = [tuple(p.shape) for p in params]
        self.offsets: list[int] = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        # The bf16 weights become views of one buffer so the kernel writes them all in its single pass.
        self.param_flat = torch.empty(n, dtype=torch.bfloat16, device=device)
        for p, off in zip(params, self.offsets):
            view = self.param_flat[off:off + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view(p.shape)  # the nn.Parameter object (and its requires_grad) stays the same
        # where each weight must stay: checked every step (~0.1 ms per 1000 params on the host)
        self.ptrs = [p.data_ptr() for p in params]
        # bf16 -> fp32 is exact, so the masters start equal to the weights
        self.master = self.param_flat.float()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        # zeros, not empty: a slice whose gradient never arrives must not feed NaN garbage into the norm
        self.grad = torch.zeros(n, dtype=grad_dtype, device=device)
        self.step = 0
        # indices of the parameters whose slice of self.grad holds a current gradient (copy first, then add)
        self.seen: set[int] = set()

    def grad_slice(self, i: int) -> torch.Tensor:
        return self.grad[self.offsets[i]:self.offsets[i] + self.params[i].numel()]

    def master_view(self, i: int) -> torch.Tensor:
        return self.master[self.offsets[i]:self.offsets[i] + self.params[i].numel()].view(self.shapes[i])

    def check_views(self) -> None:
        """Raise if a parameter no longer lives in the flat buffer (the update would not reach the model)."""
        for i, (p, ptr) in enumerate(zip(self.params, self.ptrs)):
            if p.data_ptr() != ptr or p.dtype != torch.bfloat16:
                raise RuntimeError(f"MasterAdamW: parameter {i} (shape {self.shapes[i]}) was replaced after the "
                                   f"optimizer was built (it is now {p.dtype} on {p.device}, not a view of the flat "
                                   "bf16 buffer): move and cast the model (.to(device, torch.bfloat16)) before "
                                   "building MasterAdamW, or the optimizer's updates would not reach it")

    def fill_missing(self) -> None:
        """Zero the slices of parameters that got no gradient since the last zero, so none holds a stale one."""
        if len(self.seen) == len(self.params):
            return
        for i in range(len(self.params)):
            if i not in self.seen:
                self.grad_slice(i).zero_()
                self.seen.add(i)


class MasterAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update on fp32 master copies of bf16 parameters (see the module docstring).

    Set `grad_scale` (a 1-element float32 tensor on the params' device) before step() to divide the gradients by it,
    as torch's fused AdamW does with GradScaler; None means 1."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 grad_dtype: torch.dtype = torch.bfloat16) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"MasterAdamW: invalid lr {lr} (must be >= 0)")
        if not 0.0 <= eps:
            raise ValueError(f"MasterAdamW: invalid eps {eps} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"MasterAdamW: invalid betas {betas} (each must be in [0, 1))")
        if grad_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"MasterAdamW: grad_dtype must be torch.bfloat16 or torch.float32, got {grad_dtype}")
        self._flat: list[_FlatGroup] = []
        self._built = False
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_dtype = grad_dtype
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) != 1:
            raise ValueError(f"MasterAdamW: all parameters must be on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.grad_scale: torch.Tensor | None = None
        # >1 after a SUM all-reduce: the update and grad_norm() divide by it instead of spending a pass on it
        self._divisor = 1
        self._one = torch.ones((), dtype=torch.float32, device=self.device)
        for group in self.param_groups:
            self._flat.append(_FlatGroup(group["params"], grad_dtype, self.device))
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(flat, i))
                       for flat in self._flat for i, p in enumerate(flat.params)]
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._built:
            raise RuntimeError("MasterAdamW: add_param_group after construction is not supported (the flat buffers "
                               "are built once); pass every group to the constructor")
        params = param_group["params"]
        param_group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not isinstance(p, torch.Tensor) or p.dtype != torch.bfloat16 or not p.requires_grad or not p.is_leaf:
                found = (f"{p.dtype} tensor of shape {tuple(p.shape)} (requires_grad={p.requires_grad}, "
                         f"leaf={p.is_leaf})" if isinstance(p, torch.Tensor) else type(p).__name__)
                raise ValueError(f"MasterAdamW: every parameter must be a bfloat16 leaf that requires grad, found a "
                                 f"{found}. Precision bf16 at ZeRO-0 needs bf16 weights: cast the model with "
                                 f".to(torch.bfloat16) before building the optimizer, and pass only trainable params")
        super().add_param_group(param_group)

    def _make_hook(self, flat: _FlatGroup, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            if g is None:
                return
            dst = flat.grad_slice(i).view(flat.shapes[i])
            with torch.no_grad():  # even under create_graph the buffer must not join the graph
                if i in flat.seen:
                    dst.add_(g)
                else:
                    dst.copy_(g)
                    flat.seen.add(i)
            # the flat buffer is the only copy: no per-parameter gradient memory stays alive
            p.grad = None
        return hook

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: the next hook call of each parameter copies instead of adding (nothing is written)."""
        for flat in self._flat:
            flat.seen.clear()
        self._divisor = 1

    def _any_grad(self) -> bool:
        return any(flat.seen for flat in self._flat)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (averaged, unscaled by grad_scale) gradients, a 0-d float32 tensor; 0 if none."""
        if not self._any_grad():
            return torch.zeros((), dtype=torch.float32, device=self.device)
        views = []
        for flat in self._flat:
            flat.fill_missing()
            views += [flat.grad_slice(i) for i in range(len(flat.params))]
        # fp32 accumulation straight from the bf16 buffer: vector_norm(dtype=float32) would first write a float32
        # copy of all 3 B gradients (12 GB more at the peak and ~10 ms on the H100, measured)
        norms = torch._foreach_norm(views, 2.0, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        return total / self._divisor if self._divisor != 1 else total

    @torch.no_grad()
    def all_reduce_grads(self, group: dist.ProcessGroup | None = None) -> None:
        """SUM-all-reduce the flat gradients over `group` (every rank must call it); step() and grad_norm() then
        divide by the world size. Does nothing without an initialised process group of more than one rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        if world <= 1:
            return
        for flat in self._flat:
            # every rank reduces every slice, so stale slices must be zeroed even on a rank that saw no gradient
            flat.fill_missing()
            dist.all_reduce(flat.grad, op=dist.ReduceOp.SUM, group=group)
        self._divisor = world

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._one
        if self.grad_scale is not None:
            if self.grad_scale.device != self.device or self.grad_scale.numel() != 1:
                raise ValueError(f"MasterAdamW: grad_scale must be one float on {self.device}, got "
                                 f"{tuple(self.grad_scale.shape)} on {self.grad_scale.device}")
            scale = self.grad_scale.reshape(()).to(torch.float32)
        for group, flat in zip(self.param_groups, self._flat):
            if not flat.seen:
                continue  # no gradient in this group since the last zero (or no params): torch's AdamW skips it too
            # Module.to()/.float() after construction replaces p.data: the update would silently miss the model
            flat.check_views()
            flat.fill_missing()
            flat.step += 1
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            beta1, beta2 = group["betas"]
            bias_correction1 = 1 - beta1 ** flat.step
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** flat.step)
            args = (1 - lr * wd, beta1, beta2, lr / bias_correction1, bias_correction2_sqrt, float(group["eps"]))
            if triton is not None and flat.master.is_cuda:
                grid = (triton.cdiv(flat.numel, _BLOCK),)
                _adamw_kernel[grid](flat.grad, flat.master, flat.exp_avg, flat.exp_avg_sq, flat.param_flat, scale,
                                    flat.numel, *args, float(self._divisor), BLOCK=_BLOCK)
            else:
                _fallback_update(flat, scale, self._divisor, self.grad_scale is not None, *args)
        self.zero_grad()
        return loss

    def master_params(self) -> list[torch.Tensor]:
        """fp32 views of the master weights, one per parameter in param-group order, shaped like the parameter."""
        return [flat.master_view(i) for flat in self._flat for i in range(len(flat.params))]

    @torch.no_grad()
    def sync_masters(self) -> None:
        """Set the masters from the current bf16 weights, for weights written into the module after construction
        without this optimizer's state (DeepSpeed's broadcast from rank 0 at initialize, a weights-only load).
        The masters' low bits are lost: after a full checkpoint use load_state_dict instead."""
        for flat in self._flat:
            flat.check_views()
            flat.master.copy_(flat.param_flat)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters as torch's (params as indices) plus the flat fp32 state per group. The tensors are the
        live buffers, not copies (as with torch's optimizers): a copy would double 12 bytes per parameter."""
        groups, flats, index = [], [], 0
        for group, flat in zip(self.param_groups, self._flat):
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = list(range(index, index + len(flat.params)))
            index += len(flat.params)
            groups.append(g)
            flats.append({"step": flat.step, "shapes": list(flat.shapes), "master": flat.master,
                          "exp_avg": flat.exp_avg, "exp_avg_sq": flat.exp_avg_sq})
        return {"state": {}, "param_groups": groups, "flat": flats}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what state_dict() returned (checked against this optimizer's parameters first) and write the bf16
        weights from the loaded masters, so a resumed run continues bit for bit."""
        if "flat" not in state_dict:
            raise ValueError("MasterAdamW.load_state_dict: no 'flat' entry -- this state was not saved by MasterAdamW "
                             "(e.g. a torch.optim.AdamW checkpoint from an fp32 run); resume with the same precision")
        groups, flats = state_dict["param_groups"], state_dict["flat"]
        if len(groups) != len(self.param_groups) or len(flats) != len(self._flat):
            raise ValueError(f"MasterAdamW.load_state_dict: the checkpoint has {len(flats)} param groups, this "
                             f"optimizer {len(self._flat)}")
        for gi, (saved, flat) in enumerate(zip(flats, self._flat)):
            shapes = [tuple(s) for s in saved["shapes"]]
            if shapes != flat.shapes:
                diff = next((i for i, (a, b) in enumerate(zip(shapes, flat.shapes)) if a != b), min(len(shapes),
                                                                                                   len(flat.shapes)))
                raise ValueError(f"MasterAdamW.load_state_dict: param group {gi} does not match: the checkpoint has "
                                 f"{len(shapes)} params, this model {len(flat.shapes)}; first difference at param "
                                 f"{diff}: checkpoint {shapes[diff] if diff < len(shapes) else None} vs model "
                                 f"{flat.shapes[diff] if diff < len(flat.shapes) else None}")
            for key in ("master", "exp_avg", "exp_avg_sq"):
                t = saved[key]
                if t.dtype != torch.float32 or t.numel() != flat.numel:
                    raise ValueError(f"MasterAdamW.load_state_dict: param group {gi} '{key}' is {t.dtype} with "
                                     f"{t.numel()} elements, expected float32 with {flat.numel}")
        for gi, (saved, flat, group) in enumerate(zip(flats, self._flat, self.param_groups)):
            flat.check_views()
            flat.master.copy_(saved["master"])
            flat.exp_avg.copy_(saved["exp_avg"])
            flat.exp_avg_sq.copy_(saved["exp_avg_sq"])
            flat.step = int(saved["step"])
            flat.param_flat.copy_(flat.master)
            # hyperparameters (lr, initial_lr of LambdaLR, ...) come from the checkpoint, as in torch
            group.update({k: v for k, v in groups[gi].items() if k != "params"})
        self.zero_grad()


def _fallback_update(flat: _FlatGroup, scale: torch.Tensor, divisor: int, scaled: bool, decay: float, beta1: float,
                     beta2: float, step_size: float, bias_correction2_sqrt: float, eps: float) -> None:
    """The kernel's math with torch ops (CPU, or no Triton), chunk by chunk to bound the fp32 temporaries."""
    div = scale * divisor if divisor != 1 else scale
    for start in range(0, flat.numel, _FALLBACK_CHUNK):
        sl = slice(start, min(start + _FALLBACK_CHUNK, flat.numel))
        g = flat.grad[sl]
        if scaled or divisor != 1:
            g = g.float() / div
        elif g.dtype != torch.float32:
            g = g.float()
        p, m, v = flat.master[sl], flat.exp_avg[sl], flat.exp_avg_sq[sl]
        # torch.optim.AdamW (single-tensor): decoupled decay, lerp for m, addcmul for v, eps after the corrected sqrt
        p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        flat.param_flat[sl].copy_(p)
