"""The DINOv2 conditioner keeps its interpolated position embedding between calls (ml/models/conditioner.py) and
recomputes it when the weights change or the image size does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.config import load_config
from ml.models import build_models
from ml.refine import InferConfig

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.unit


def test_position_embedding_cache_is_exact_and_follows_the_weights():
    cfg = load_config(ROOT / "configs/infer_dit_refine-tiny.yaml", InferConfig, {})
    torch.manual_seed(0)
    c = build_models(cfg.model).conditioner.eval()
    emb = c.main_image_encoder.model.embeddings
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, _ = c(img)
        assert getattr(emb, "_pos_cache", None) is not None, "the tiny config must interpolate (else nothing is tested)"
        b, _ = c(img)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        sd = {k: v.clone() for k, v in c.state_dict().items()}
        key = next(k for k in sd if k.endswith("position_embeddings"))
        sd[key] = sd[key] * 2
        c.load_state_dict(sd)
        d, _ = c(img)
        emb._pos_cache = None  # the same weights, computed from scratch
        e, _ = c(img)
    assert (d - a).abs().max() > 1e-3  # the new table was used, not the cached one
    torch.testing.assert_close(d, e, rtol=0, atol=0)
