from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from ml.config import ConfigError, load_config, parse_overrides


@dataclass
class Inner:
    lr: float = 1e-4  # learning rate
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    path: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_nested_and_coerces(tmp_path):
    cfg = load_config(write(tmp_path, "steps: 3\ninner:\n  lr: 2e-5\n  betas: [0.8, 0.9]\n"), Outer)
    assert cfg.steps == 3 and cfg.inner.lr == 2e-5 and cfg.inner.betas == (0.8, 0.9)
    assert cfg.mode == "a" and cfg.path is None


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "inner:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, Outer)
    msg = str(e.value)
    assert "inner.lrr" in msg and str(p) in msg and "inner.lr" in msg


def test_wrong_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        load_config(write(tmp_path, "steps: 1.5\n"), Outer)
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(write(tmp_path, "mode: c\n"), Outer)


def test_overrides_checked_like_file(tmp_path):
    p = write(tmp_path, "steps: 3\n")
    cfg = load_config(p, Outer, parse_overrides(["inner.lr=0.5", "steps=7"]))
    assert cfg.inner.lr == 0.5 and cfg.steps == 7
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_config(p, Outer, parse_overrides(["stepz=1"]))
