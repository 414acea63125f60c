"""Both processing configs load strictly; the official one is exactly the built-in defaults."""

from __future__ import annotations

import pytest

from ml.config import ConfigError, load_config, to_dict
from ml.processing.config import ProcessingConfig

pytestmark = pytest.mark.unit


def test_official_config_is_the_defaults(repo_root):
    cfg = load_config(repo_root / "configs" / "processing.yaml", ProcessingConfig)
    assert to_dict(cfg) == to_dict(ProcessingConfig())
    assert cfg.resolution == 512 and cfg.num_views == 16 and cfg.render_size == 512
    assert cfg.surface_uniform_points + cfg.surface_sharp_points == 600_000  # the official loaders assert this


def test_tiny_config_loads_and_every_key_is_commented(repo_root):
    cfg = load_config(repo_root / "configs" / "processing-tiny.yaml", ProcessingConfig)
    assert cfg.resolution <= 128 and cfg.num_views < 16
    for name in ("processing.yaml", "processing-tiny.yaml"):
        for line in (repo_root / "configs" / name).read_text().splitlines():
            if line and not line.startswith("#") and ":" in line:
                assert "#" in line, f"{name}: key without a comment: {line}"


def test_unknown_key_names_the_file_and_the_key(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("resolutoin: 256\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key 'resolutoin' \(did you mean 'resolution'\?\)"):
        load_config(p, ProcessingConfig)


def test_bad_values_are_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("resolution: 8\n")
    with pytest.raises(ConfigError, match="resolution=8"):
        load_config(p, ProcessingConfig)
