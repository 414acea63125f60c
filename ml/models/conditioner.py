"""Image conditioner: DINOv2 (transformers' Dinov2Model) built from a config, no network access.

Weight-compatible with the `conditioner` part of the released checkpoint, whose keys are
`main_image_encoder.model.<Dinov2Model key>` as written by transformers 4.37 (the official pin):
`encoder.layer.N.attention.attention.query.weight`, `...attention.output.dense.weight`, ...
Newer transformers renamed those (`attention.q_proj`, `attention.o_proj`); `state_dict()` and
`load_state_dict()` here always speak the official names, whatever transformers is installed.

forward(image, mask): image (B, 3, H, W) in [-1, 1]; mask (B, 1, H, W) in {-1 background, 1 object}.
 - resize to image_size (bilinear, antialiased), ImageNet-normalise, DINOv2, last hidden state
   (B, 1 + (image_size/14)^2, hidden) with the CLS token first;
 - background-patch masking (official): a 14x14 patch is kept if any of its mask pixels is
   foreground (max-pool); kept tokens are packed to the front, the rest of each row is padding,
   filled with -1 (the official marker) and flagged False in the returned token mask;
 - classifier-free-guidance drop in training: each sample's tokens are zeroed with probability
   drop_ratio (as officially, a dropped sample then has no padding: all its tokens are real zeros).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# official (transformers 4.37) name -> name in transformers >= 5 (only used if the installed one differs)
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


@dataclass
class ConditionerConfig:
    hidden_size: int = 1024  # DINOv2-L width (the DiT's context_dim)
    num_hidden_layers: int = 24  # DINOv2-L depth
    num_attention_heads: int = 16  # DINOv2-L heads
    intermediate_size: int = 4096  # DINOv2-L MLP width (mlp_ratio 4)
    patch_size: int = 14  # ViT patch size
    pretrain_image_size: int = 518  # size the position embeddings were trained at: (518/14)^2 + 1 = 1370 of them
    image_size: int = 1022  # input resolution: (1022/14)^2 + 1 = 5330 tokens
    layer_norm_eps: float = 1e-6  # DINOv2's LayerNorm eps
    use_cls_token: bool = True  # keep the CLS token as the first context token
    drop_ratio: float = 0.0  # CFG drop probability in training (official fine-tuning: 0.1; inference: 0)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"conditioner.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError(f"conditioner.drop_ratio must be in [0, 1), got {self.drop_ratio}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + int(self.use_cls_token)


def _legacy_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Position-embedding interpolation as in transformers 4.37, which the released weights were
    fine-tuned with: bicubic with scale_factor (n + 0.1) / sqrt(N) (newer versions pass the target
    size instead, which samples slightly different positions)."""
    num_patches = embeddings.shape[1] - 1
    pos = self.position_embeddings
    num_positions = pos.shape[1] - 1
    if num_patches == num_positions and height == width:
        return pos
    # The frozen encoder interpolates the same table for the same image size at every call (a 5 ms bicubic pass
    # at 1022 px on an H100): keep the last result while the table is unchanged (same storage, same in-place
    # version: load_state_dict and optimizer steps bump it) and no gradient has to flow into it.
    key = (height, width, pos.data_ptr(), pos._version, pos.dtype, pos.device)
    cached = getattr(self, "_pos_cache", None)
    frozen = not (pos.requires_grad and torch.is_grad_enabled())
    if frozen and cached is not None and cached[0] == key:
        return cached[1]
    dim = embeddings.shape[-1]
    p = self.config.patch_size
    h0, w0 = height // p + 0.1, width // p + 0.1
    side = int(math.sqrt(num_positions))
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    dtype = grid.dtype
    grid = F.interpolate(grid.float(), scale_factor=(h0 / side, w0 / side), mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (int(h0), int(w0)):
        raise RuntimeError("position-embedding interpolation produced the wrong grid size")
    grid = grid.to(dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    out = torch.cat([pos[:, :1], grid], dim=1)
    if frozen:
        self._pos_cache = (key, out.detach())
    return out


class _Encoder(nn.Module):
    """Holds the Dinov2Model under `.model` so keys read `main_image_encoder.model.*`."""

    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        hf = Dinov2Config(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size // cfg.hidden_size,
            patch_size=cfg.patch_size, image_size=cfg.pretrain_image_size, layer_norm_eps=cfg.layer_norm_eps,
        )
        hf._attn_implementation = "sdpa"
        self.model = Dinov2Model(hf)
        emb = self.model.embeddings
        emb.interpolate_pos_encoding = types.MethodType(_legacy_interpolate_pos_encoding, emb)


class ImageConditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        self.cfg = cfg
        self.main_image_encoder = _Encoder(cfg)
        # which naming the installed transformers uses for the attention projections
        own = self.main_image_encoder.model.state_dict().keys()
        self._renamed = any(".attention.q_proj." in k for k in own)

    # ---- official key names, whatever transformers is installed ----
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        sd = super().state_dict()
        if not self._renamed:
            return dict(sd)
        back = {v: k for k, v in _RENAMES.items()}
        out = {}
        for k, t in sd.items():
            for new, old in back.items():
                k = k.replace(new, old)
            out[k] = t
        return out

    def to_module_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._renamed:
            return dict(sd)
        out = {}
        for k, t in sd.items():
            for old, new in _RENAMES.items():
                k = k.replace(old, new)
            out[k] = t
        return out

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        disable_drop: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, S, hidden) and token mask (B, S) bool (True = real token)."""
        cfg = self.cfg
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
        model = self.main_image_encoder.model
        dtype = next(model.parameters()).dtype
        x = (image.float() + 1.0) / 2.0
        x = self._resize_center(x, "bilinear")
        # normalisation constants made here in float32 (as buffers, a .to(bfloat16) would round them)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(dtype)
        h = model(pixel_values=x).last_hidden_state  # (B, 1 + P, hidden)
        if not cfg.use_cls_token:
            h = h[:, 1:]
        B, S, C = h.shape
        keep = torch.ones(B, S, dtype=torch.bool, device=h.device)
        if mask is not None:
            m = self._resize_center(mask.float(), "nearest")
            m = F.max_pool2d(m, cfg.patch_size).flatten(1) != -1  # (B, P): patch has foreground
            keep = torch.cat([keep[:, :1], m], dim=1) if cfg.use_cls_token else m
            n = keep.sum(1)
            width = int(n.max())
            out = torch.full((B, width, C), -1.0, dtype=h.dtype, device=h.device)
            for b in range(B):
                out[b, : n[b]] = h[b, keep[b]]
            h = out
            keep = torch.arange(width, device=h.device)[None] < n[:, None]
        if not disable_drop and cfg.drop_ratio > 0:
            p = torch.rand(B, generator=generator, device="cpu" if generator is None else generator.device)
            dropped = (p <= cfg.drop_ratio).to(h.device)
            h = torch.where(dropped[:, None, None], torch.zeros_like(h), h)
            keep = keep | dropped[:, None]
        return h, keep

    def unconditional(self, tokens: torch.Tensor) -> torch.Tensor:
        """The official unconditional context: zeros with the conditional context's shape."""
        return torch.zeros_like(tokens)

    def _resize_center(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """torchvision's Resize(size) (shorter side -> size) then CenterCrop(size), on tensors."""
        s = self.cfg.image_size
        H, W = x.shape[-2:]
        if H <= W:
            nh, nw = s, int(s * W / H)
        else:
            nh, nw = int(s * H / W), s
        if (nh, nw) != (H, W):
            if mode == "nearest":
                x = F.interpolate(x, size=(nh, nw), mode="nearest")
            else:
                x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        return x[..., top:top + s, left:left + s]
