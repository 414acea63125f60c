"""RefineDiT: UltraShape 1.0's refine diffusion transformer, in our own code.

Weight-compatible with the `dit` part of the released checkpoint (parameter names and shapes are
the official ones, see tests/data/official/dit_keys.json). What it computes, per step:

    tokens = [timestep token, x_embedder(latents)]                       # (B, 1+N, C)
    21 blocks: (long skip from block depth-1-i, for i > depth//2) -> self-attention with 3-D RoPE
               on integer voxel indices -> cross-attention to DINOv2 tokens -> MLP or MoE (last 6)
    final_layer drops the timestep token and projects back to the latent width: velocity (B, N, 64)

Two details are easy to get wrong and change every number:
- Heads are not a plain split of each projection. The official code concatenates q, k and v
  along channels and reshapes that to (heads, 3 * head_dim): head h reads channels
  [3*hd*h, 3*hd*(h+1)) of the concatenation, whose first third is "its" q, etc. So for most heads
  "q" actually comes from the k or v projection's weights. We reproduce that layout (it is what the
  checkpoint was trained with); see `_interleaved_heads`.
- RoPE runs on the timestep token too, with angle 0 (cos=1, sin=0), and uses `rotate_half`
  (first half / second half of head_dim, not even/odd pairs), frequencies split 42/42/44 over x/y/z
  for head_dim 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RefineDiTConfig:
    in_channels: int = 64  # latent width (the VAE's embed_dim)
    hidden_size: int = 2048  # token width C
    context_dim: int = 1024  # width of the image tokens (DINOv2-L hidden size)
    depth: int = 21  # number of blocks; blocks > depth//2 take a long skip
    num_heads: int = 16  # head_dim = hidden_size / num_heads (128 officially; must be a multiple of 8)
    qkv_bias: bool = False  # bias on to_q/to_k/to_v (off in the release)
    qk_norm: bool = True  # RMS norm over head_dim on q and k, eps 1e-6
    num_moe_layers: int = 6  # the last N blocks use a mixture of experts instead of the MLP
    num_experts: int = 8  # routed experts per MoE block (plus one shared expert)
    moe_top_k: int = 2  # experts per token; gate weights are the raw softmax probabilities (not renormalised)
    moe_aux_loss_alpha: float = 0.01  # load-balancing loss weight (official value), only in training
    rope_theta: float = 10000.0  # RoPE base

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"dit.hidden_size ({self.hidden_size}) must be divisible by dit.num_heads ({self.num_heads})")
        hd = self.hidden_size // self.num_heads
        if hd % 8 or hd > 128:
            raise ValueError(f"dit head_dim = hidden_size/num_heads = {hd} must be a multiple of 8 and <= 128")
        if not 0 <= self.num_moe_layers <= self.depth:
            raise ValueError(f"dit.num_moe_layers ({self.num_moe_layers}) must be in [0, depth={self.depth}]")
        if not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"dit.moe_top_k ({self.moe_top_k}) must be in [1, num_experts={self.num_experts}]")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _interleaved_heads(parts: list[torch.Tensor], num_heads: int) -> list[torch.Tensor]:
    """The official head layout: concat the projections on channels, view as (..., H, n*hd), split.

    parts: n tensors (B, T, C). Returns n tensors (B, H, T, hd).
    """
    B, T, C = parts[0].shape
    n = len(parts)
    hd = C // num_heads
    cat = _joined(parts)
    if cat is None:
        cat = torch.cat(parts, dim=-1)
    cat = cat.view(B, T, num_heads, n * hd)
    return [p.transpose(1, 2) for p in cat.split(hd, dim=-1)]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The contiguous tensor that `parts` are consecutive last-dim slices of (as `fused.split(C, -1)` returns
    them), or None. Lets the fused q/k/v projection skip a copy that would rebuild exactly that tensor."""
    if torch.compiler.is_compiling():
        return None  # no storage to inspect while tracing; the compiler removes the copy itself
    base = parts[0]._base
    if base is None or not base.is_contiguous() or base.shape[:-1] != parts[0].shape[:-1]:
        return None
    if base.shape[-1] != sum(p.shape[-1] for p in parts):
        return None
    off = base.data_ptr()
    for p in parts:
        if p._base is not base or p.data_ptr() != off or p.stride() != base.stride():
            return None
        off += p.shape[-1] * p.element_size()
    return base


def rope_tables(voxel_idx: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (B, 1, 1+N, head_dim) in `dtype`, for the timestep token (angle 0) + N voxel tokens:
    what apply_rope takes. Built once per forward in the dtype q and k have (bf16 under autocast), so the 21
    blocks do not each re-cast or broadcast them."""
    cos, sin = rope_3d(voxel_idx, head_dim, theta)
    cos = torch.cat([torch.ones_like(cos[:, :1]), cos], dim=1)
    sin = torch.cat([torch.zeros_like(sin[:, :1]), sin], dim=1)
    half = head_dim // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's sign, folded into the table
    return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos / signed sin (B, 1, T, hd) from rope_tables, in x's dtype.

    rotate_half(x) * sin = [-x2 | x1] * [s1 | s2] = roll(x, hd/2) * [-s1 | s2]: one roll and one fused
    multiply-add instead of float32 copies, a negation and a concatenation (the same numbers in float32; under
    bf16 autocast the rotation now runs in bf16, as the attention that consumes it does)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def _qk_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMS norm in x's dtype: under autocast the fp32 weight would make torch fall back from its fused kernel to
    a float32 composite (several passes over q and k, and float32 outputs); the weight is cast instead."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)
    return norm(x)


def rope_3d(voxel_idx: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, N, head_dim) float32 for integer voxel indices (B, N, 3).

    head_dim is split into x/y/z thirds (z takes the remainder); each third gets the usual
    1/theta^(2i/d) frequencies, and the angle vector is duplicated for rotate_half.
    """
    dx = dy = head_dim // 3
    dz = head_dim - dx - dy
    dev = voxel_idx.device
    args = []
    for axis, d in enumerate((dx, dy, dz)):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, device=dev).float() / d))  # (d/2,)
        args.append(voxel_idx[..., axis].float().unsqueeze(-1) * freqs)  # (B, N, d/2)
    a = torch.cat(args, dim=-1)
    a = torch.cat([a, a], dim=-1)  # (B, N, head_dim)
    return a.cos(), a.sin()


def _norm_rope(q, k, cos, sin, q_norm: nn.Module, k_norm: nn.Module):
    """RMS q/k norm then RoPE: the elementwise work between the qkv matmul and attention
    (what torch.compile fuses into one pass when RefineDiT.compile_kernels() is on)."""
    return apply_rope(_qk_norm(q_norm, q), cos, sin), apply_rope(_qk_norm(k_norm, k), cos, sin)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)
        self.norm_rope = _norm_rope  # swapped for a compiled version by RefineDiT.compile_kernels()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # one matmul for q, k and v (same result as three; the interleave happens after)
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        b = None if self.to_q.bias is None else torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        q, k, v = _interleaved_heads(list(F.linear(x, w, b).split(C, dim=-1)), self.num_heads)  # (B, H, T, hd)
        q, k = self.norm_rope(q, k, cos, sin, self.q_norm, self.k_norm)
        y = F.scaled_dot_product_attention(q, k, v)  # flash / efficient kernel on GPU
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None,
                live: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); ctx (B, S, Cc); ctx_mask (B, S) bool, True = real token (None: all real).

        live: indices of the rows whose context is not all zeros, or None (all). A zero context (the
        unconditional CFG branch, a CFG-dropped sample) has zero values when to_v has no bias, so its
        attention output is exactly 0 and the block returns out_proj's bias: we skip computing it."""
        B, T, C = x.shape
        if live is not None and self.to_v.bias is None:
            out = self.out_proj.bias.to(x.dtype).expand(B, T, C).clone()
            if live.numel():
                out[live] = self.forward(x[live], ctx[live], None if ctx_mask is None else ctx_mask[live])
            return out
        q = self.to_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # plain split for q
        # k and v from one matmul (as for self-attention), then the interleaved head layout
        w = torch.cat([self.to_k.weight, self.to_v.weight])
        b = None if self.to_k.bias is None else torch.cat([self.to_k.bias, self.to_v.bias])
        k, v = _interleaved_heads(list(F.linear(ctx, w, b).split(C, dim=-1)), self.num_heads)
        q, k = _qk_norm(self.q_norm, q), _qk_norm(self.k_norm, k)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * 4)
        self.fc2 = nn.Linear(dim * 4, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _GELUProj(nn.Module):
    """Named like diffusers' GELU block (`net.0.proj`) so expert keys match the checkpoint."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """Expert MLP: keys `net.0.proj` and `net.2` (net.1 is a parameter-free dropout slot)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class _InjectAuxLoss(torch.autograd.Function):
    """Return x unchanged; in backward, give `loss` a gradient of 1 (the official way of adding
    the MoE load-balancing loss to whatever loss is backpropagated through x)."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


class _Permute(torch.autograd.Function):
    """rows of x in the order `idx` (a permutation); backward gathers with the inverse permutation `inv`."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


class _Dispatch(torch.autograd.Function):
    """Row j of the output is x[idx[j] // k] (each of N rows sent to k slots, in the order idx). Backward: the
    inverse permutation, then the sum over each row's k slots (a gather and a reduction, no atomics)."""

    @staticmethod
    def forward(ctx, x, idx, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, torch.div(idx, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        g = grad.index_select(0, inv)
        return g.view(-1, ctx.k, g.shape[-1]).sum(dim=1), None, None, None


class MoEGate(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class MoE(nn.Module):
    """Top-k routed experts + one always-on shared expert (DeepSeek-style), official semantics:
    softmax over experts, top-k, weights NOT renormalised, aux loss = alpha * sum(P_i * f_i * E)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, aux_alpha: float):
        super().__init__()
        self.top_k, self.aux_alpha = top_k, aux_alpha
        self.experts = nn.ModuleList([FeedForward(dim, dim * 4) for _ in range(num_experts)])
        self.gate = MoEGate(dim, num_experts)
        self.shared_experts = FeedForward(dim, dim * 4)
        self.aux_loss: torch.Tensor | None = None  # set in training forwards, for logging
        # True: call every expert even with no tokens routed to it (zero rows, zero gradient), so that
        # every data-parallel rank fires the same gradient hooks in the same order (the grouped path always does)
        self.every_expert = False
        # How the routed experts run: "grouped" = two grouped GEMMs over all experts (torch._grouped_mm; no host
        # sync, no per-expert slicing, compilable), "loop" = one matmul pair per expert; "auto" = grouped for bf16
        # on CUDA when gradients flow (H100: MoE forward + backward 12.5 -> 6.3 ms at 8k tokens, mostly the slices'
        # backward), loop elsewhere: the forward alone is no faster grouped (refine: 16.3 vs 14.5 ms at 2x32k
        # tokens), and float32 keeps parity with the official per-expert loop (bench/probe_kernels.py)
        self.experts_impl: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, in_dtype = x.shape, x.dtype
        if torch.is_autocast_enabled(x.device.type):
            # the gate, the experts and the shared expert would each cast x (a float32 LayerNorm output under
            # autocast) to bf16; casting once gives the same bf16 inputs and halves the dispatch copies below
            x = x.to(torch.get_autocast_dtype(x.device.type))
        N, C, k = x[..., 0].numel(), shape[-1], self.top_k
        flat = x.reshape(N, C)
        scores = F.linear(flat, self.gate.weight).softmax(dim=-1)  # (N, E)
        topk_w, topk_idx = torch.topk(scores, k, dim=-1)  # (N, k)
        # Sorted dispatch: the N*k (token, slot) pairs ordered by expert, so each expert runs one dense matmul
        # on a contiguous slice. Moving rows in and out is a pure permutation (_Permute), whose backward is the
        # inverse permutation: gathers only, no scatter-add (index_add_ / x[idx] backward use atomics).
        order = topk_idx.flatten().argsort()
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(topk_idx.flatten(), minlength=len(self.experts))
        xs = _Dispatch.apply(flat, order, inv, k)  # (N*k, C): token order[j] // k's row, grouped by expert
        grouped = self.experts_impl == "grouped" or (
            self.experts_impl == "auto" and x.is_cuda and x.dtype == torch.bfloat16 and torch.is_grad_enabled())
        if grouped:
            ys = _Permute.apply(self._experts_grouped(xs, counts), inv, order).view(N, k, -1)
            # the second layer's bias, sum_k w_k * b2[e_k], as one small float32 matmul: gate weights scattered
            # into (N, E) (backward: a gather, and G^T @ grad for the bias -- no atomics)
            gates = torch.zeros(N, len(self.experts), device=x.device, dtype=torch.float32)
            gates = gates.scatter(1, topk_idx, topk_w.float())
            b2 = torch.stack([e.net[2].bias for e in self.experts]).float()
            with torch.autocast(x.device.type, enabled=False):
                bias = gates @ b2  # (N, C)
            y = ((ys * topk_w.unsqueeze(-1).to(in_dtype)).sum(dim=1) + bias.to(in_dtype)).view(shape)
        else:
            outs, start = [], 0
            for e, n in enumerate(counts.tolist()):  # the one host sync
                if n or self.every_expert:
                    outs.append(self.experts[e](xs[start:start + n]))
                start += n
            ys = _Permute.apply(torch.cat(outs), inv, order).view(N, k, -1)  # back to (token, slot) order
            # weighted sum over the k slots (gate weights not renormalised), in the input's dtype (float32 under
            # autocast, as the scatter-add buffer was before)
            y = (ys * topk_w.unsqueeze(-1).to(in_dtype)).sum(dim=1).view(shape)  # promotes bf16 ys to in_dtype
        if self.training and self.aux_alpha > 0:
            E = len(self.experts)
            f = F.one_hot(topk_idx.flatten(), E).float().mean(0) * E  # fraction routed, times E
            aux = (scores.float().mean(0) * f).sum() * self.aux_alpha
            self.aux_loss = aux.detach()
            y = _InjectAuxLoss.apply(y, aux)
        return y + self.shared_experts(x)

    def _experts_grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every routed expert's GELU MLP on its slice of the expert-sorted rows xs (R, C), WITHOUT the second
        layer's bias (forward() adds it after the gate weighting): two grouped GEMMs whose group boundaries
        are the running sums of `counts` (stay on the device: no host sync). The first layer's bias rides in
        the GEMM as an extra input column of ones (padded to 8 columns for aligned rows), so it needs neither a
        per-row bias tensor nor a scatter-add in backward."""
        R, C = xs.shape
        dt = xs.dtype
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w1 = torch.stack([e.net[0].proj.weight for e in self.experts]).to(dt)  # (E, inner, C)
        b1 = torch.stack([e.net[0].proj.bias for e in self.experts]).to(dt)  # (E, inner)
        pad = 8
        w1 = torch.cat([w1, b1.unsqueeze(-1), w1.new_zeros(w1.shape[0], w1.shape[1], pad - 1)], dim=-1)
        ones = torch.zeros(R, pad, device=xs.device, dtype=dt)
        ones[:, 0] = 1
        h = F.gelu(torch._grouped_mm(torch.cat([xs, ones], dim=-1), w1.transpose(1, 2), offs=offs))
        w2 = torch.stack([e.net[2].weight for e in self.experts]).to(dt)  # (E, C, inner)
        return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)


class DiTBlock(nn.Module):
    def __init__(self, cfg: RefineDiTConfig, skip: bool, moe: bool):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = nn.LayerNorm(C, eps=1e-6)
        self.attn1 = SelfAttention(C, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.attn2 = CrossAttention(C, cfg.context_dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm)
        self.norm3 = nn.LayerNorm(C, eps=1e-6)
        if skip:
            self.skip_norm = nn.LayerNorm(C, eps=1e-6)
            self.skip_linear = nn.Linear(2 * C, C)
        else:
            self.skip_linear = None
        if moe:
            self.moe = MoE(C, cfg.num_experts, cfg.moe_top_k, cfg.moe_aux_loss_alpha)
        else:
            self.mlp = MLP(C)
        self.use_moe = moe

    def forward(self, x, ctx, ctx_mask, cos, sin, skip=None, live=None):
        if self.skip_linear is not None:
            x = self.skip_norm(self.skip_linear(torch.cat([skip, x], dim=-1)))
        x = x + self.attn1(self.norm1(x), cos, sin)
        x = x + self.attn2(self.norm2(x), ctx, ctx_mask, live)
        h = self.norm3(x)
        return x + (self.moe(h) if self.use_moe else self.mlp(h))


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each transformer block of `model` (regional compilation): the blocks share one code object,
    so the compiler traces a few graphs (dense / long-skip / MoE, train / eval) instead of one per block, and
    fuses the memory-bound work between the matmuls and attention kernels (LayerNorm and its bf16 cast,
    residual adds, GELU, q/k norm + RoPE, the MoE gating). Numbers stay those of eager up to float rounding.
    Call before enable_activation_checkpointing (which then recomputes the compiled block) and before
    DeepSpeed wraps the model. Returns the number of blocks compiled."""
    import torch._dynamo

    # 21 block instances x (train, eval, CFG-dropped) variants: keep them all compiled, never fall back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    n, found = 0, False
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
            found = True
            for blk in mod:
                if getattr(blk, "_compiled", False):
                    continue
                # dynamic=None (automatic): specialised to the first token count; the first call with another
                # (a shape with fewer occupied voxels than num_latents) recompiles once with a symbolic length
                # that later counts reuse, instead of one compile (~1 min at full size) per count
                blk.forward = torch.compile(blk.forward)
                blk._compiled = True
                n += 1
    if not found:
        raise RuntimeError("compile_blocks: found no '*blocks' ModuleList in the model")
    return n


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[sin | cos] features, frequencies exp(-ln(max_period) * i / (dim/2)). t (B,) in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    emb = torch.cat([a.sin(), a.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.mlp[0].in_features).to(self.mlp[0].weight.dtype)).unsqueeze(1)


class FinalLayer(nn.Module):
    def __init__(self, C: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(C, eps=1e-6)
        self.linear = nn.Linear(C, out)

    def forward(self, x):
        return self.linear(self.norm_final(x)[:, 1:])  # drop the timestep token


class RefineDiT(nn.Module):
    def __init__(self, cfg: RefineDiTConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.blocks = nn.ModuleList([
            DiTBlock(cfg, skip=i > cfg.depth // 2, moe=cfg.depth - i <= cfg.num_moe_layers)
            for i in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(C, cfg.in_channels)
        # True: a sample whose image context is all zeros (CFG-dropped / unconditional) skips its
        # cross-attention, whose output is then out_proj's bias alone (same numbers, less work). Its to_q/to_k/
        # to_v/out_proj weights then get no gradient from that sample; data-parallel training, where every rank
        # must produce every gradient, switches this off (ml.training.engine.make_graph_static).
        self.skip_zero_context = True

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        voxel_idx: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction.

        x (B, N, in_channels) noisy latents; t (B,) time in [0, 1] (0 = noise, 1 = data);
        cond (B, S, context_dim) image tokens; voxel_idx (B, N, 3) integer voxel indices of the
        N tokens (RoPE positions); cond_mask (B, S) bool, True = real image token (None: all real).
        Returns (B, N, in_channels).
        """
        h, cond, cond_mask, cos, sin, live = self._step_inputs(x, t, cond, voxel_idx, cond_mask)
        skips = []
        half = self.cfg.depth // 2
        for i, block in enumerate(self.blocks):
            h = block(h, cond, cond_mask, cos, sin, skip=skips.pop() if i > half else None, live=live)
            if i < half:
                skips.append(h)
        return self.final_layer(h)

    def _step_inputs(self, x, t, cond, voxel_idx, cond_mask):
        """What forward() and forward_cached() do before the blocks: (tokens h (B, 1+N, C), cond, cond_mask, cos,
        sin, live)."""
        B, N, _ = x.shape
        if voxel_idx.shape[:2] != (B, N):
            raise ValueError(f"voxel_idx has shape {tuple(voxel_idx.shape)}; expected ({B}, {N}, 3), one index per latent token")
        if t.ndim == 0:
            t = t.expand(B)
        h = torch.cat([self.t_embedder(t), self.x_embedder(x)], dim=1)  # (B, 1+N, C)
        dev = h.device.type
        # q and k come out of a Linear: bf16 under autocast, else the weights' dtype; RoPE runs in that dtype
        qk_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.x_embedder.weight.dtype
        cos, sin = rope_tables(voxel_idx, self.cfg.head_dim, self.cfg.rope_theta, qk_dtype)  # timestep token: angle 0
        cond = cond.to(h.dtype)
        if cond_mask is None:
            # official convention: a context row that is all -1 is padding (batched masked images)
            pad = (cond == -1).all(dim=-1)
            cond_mask = ~pad if bool(pad.any()) else None
        # rows with an all-zero context (unconditional branch): their cross-attention is a constant
        live = None
        if self.skip_zero_context:
            zero = (cond == 0).flatten(1).all(dim=1)
            live = (~zero).nonzero().squeeze(1) if bool(zero.any()) else None
        return h, cond, cond_mask, cos, sin, live

    def forward_cached(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        voxel_idx: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        *,
        cache_depth: int,
        h_mid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepCache-style step: reuse the deep part of the network from an earlier step.

        The long skips pair block j (j < depth//2) with block depth-1-j, so the first d and the last d blocks
        (d = cache_depth) form a shallow U-Net around everything in between. Across neighbouring sampling
        steps the deep features change slowly; the shallow ones carry the new x and t.

        h_mid None ("full" call): all blocks run, exactly as forward() (same numbers); also returns h_mid,
        the hidden state entering block depth-d (= block depth-1-d's output), to keep for later steps.
        h_mid given ("cached" call): the embedders and blocks 0..d-1 run fresh (they produce the skips the last
        d blocks pop: block depth-1-j takes block j's output), then blocks depth-d..depth-1 run from h_mid
        instead of from block depth-1-d's output, then final_layer: 2d of the depth blocks (4/21 at d = 2).
        h_mid must come from a call with the same batch layout (rows and tokens): the caller keeps one per
        layout (cond+uncond batched, or each branch on its own).
        Returns (velocity (B, N, in_channels), h_mid (B, 1+N, C)). The cached call changes the numbers.
        """
        depth, half = self.cfg.depth, self.cfg.depth // 2
        d = cache_depth
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= half:
            raise ValueError(f"cache_depth (refine.cache_depth) = {d!r} must be an integer in [1, depth//2 = {half}]: "
                             f"the first and last cache_depth blocks must be long-skip pairs. Set refine.cache_depth "
                             f"to 1..{half} (2 is the shipped value)")
        h, cond, cond_mask, cos, sin, live = self._step_inputs(x, t, cond, voxel_idx, cond_mask)
        skips = []
        if h_mid is None:
            kept = None
            for i, block in enumerate(self.blocks):
                if i == depth - d:
                    kept = h
                h = block(h, cond, cond_mask, cos, sin, skip=skips.pop() if i > half else None, live=live)
                if i < half:
                    skips.append(h)
            return self.final_layer(h), kept
        if h_mid.shape != h.shape:
            raise ValueError(f"h_mid has shape {tuple(h_mid.shape)} but this call's tokens are {tuple(h.shape)}: the "
                             f"cached state comes from a different batch layout; run a full call (h_mid=None) first")
        for i in range(d):  # d <= half: these blocks take no skip and each pushes one
            h = self.blocks[i](h, cond, cond_mask, cos, sin, live=live)
            skips.append(h)
        h = h_mid
        for i in range(depth - d, depth):  # all > half: each pops, block depth-1-j gets block j's output
            h = self.blocks[i](h, cond, cond_mask, cos, sin, skip=skips.pop(), live=live)
        return self.final_layer(h), h_mid

    def compile_kernels(self) -> "RefineDiT":
        """torch.compile the per-block elementwise work (q/k RMS norm + RoPE) into fused kernels.

        Same math (RoPE in q's dtype as in eager); saves several memory passes over q and k per block at
        32k tokens. The matmuls and attention already run in cuBLAS / flash kernels."""
        fused = torch.compile(_norm_rope, dynamic=False)
        for b in self.blocks:
            b.attn1.norm_rope = fused
        return self

    def compile_blocks(self) -> "RefineDiT":
        """torch.compile every block (see compile_blocks): what `model.compile` (training) and `refine.compile`
        (inference) switch on."""
        compile_blocks(self)
        return self

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last training forward (detached, for logging).

        Its gradient is already injected into the backward pass through the MoE outputs (as the
        official trainer does), so do not add it to the loss again."""
        losses = [b.moe.aux_loss for b in self.blocks if b.use_moe and b.moe.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None
