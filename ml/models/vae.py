"""ShapeVAE: UltraShape 1.0's vecset VAE with voxel queries, in our own code.

Weight-compatible with the `vae` part of the released checkpoint (tests/data/official/vae_keys.json).

    surface (B, P, 3 + point_feats)  points in [-1, 1] + normal (+ sharp-edge label)
      -> voxelise the points at voxel_query_res^3, keep up to num_latents occupied voxels (random)
      -> queries = Fourier(voxel centres); data = Fourier(points) ++ feats  (random subset of
         num_latents * downsample_ratio points)
      -> cross-attention (queries -> data), num_encoder_layers self-attention blocks, ln_post
      -> pre_kl: mean/logvar (B, K, embed_dim)        K = number of tokens, <= num_latents
    encode() returns z = scale_factor * sample (the DiT's space) and the voxel indices (B, K, 3)

    decode(z): z / scale_factor -> post_kl -> num_decoder_layers self-attention -> tokens (B, K, width)
    query(tokens, points): occupancy logits (> 0 inside) via one cross-attention block (geo_decoder)
    to_mesh(tokens, ...): coarse-to-fine logit grid + marching cubes, vertices in [-bounds, bounds]^3

Attention layouts are the official ones: c_qkv / c_kv outputs are reshaped to (heads, n * head_dim)
before splitting, i.e. interleaved per head (see ml/models/dit.py for the same trick), and q/k get a
LayerNorm over head_dim (eps 1e-6). ln_post layers use LayerNorm's default eps 1e-5, as officially.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ml.models.mesh_extract import decode_volume, marching_cubes


@dataclass
class ShapeVAEConfig:
    num_latents: int = 32768  # max tokens (voxel queries) per shape; the DiT's token count
    embed_dim: int = 64  # latent channels (the DiT's in_channels)
    width: int = 1024  # transformer width
    heads: int = 16  # attention heads (head_dim = width / heads)
    num_encoder_layers: int = 8  # self-attention blocks after the point cross-attention
    num_decoder_layers: int = 16  # self-attention blocks after post_kl
    num_freqs: int = 8  # Fourier frequencies 2^0 .. 2^(n-1) per coordinate (input included)
    include_pi: bool = False  # multiply the frequencies by pi (off in the release)
    point_feats: int = 4  # per-point features after xyz: normal (3) + sharp-edge label (1)
    downsample_ratio: int = 20  # points per query fed to the encoder's cross-attention
    qkv_bias: bool = False  # bias on c_qkv / c_q / c_kv
    qk_norm: bool = True  # LayerNorm over head_dim on q and k
    scale_factor: float = 1.0039506158752403  # z = scale_factor * latent (official value)
    geo_decoder_mlp_expand_ratio: int = 4  # MLP width multiplier of the geometry decoder block
    geo_decoder_ln_post: bool = True  # LayerNorm before the occupancy head (also gates its qk_norm)
    voxel_query_res: int = 128  # voxel grid for the queries and the DiT's RoPE positions

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"vae.width ({self.width}) must be divisible by vae.heads ({self.heads})")
        if self.num_latents < 1 or self.voxel_query_res < 2:
            raise ValueError("vae.num_latents must be >= 1 and vae.voxel_query_res >= 2")


class FourierEmbedder(nn.Module):
    def __init__(self, num_freqs: int, include_pi: bool):
        super().__init__()
        self.num_freqs, self.include_pi = num_freqs, include_pi
        self.register_buffer("frequencies", self._freqs(), persistent=False)
        self.out_dim = 3 * (2 * num_freqs + 1)

    def _freqs(self, device=None):
        f = 2.0 ** torch.arange(self.num_freqs, dtype=torch.float32, device=device)
        return f * torch.pi if self.include_pi else f

    def reset_buffers(self):  # after building on the meta device (not in the state dict)
        self.frequencies = self._freqs(self.frequencies.device)

    def forward(self, x):  # (..., 3) -> (..., 3 * (2F + 1)): [x, sin(x_i f_j), cos(x_i f_j)], i-major
        e = (x[..., None] * self.frequencies.to(x.dtype)).flatten(-2)
        return torch.cat([x, e.sin(), e.cos()], dim=-1)


def _head_norm(dim: int, on: bool) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6) if on else nn.Identity()


class QKVAttentionCore(nn.Module):
    """Holds q_norm/k_norm (key names `attention.q_norm`, `attention.k_norm`)."""

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.q_norm = _head_norm(width // heads, qk_norm)
        self.k_norm = _head_norm(width // heads, qk_norm)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.c_qkv = nn.Linear(width, width * 3, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVAttentionCore(width, heads, qk_norm)

    def forward(self, x):
        B, T, C = x.shape
        a = self.attention
        # c_qkv's output viewed (heads, 3*hd) and split: interleaved, like the official model
        qkv = self.c_qkv(x).view(B, T, a.heads, -1)  # (B, T, H, 3*hd)
        q, k, v = [t.transpose(1, 2) for t in qkv.chunk(3, dim=-1)]
        q, k = a.q_norm(q), a.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool, data_width: int | None = None):
        super().__init__()
        self.c_q = nn.Linear(width, width, bias=qkv_bias)
        self.c_kv = nn.Linear(data_width or width, width * 2, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVAttentionCore(width, heads, qk_norm)

    def forward(self, x, data):
        B, T, C = x.shape
        H = self.attention.heads
        q = self.c_q(x).view(B, T, H, -1).transpose(1, 2)
        kv = self.c_kv(data).view(B, data.shape[1], H, -1)  # (B, S, H, 2*hd): interleaved
        k, v = [t.transpose(1, 2) for t in kv.chunk(2, dim=-1)]
        q, k = self.attention.q_norm(q), self.attention.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, expand: int = 4):
        super().__init__()
        self.c_fc = nn.Linear(width, width * expand)
        self.c_proj = nn.Linear(width * expand, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class SelfAttentionBlock(nn.Module):
    def __init__(self, width, heads, qkv_bias, qk_norm):
        super().__init__()
        self.attn = SelfAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    def __init__(self, width, heads, qkv_bias, qk_norm, mlp_expand=4):
        super().__init__()
        self.attn = CrossAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.ln_3 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_expand)

    def forward(self, x, data):
        x = x + self.attn(self.ln_1(x), self.ln_2(data))
        return x + self.mlp(self.ln_3(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, qkv_bias, qk_norm):
        super().__init__()
        self.resblocks = nn.ModuleList([SelfAttentionBlock(width, heads, qkv_bias, qk_norm) for _ in range(layers)])

    def forward(self, x):
        for b in self.resblocks:
            x = b(x)
        return x


class PointEncoder(nn.Module):
    def __init__(self, cfg: ShapeVAEConfig, fourier: FourierEmbedder):
        super().__init__()
        W = cfg.width
        self.input_proj_q = nn.Linear(fourier.out_dim, W)
        self.input_proj_kv = nn.Linear(fourier.out_dim + cfg.point_feats, W)
        self.cross_attn = CrossAttentionBlock(W, cfg.heads, cfg.qkv_bias, cfg.qk_norm)
        self.self_attn = Transformer(W, cfg.num_encoder_layers, cfg.heads, cfg.qkv_bias, cfg.qk_norm) \
            if cfg.num_encoder_layers > 0 else None
        self.ln_post = nn.LayerNorm(W)


class GeoDecoder(nn.Module):
    def __init__(self, cfg: ShapeVAEConfig, fourier: FourierEmbedder):
        super().__init__()
        W = cfg.width
        self.fourier = fourier
        self.query_proj = nn.Linear(fourier.out_dim, W)
        # official quirk: without ln_post the decoder's qk_norm is switched off too
        qk = cfg.qk_norm and cfg.geo_decoder_ln_post
        self.cross_attn_decoder = CrossAttentionBlock(W, cfg.heads, cfg.qkv_bias, qk, cfg.geo_decoder_mlp_expand_ratio)
        self.ln_post = nn.LayerNorm(W) if cfg.geo_decoder_ln_post else nn.Identity()
        self.output_proj = nn.Linear(W, 1)

    def forward(self, points: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(self.fourier(points).to(tokens.dtype))
        return self.output_proj(self.ln_post(self.cross_attn_decoder(q, tokens))).squeeze(-1)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's normed keys and values for tokens (1, N, W): (1, H, N, hd) each.
        They do not depend on the queries, so volume decoding computes them once per shape."""
        blk = self.cross_attn_decoder
        a = blk.attn
        H = a.attention.heads
        kv = a.c_kv(blk.ln_2(tokens)).view(tokens.shape[0], tokens.shape[1], H, -1)
        k, v = [t.transpose(1, 2) for t in kv.chunk(2, dim=-1)]
        return a.attention.k_norm(k), v

    def query_cached(self, points: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     topk: int | None = None, stride: int = 50) -> torch.Tensor:
        """Logits (n,) at points (n, 3), same math as forward() with precomputed keys/values.

        topk: FlashVDM's adaptive KV selection, the official inference default: each head attends
        only to the `topk` tokens with the highest mean similarity to (every stride-th of) these
        queries. Changes the numbers slightly; call with spatially compact chunks of points."""
        blk = self.cross_attn_decoder
        a = blk.attn
        x = self.query_proj(self.fourier(points[None]).to(k.dtype))  # (1, n, W)
        B, n, W = x.shape
        H = a.attention.heads
        q = a.attention.q_norm(a.c_q(blk.ln_1(x)).view(B, n, H, -1).transpose(1, 2))  # (1, H, n, hd)
        if topk is not None and topk < k.shape[2]:
            sim = (q[:, :, ::stride] @ k.transpose(-1, -2)).mean(dim=-2)  # (1, H, N)
            idx = sim.topk(topk, dim=-1).indices.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            k, v = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, W)
        x = x + a.c_proj(y)
        x = x + blk.mlp(blk.ln_3(x))
        return self.output_proj(self.ln_post(x)).reshape(n)


def voxelize(points: torch.Tensor, max_tokens: int, resolution: int, generator: torch.Generator | None = None):
    """Occupied voxels of points (B, P, 3) in [-1, 1]: up to max_tokens per shape, random order.

    Returns (centres (B, K, 3) float, indices (B, K, 3) long) with K = min(max_tokens, fewest
    occupied voxels over the batch) -- the official rule. A shape with fewer occupied voxels than
    max_tokens therefore gets fewer tokens; callers must size their latents by K, not max_tokens
    (the official pipeline does not, and crashes).
    """
    B = points.shape[0]
    idx = ((points.float() + 1.0) / 2.0 * resolution).floor().long().clamp(0, resolution - 1)
    per_shape = []
    for b in range(B):
        u = torch.unique(idx[b], dim=0)
        perm = torch.randperm(u.shape[0], generator=generator, device="cpu").to(u.device)
        per_shape.append(u[perm])
    k = min(max_tokens, min(u.shape[0] for u in per_shape))
    vidx = torch.stack([u[:k] for u in per_shape])
    centres = (vidx.float() + 0.5) * (2.0 / resolution) - 1.0
    return centres, vidx


class ShapeVAE(nn.Module):
    def __init__(self, cfg: ShapeVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.fourier_embedder = FourierEmbedder(cfg.num_freqs, cfg.include_pi)
        self.encoder = PointEncoder(cfg, self.fourier_embedder)
        self.pre_kl = nn.Linear(cfg.width, cfg.embed_dim * 2)
        self.post_kl = nn.Linear(cfg.embed_dim, cfg.width)
        self.transformer = Transformer(cfg.width, cfg.num_decoder_layers, cfg.heads, cfg.qkv_bias, cfg.qk_norm)
        self.geo_decoder = GeoDecoder(cfg, self.fourier_embedder)

    # ---- encoder ----
    def encode_tokens(self, surface: torch.Tensor, voxel_idx: torch.Tensor | None = None,
                      generator: torch.Generator | None = None):
        """surface (B, P, 3 + point_feats) -> (mean, logvar) each (B, K, embed_dim), voxel_idx (B, K, 3)."""
        cfg = self.cfg
        if surface.ndim != 3 or surface.shape[-1] != 3 + cfg.point_feats:
            raise ValueError(f"surface must be (B, P, {3 + cfg.point_feats}) = xyz + {cfg.point_feats} features, "
                             f"got {tuple(surface.shape)}")
        pc, feats = surface[..., :3], surface[..., 3:]
        if voxel_idx is None:
            _, voxel_idx = voxelize(pc, cfg.num_latents, cfg.voxel_query_res, generator)
        centres = (voxel_idx.float() + 0.5) * (2.0 / cfg.voxel_query_res) - 1.0
        # official: num_latents * downsample_ratio random points, whatever the actual token count
        n_in = min(pc.shape[1], cfg.num_latents * cfg.downsample_ratio)
        sel = torch.randperm(pc.shape[1], generator=generator, device="cpu")[:n_in].to(pc.device)
        dtype = self.pre_kl.weight.dtype
        q = self.encoder.input_proj_q(self.fourier_embedder(centres).to(dtype))
        data = torch.cat([self.fourier_embedder(pc[:, sel]), feats[:, sel]], dim=-1).to(dtype)
        h = self.encoder.cross_attn(q, self.encoder.input_proj_kv(data))
        if self.encoder.self_attn is not None:
            h = self.encoder.self_attn(h)
        mean, logvar = self.pre_kl(self.encoder.ln_post(h)).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0), voxel_idx

    def encode(self, surface: torch.Tensor, sample_posterior: bool = True,
               generator: torch.Generator | None = None, voxel_idx: torch.Tensor | None = None):
        """-> (z (B, K, embed_dim) in the DiT's space = scale_factor * latent, voxel_idx (B, K, 3) long)."""
        mean, logvar, voxel_idx = self.encode_tokens(surface, voxel_idx, generator)
        z = mean
        if sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device="cpu" if generator is None or
                                generator.device.type == "cpu" else mean.device).to(mean)
            z = mean + torch.exp(0.5 * logvar) * noise
        return z * self.cfg.scale_factor, voxel_idx

    # ---- decoder ----
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """DiT-space latents (B, K, embed_dim) -> decoded tokens (B, K, width) for query()/to_mesh()."""
        return self.transformer(self.post_kl(z / self.cfg.scale_factor))

    def query(self, tokens: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Occupancy logits (B, n) at points (B, n, 3); > 0 is inside."""
        return self.geo_decoder(points, tokens)

    @torch.no_grad()
    def to_mesh(self, tokens: torch.Tensor, octree_resolution: int = 1024, bounds: float = 1.0,
                level: float = 0.0, num_chunks: int = 100_000, min_resolution: int = 63,
                progress: bool = False, flashvdm: bool = False, query_counts: list | None = None):
        """Decoded tokens (1, K, width) -> (vertices (V, 3) float32 in [-bounds, bounds]^3, faces (F, 3)).

        Faces are oriented outward (positive volume). flashvdm=True attends to the top third of
        the tokens per chunk of query points (the official inference default, ~2x faster decoding,
        slightly different numbers); False attends to all of them (exact)."""
        if tokens.shape[0] != 1:
            raise ValueError("to_mesh decodes one shape at a time; pass tokens[i:i+1]")
        dev = tokens.device
        k, v = self.geo_decoder.keys_values(tokens)
        N = k.shape[2]
        # the official FlashVDM processor's choice of how many tokens to keep
        topk = (1024 if N == 3072 else 256 if N == 512 else N // 3) if flashvdm else None

        def fn(p):
            return self.geo_decoder.query_cached(p.to(dev), k, v, topk)

        grid = decode_volume(fn, bounds, octree_resolution, device=dev, level=level, num_chunks=num_chunks,
                             min_resolution=min_resolution, progress=progress, query_counts=query_counts)
        v, f = marching_cubes(grid, level)
        v = v * (2.0 * bounds / octree_resolution) - bounds
        if f.shape[0]:
            # signed volume (divergence theorem); flip the winding if the table gave inward normals
            tri = v[f].double()
            vol = (tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum()
            if vol < 0:
                f = f.flip(-1)
        return v.float(), f
