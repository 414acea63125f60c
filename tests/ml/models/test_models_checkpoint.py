"""Full-size key names/shapes vs the official list, save -> load round trips, strict-load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml.config import load_config
from ml.models import (
    CheckpointError,
    UltraShapeConfig,
    build_models,
    config_from_meta,
    export_official,
    load_checkpoint,
    official_state_dict,
    read_checkpoint,
    write_random_checkpoint,
)
from ml.refine import InferConfig

ROOT = Path(__file__).resolve().parents[3]
REF = ROOT / "tests" / "data" / "official"
pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_cfg() -> UltraShapeConfig:
    return load_config(ROOT / "configs" / "infer_dit_refine-tiny.yaml", InferConfig).model


@pytest.mark.parametrize("part", ["vae", "dit", "conditioner"])
def test_full_size_keys_and_shapes_equal_official(part):
    cfg = load_config(ROOT / "configs" / "infer_dit_refine.yaml", InferConfig).model
    assert cfg == UltraShapeConfig()  # the YAML and the dataclass defaults agree on official sizes
    models = build_models(cfg, device="meta")  # no memory: 3.7 B parameters
    mine = {k: list(v.shape) for k, v in official_state_dict(models.parts()[part]).items()}
    official = json.loads((REF / f"{part}_keys.json").read_text())
    assert sorted(set(official) - set(mine)) == []
    assert sorted(set(mine) - set(official)) == []
    assert {k: v for k, v in mine.items() if official[k] != v} == {}


def test_official_sizes_parameter_counts():
    models = build_models(UltraShapeConfig(), device="meta")
    n = {p: sum(t.numel() for t in official_state_dict(m).values()) for p, m in models.parts().items()}
    assert n == {"vae": 327_799_425, "dit": 3_050_758_720, "conditioner": 304_368_640}


def test_round_trip_random_checkpoint(tmp_path, tiny_cfg):
    path = write_random_checkpoint(tiny_cfg, tmp_path / "tiny.pt", seed=3)
    raw = read_checkpoint(path)
    assert set(raw) == {"vae", "dit", "conditioner", "ultrashape_kit"}
    models = build_models(tiny_cfg)
    meta = load_checkpoint(models, path)
    assert config_from_meta(meta) == tiny_cfg
    for part, m in models.parts().items():
        sd = official_state_dict(m)
        assert sd.keys() == raw[part].keys()
        for k in sd:
            assert torch.equal(sd[k], raw[part][k]), k
    # export again (bf16) -> load -> same values up to bf16 rounding
    again = export_official(models, tmp_path / "again.pt", dtype=torch.bfloat16)
    other = build_models(tiny_cfg)
    load_checkpoint(other, again)
    for part in ("vae", "dit", "conditioner"):
        a, b = official_state_dict(models.parts()[part]), official_state_dict(other.parts()[part])
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-2), k
    # different seeds give different weights (the seed is honoured)
    p2 = write_random_checkpoint(tiny_cfg, tmp_path / "seed4.pt", seed=4)
    assert not torch.equal(read_checkpoint(p2)["dit"]["x_embedder.weight"], raw["dit"]["x_embedder.weight"])


def test_official_layout_without_metadata_loads(tmp_path, tiny_cfg):
    path = write_random_checkpoint(tiny_cfg, tmp_path / "tiny.pt")
    raw = read_checkpoint(path)
    torch.save({k: raw[k] for k in ("vae", "dit", "conditioner")}, tmp_path / "plain.pt")
    assert load_checkpoint(build_models(tiny_cfg), tmp_path / "plain.pt") == {}


def test_strict_load_lists_missing_and_unexpected(tmp_path, tiny_cfg):
    path = write_random_checkpoint(tiny_cfg, tmp_path / "tiny.pt")
    raw = read_checkpoint(path)
    dit = dict(raw["dit"])
    dit.pop("final_layer.linear.weight")
    dit["blocks.0.attn1.to_qkv.weight"] = torch.zeros(1)
    torch.save({"vae": raw["vae"], "dit": dit, "conditioner": raw["conditioner"]}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_models(tiny_cfg), tmp_path / "bad.pt")
    msg = str(e.value)
    assert "bad.pt" in msg and "'dit'" in msg
    assert "missing keys (1): final_layer.linear.weight" in msg
    assert "unexpected keys (1): blocks.0.attn1.to_qkv.weight" in msg
    assert "Fix:" in msg


def test_wrong_config_is_a_shape_error(tmp_path, tiny_cfg):
    path = write_random_checkpoint(tiny_cfg, tmp_path / "tiny.pt")
    import dataclasses

    wider = dataclasses.replace(tiny_cfg, dit=dataclasses.replace(tiny_cfg.dit, hidden_size=64))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(build_models(wider), path)


def test_partial_checkpoint_needs_a_base(tmp_path, tiny_cfg):
    full = write_random_checkpoint(tiny_cfg, tmp_path / "full.pt", seed=1)
    models = build_models(tiny_cfg)
    load_checkpoint(models, full)
    dit_only = export_official({"dit": models.dit}, tmp_path / "dit_only.pt")
    with pytest.raises(CheckpointError, match="has no 'vae' weights"):
        load_checkpoint(build_models(tiny_cfg), dit_only)
    other = build_models(tiny_cfg)
    load_checkpoint(other, dit_only, base=full)
    assert torch.equal(other.vae.pre_kl.weight, models.vae.pre_kl.weight)


def test_not_a_checkpoint(tmp_path, tiny_cfg):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(build_models(tiny_cfg), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(build_models(tiny_cfg), tmp_path / "junk.pt")
    torch.save({"state_dict": {}, "optimizer": {}}, tmp_path / "train_state.pt")
    with pytest.raises(CheckpointError, match="unexpected top-level keys"):
        load_checkpoint(build_models(tiny_cfg), tmp_path / "train_state.pt")


def test_meta_build_then_materialize_and_load(tmp_path, tiny_cfg):
    from ml.models import materialize

    path = write_random_checkpoint(tiny_cfg, tmp_path / "tiny.pt")
    m = materialize(build_models(tiny_cfg, device="meta"), "cpu")
    load_checkpoint(m, path)
    ref = build_models(tiny_cfg)
    load_checkpoint(ref, path)
    assert torch.equal(m.vae.fourier_embedder.frequencies, ref.vae.fourier_embedder.frequencies)
    x = torch.randn(1, 7, tiny_cfg.vae.embed_dim)
    with torch.no_grad():
        assert torch.equal(m.vae.decode(x), ref.vae.decode(x))
