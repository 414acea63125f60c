"""Unit tests for the serving layer's parts that need no model: key handling, config, input checks."""

from __future__ import annotations

import io
import os
import stat
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image

from ml.config import ConfigError, from_dict, load_config
from ml.serving.auth import ENV_KEY, ApiKeyError, resolve_api_key
from ml.serving.config import DefaultsConfig, LimitsConfig, ServeConfig
from ml.serving.validation import (
    RequestError,
    decode_image,
    decode_mesh,
    parse_params,
    sniff_image,
    sniff_mesh,
    split_form,
)

pytestmark = pytest.mark.unit
LIM = LimitsConfig()
DEF = DefaultsConfig()


def png(w=64, h=64, mode="RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def glb(mesh: trimesh.Trimesh) -> bytes:
    return mesh.export(file_type="glb")


# ------------------------------------------------------------------------------------------ keys


def test_key_generated_once_with_0600_and_reused(tmp_path):
    kf = tmp_path / "sub" / "key"
    k1 = resolve_api_key(kf, env={})
    assert k1.generated and len(k1.value) >= 32
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    k2 = resolve_api_key(kf, env={})
    assert not k2.generated and k2.value == k1.value
    assert k1.matches(k1.value) and not k1.matches(k1.value + "x") and not k1.matches(None)


def test_env_key_wins_and_short_env_key_refused(tmp_path):
    kf = tmp_path / "key"
    k = resolve_api_key(kf, env={ENV_KEY: "a-long-enough-secret-key"})
    assert k.value == "a-long-enough-secret-key" and not kf.exists()
    with pytest.raises(ApiKeyError, match="at least"):
        resolve_api_key(kf, env={ENV_KEY: "short"})


def test_world_readable_key_file_refused(tmp_path):
    kf = tmp_path / "key"
    kf.write_text("x" * 40)
    os.chmod(kf, 0o644)
    with pytest.raises(ApiKeyError, match="chmod 600"):
        resolve_api_key(kf, env={})


# ------------------------------------------------------------------------------------------ config


def test_shipped_serve_configs_load(repo_root):
    for path in sorted((repo_root / "configs").glob("serve*.yaml")):
        cfg = load_config(path, ServeConfig)
        assert cfg.auth.enabled, f"{path}: auth must be on by default"


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="max_queue"):
        from_dict(ServeConfig, {"max_queue": 0})
    with pytest.raises(ConfigError, match="defaults.octree_resolution"):
        from_dict(ServeConfig, {"defaults": {"octree_resolution": 4096}})
    with pytest.raises(ConfigError, match="max_request_bytes"):
        from_dict(ServeConfig, {"limits": {"max_request_bytes": 10}})
    with pytest.raises(ConfigError, match="did you mean 'max_queue'"):
        from_dict(ServeConfig, {"max_queu": 3})


# ------------------------------------------------------------------------------------------ params


def test_params_defaults_and_parsing():
    p = parse_params({}, DEF, LIM)
    assert (p.steps, p.guidance, p.octree_resolution, p.seed) == (50, 5.0, 1024, 42)
    p = parse_params({"steps": " 7 ", "guidance": "2.5", "octree_resolution": "64", "seed": "0"}, DEF, LIM)
    assert (p.steps, p.guidance, p.octree_resolution, p.seed) == (7, 2.5, 64, 0)


@pytest.mark.parametrize(
    "fields,code",
    [
        ({"steps": "1.5"}, "invalid_parameter"),
        ({"steps": "1e3"}, "invalid_parameter"),
        ({"steps": "0"}, "parameter_out_of_range"),
        ({"guidance": "nan"}, "invalid_parameter"),
        ({"guidance": "inf"}, "invalid_parameter"),
        ({"guidance": "-1"}, "parameter_out_of_range"),
        ({"octree_resolution": "8"}, "parameter_out_of_range"),
        ({"seed": "-1"}, "parameter_out_of_range"),
        ({"seed": str(2**40)}, "parameter_out_of_range"),
    ],
)
def test_params_rejected(fields, code):
    with pytest.raises(RequestError) as e:
        parse_params(fields, DEF, LIM)
    assert e.value.status == 422 and e.value.code == code and e.value.field == next(iter(fields))


def test_split_form_structure():
    class Up:
        filename = "x"
        file = io.BytesIO(b"")

    files, params = split_form([("image", Up()), ("coarse_mesh", Up()), ("steps", "3")])
    assert set(files) == {"image", "coarse_mesh"} and params == {"steps": "3"}
    for items, code in [
        ([("coarse_mesh", Up())], "missing_field"),
        ([("image", "text"), ("coarse_mesh", Up())], "not_a_file"),
        ([("image", Up()), ("coarse_mesh", Up()), ("stepz", "3")], "unknown_field"),
        ([("image", Up()), ("image", Up()), ("coarse_mesh", Up())], "duplicate_field"),
        ([("image", Up()), ("coarse_mesh", Up()), ("seed", Up())], "not_a_value"),
    ]:
        with pytest.raises(RequestError) as e:
            split_form(items)
        assert e.value.status == 400 and e.value.code == code


# ------------------------------------------------------------------------------------------ formats


def test_sniff_mesh_formats_by_content():
    box = trimesh.creation.box()
    assert sniff_mesh(glb(box)) == "glb"
    for ft in ("obj", "ply", "stl", "off"):
        data = box.export(file_type=ft)
        data = data.encode() if isinstance(data, str) else data
        assert sniff_mesh(data) == ft, ft
    assert sniff_mesh(trimesh.exchange.stl.export_stl_ascii(box).encode()) == "stl"
    assert sniff_mesh(b"\xef\xbb\xbf" + box.export(file_type="obj").encode()) == "obj"  # with a UTF-8 BOM


@pytest.mark.parametrize(
    "data,needle",
    [
        (png(), "PNG image"),
        (b"PK\x03\x04" + b"\0" * 100, "zip"),
        (b'{"asset": {"version": "2.0"}}', ".gltf JSON"),
        (os.urandom(200), "not a mesh format"),
    ],
)
def test_sniff_mesh_refuses_and_names_what_it_saw(data, needle):
    with pytest.raises(RequestError) as e:
        sniff_mesh(data)
    assert e.value.status == 415 and needle in e.value.message


def test_sniff_image():
    assert sniff_image(png()) == "PNG"
    with pytest.raises(RequestError) as e:
        sniff_image(glb(trimesh.creation.box()))
    assert e.value.status == 415 and "GLB mesh" in e.value.message


def test_decode_image_modes_and_bounds():
    assert decode_image(png(mode="L"), LIM).mode == "RGB"
    assert decode_image(png(mode="RGBA"), LIM).mode == "RGBA"
    with pytest.raises(RequestError, match="at least"):
        decode_image(png(4, 4), LIM)
    with pytest.raises(RequestError) as e:
        decode_image(png()[:60], LIM)  # header intact, pixel data cut off
    assert e.value.code == "corrupt_image"
    # A header claiming 100k x 100k px is refused before any pixel is decoded.
    big = bytearray(png())
    struct.pack_into(">II", big, 16, 100_000, 100_000)
    with pytest.raises(RequestError) as e:
        decode_image(bytes(big), LIM)
    assert e.value.status in (413, 422)


def test_decode_mesh_keeps_frame_and_applies_scene_transform():
    m = trimesh.creation.icosphere(1)
    m.apply_translation([100.0, -50.0, 20.0])
    out = decode_mesh(glb(m), LIM)
    np.testing.assert_allclose(out.bounds, m.bounds, atol=1e-5)
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(), transform=trimesh.transformations.translation_matrix([5, 0, 0]))
    out = decode_mesh(scene.export(file_type="glb"), LIM)
    np.testing.assert_allclose(out.bounds.mean(axis=0), [5, 0, 0], atol=1e-6)


@pytest.mark.parametrize(
    "make,code",
    [
        (lambda: trimesh.Trimesh(vertices=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], faces=[[0, 1, 2]]), "mesh_too_small"),
        (lambda: trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]] * 5, process=False), "mesh_too_small"),
        (
            lambda: trimesh.Trimesh(np.zeros((4, 3)), [[0, 1, 2], [0, 2, 3], [0, 1, 3], [1, 2, 3]], process=False),
            "degenerate_mesh",
        ),
    ],
)
def test_decode_mesh_rejects_tiny_and_degenerate(make, code):
    with pytest.raises(RequestError) as e:
        decode_mesh(make().export(file_type="ply"), LIM)
    assert e.value.status == 422 and e.value.code == code


def test_decode_mesh_rejects_point_cloud_nan_overflow_and_huge():
    pc = trimesh.PointCloud(np.random.rand(10, 3)).export(file_type="ply")
    with pytest.raises(RequestError) as e:
        decode_mesh(pc, LIM)
    assert e.value.code == "empty_mesh"
    obj = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv nan 0 1\nf 1 2 3\nf 1 2 4\nf 2 3 4\nf 1 3 4\n".encode()
    with pytest.raises(RequestError) as e:
        decode_mesh(obj, LIM)
    assert e.value.code == "invalid_mesh"
    # float64 coordinates whose span overflows: every vertex is finite, the bounding box is not.
    far = "v -1e308 0 0\nv 1e308 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 2 3 4\nf 1 3 4\n".encode()
    with pytest.raises(RequestError) as e:
        decode_mesh(far, LIM)
    assert e.value.code == "invalid_mesh"
    small_cap = LimitsConfig(max_mesh_faces=10, max_mesh_vertices=10)
    with pytest.raises(RequestError) as e:
        decode_mesh(glb(trimesh.creation.icosphere(2)), small_cap)
    assert e.value.status == 413 and e.value.code == "mesh_too_large"


def test_polygon_off_is_fan_triangulated_and_colours_ignored():
    # A cube written with quads and per-face colours (as CGAL/Geomview write), which trimesh refuses.
    off = (
        "# quads\nCOFF\n8 6 0\n"
        "0 0 0 1 0 0\n1 0 0 1 0 0\n1 1 0 1 0 0\n0 1 0 1 0 0\n0 0 1 1 0 0\n1 0 1 1 0 0\n1 1 1 1 0 0\n0 1 1 1 0 0\n"
        "4 0 3 2 1 0.9 0 0\n4 4 5 6 7\n4 0 1 5 4\n4 1 2 6 5\n4 2 3 7 6\n4 3 0 4 7\n"
    ).encode()
    m = decode_mesh(off, LIM)
    assert len(m.faces) == 12 and m.is_watertight and abs(m.area - 6.0) < 1e-9
    for bad, code in [
        (b"OFF\n8 6 0\n0 0 0\n", "corrupt_mesh"),  # fewer lines than declared
        (b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1 2 9\n", "invalid_mesh"),  # index out of range
    ]:
        with pytest.raises(RequestError) as e:
            decode_mesh(bad, LIM)
        assert e.value.code == code, e.value.message
    with pytest.raises(RequestError) as e:
        decode_mesh(b"OFF\n9999999 1 0\n", LimitsConfig(max_mesh_vertices=1000, max_mesh_faces=1000))
    assert e.value.status == 413


def test_empty_ascii_stl_is_an_empty_mesh_not_an_unknown_format():
    with pytest.raises(RequestError) as e:
        decode_mesh(b"solid Empty\nendsolid Empty\n", LIM)
    assert e.value.code == "empty_mesh"


def test_decode_mesh_refuses_instanced_scene_before_expanding_it(monkeypatch):
    # One 320-face sphere referenced by 2,000 nodes: under 1 MB of GLB, 640k faces once flattened.
    # The cap must apply to the flattened count *before* trimesh builds the copies (an 8,000-node
    # version of this took 5.3 GB in the worker), so flattening here is an error.
    sphere = trimesh.creation.icosphere(2)
    scene = trimesh.Scene()
    scene.add_geometry(sphere, geom_name="sphere", node_name="n0")
    for i in range(1, 2000):
        tf = np.eye(4)
        tf[:3, 3] = [i % 50, i // 50, 0]
        scene.graph.update(frame_to=f"n{i}", frame_from=scene.graph.base_frame, matrix=tf, geometry="sphere")
    data = scene.export(file_type="glb")
    assert len(data) < 1_000_000
    loaded = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    assert len(loaded.geometry) == 1 and len(loaded.graph.nodes_geometry) == 2000  # instancing survived export

    def no_flatten(self, *a, **k):
        raise AssertionError("the scene was flattened before the instanced face count was checked")

    monkeypatch.setattr(trimesh.Scene, "dump", no_flatten)
    with pytest.raises(RequestError) as e:
        decode_mesh(data, LimitsConfig(max_mesh_faces=100_000, max_mesh_vertices=100_000))
    assert e.value.status == 413 and e.value.code == "mesh_too_large"
    assert "instances" in str(e.value)
