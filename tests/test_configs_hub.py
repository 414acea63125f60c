"""Every YAML shipped in configs/ loads strictly into its schema (litgpt's test_config_hub, our way).

A new config file with no schema here fails the first test, so nothing ships unchecked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def schema_for(name: str):
    if name.startswith("processing"):
        from ml.processing.config import ProcessingConfig
        return ProcessingConfig
    if name.startswith("train_"):
        from ml.training.config import TrainConfig
        return TrainConfig
    if name.startswith("infer_"):
        from ml.refine import InferConfig
        return InferConfig
    if name.startswith("serve"):
        from ml.serving.config import ServeConfig
        return ServeConfig
    if name.startswith("cost"):
        from infra.cost import CostModelConfig
        return CostModelConfig
    return None


ALL = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_configs_exist():
    assert len(ALL) >= 9, ALL


@pytest.mark.parametrize("name", ALL)
def test_every_config_loads_strictly(name):
    cls = schema_for(name)
    assert cls is not None, f"configs/{name} has no schema in tests/test_configs_hub.py"
    cfg = load_config(CONFIGS / name, cls)
    assert type(cfg) is cls


@pytest.mark.parametrize("name", ALL)
def test_every_config_rejects_a_misspelt_key(name, tmp_path):
    bad = tmp_path / name
    bad.write_text((CONFIGS / name).read_text() + "\nthis_key_does_not_exist: 1\n")
    with pytest.raises(ConfigError, match="this_key_does_not_exist"):
        load_config(bad, schema_for(name))


@pytest.mark.parametrize("name", ALL)
def test_every_key_is_commented(name):
    """STYLE.md: comment every key. A key line with no comment on it or just above it fails."""
    lines = (CONFIGS / name).read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("- ") or ":" not in s:
            continue
        prev = lines[i - 1].strip() if i else ""
        value = s.split(":", 1)[1].strip()
        if "#" in s or prev.startswith("#") or value == "" or value in ("|", ">", ">-"):
            continue  # commented, or a section header whose children carry the comments
        bare.append(f"{i + 1}: {s}")
    assert not bare, f"configs/{name}: keys without a comment:\n" + "\n".join(bare)
