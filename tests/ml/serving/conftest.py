"""Fixtures for the serving tests: a tiny random checkpoint and inputs a client would send."""

from __future__ import annotations

import io
import socket

import pytest

# The tests' API key; the same literal is in each test module (test dirs are not packages).
TEST_KEY = "serving-tests-key-0123456789abcdef"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, repo_root):
    """(checkpoint, inference config) of the tiny CPU model with random weights."""
    from ml.config import load_config
    from ml.models.checkpoint import write_random_checkpoint
    from ml.refine import InferConfig

    config = repo_root / "configs" / "infer_dit_refine-tiny.yaml"
    ckpt = tmp_path_factory.mktemp("serving_model") / "tiny.pt"
    write_random_checkpoint(load_config(config, InferConfig).model, ckpt, seed=0)
    return ckpt, config


@pytest.fixture(scope="session")
def view_png() -> bytes:
    """An RGBA view with a transparent background (what ml.refine wants)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((20, 24, 108, 104), fill=(200, 120, 60, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def coarse_mesh():
    """A coarse sphere far from the origin and not unit-sized, so a frame bug cannot hide."""
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2)
    m.apply_scale([7.0, 5.0, 6.0])
    m.apply_translation([100.0, -50.0, 20.0])
    return m


@pytest.fixture(scope="session")
def coarse_glb(coarse_mesh) -> bytes:
    return coarse_mesh.export(file_type="glb")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
