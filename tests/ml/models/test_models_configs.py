"""configs/infer_dit_refine*.yaml: load strictly, every key commented, tiny variant really tiny."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.config import ConfigError, load_config
from ml.models import build_models
from ml.refine import InferConfig

ROOT = Path(__file__).resolve().parents[3]
INFER = sorted((ROOT / "configs").glob("infer_*.yaml"))
pytestmark = pytest.mark.unit


def test_both_variants_exist():
    assert {p.name for p in INFER} >= {"infer_dit_refine.yaml", "infer_dit_refine-tiny.yaml"}


@pytest.mark.parametrize("path", INFER, ids=lambda p: p.name)
def test_loads_and_every_key_is_commented(path):
    load_config(path, InferConfig)
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and ":" in s:
            assert "#" in s, f"{path.name}:{i}: key without a comment: {s}"


def test_tiny_is_small_and_official_is_official():
    tiny = load_config(ROOT / "configs" / "infer_dit_refine-tiny.yaml", InferConfig)
    m = build_models(tiny.model, device="meta")
    n = sum(p.numel() for part in m.parts().values() for p in part.parameters())
    assert n < 1_000_000
    full = load_config(ROOT / "configs" / "infer_dit_refine.yaml", InferConfig)
    assert full.model.vae.num_latents == 32768 and full.model.dit.depth == 21 and full.refine.steps == 50


def test_misspelt_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="refine.guidanse"):
        load_config(ROOT / "configs" / "infer_dit_refine.yaml", InferConfig, {"refine.guidanse": 3.0})
    with pytest.raises(ConfigError, match="context_dim"):
        load_config(ROOT / "configs" / "infer_dit_refine.yaml", InferConfig, {"model.dit.context_dim": 512})
