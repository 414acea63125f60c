"""The refine API in process (LitServe worker + FastAPI TestClient) with the tiny random model.

    .venv/bin/python -m pytest tests/ml/serving/test_serving_api.py -q
"""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
import trimesh
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start
from PIL import Image

from ml.config import load_config
from ml.serving.api import build_server
from ml.serving.auth import ApiKey
from ml.serving.config import ServeConfig

pytestmark = pytest.mark.integration
TEST_KEY = "serving-tests-key-0123456789abcdef"  # as in conftest.py

# Small caps, so that "too large" inputs stay small in the test.
OVERRIDES = {
    "limits.max_mesh_faces": 5000,
    "limits.max_mesh_vertices": 5000,
    "limits.max_mesh_bytes": 300_000,
    "limits.max_image_bytes": 200_000,
    "limits.max_request_bytes": 600_000,
}
FAST = {"steps": "2", "octree_resolution": "16"}
AUTH = {"X-API-Key": TEST_KEY}


@pytest.fixture(scope="module")
def served(tiny_model, repo_root):
    ckpt, config = tiny_model
    cfg = load_config(repo_root / "configs" / "serve-tiny.yaml", ServeConfig, OVERRIDES)
    server = build_server(ckpt, config, cfg, ApiKey(TEST_KEY, "test", generated=False))
    with wrap_litserve_start(server) as srv, TestClient(srv.app) as client:
        t_end = time.monotonic() + 180
        while client.get("/health").status_code != 200:
            assert time.monotonic() < t_end, f"model not loaded in time: {client.get('/health').json()}"
            time.sleep(0.2)
        yield client, cfg


def post(client, files=None, data=None, headers=AUTH, **kw):
    return client.post("/infer", files=files, data=data, headers=headers, **kw)


# ------------------------------------------------------------------------------------- happy path


def test_health_is_open_and_says_where_the_model_is(served):
    client, cfg = served
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["model_loaded"] is True and body["device"] == "cpu" and body["status"] == "ok"
    assert body["queue"] == {"inflight": 0, "max": cfg.max_queue}


def test_good_request_gives_glb_in_input_frame_same_as_ml_refine(served, view_png, coarse_glb, coarse_mesh, tiny_model):
    client, _ = served
    r = post(client, files={"image": ("v.png", view_png), "coarse_mesh": ("m.glb", coarse_glb)}, data={**FAST, "seed": "7"})
    assert r.status_code == 200, r.content[:300]
    assert r.headers["content-type"] == "model/gltf-binary"
    assert r.content[:4] == b"glTF"
    out = trimesh.load(io.BytesIO(r.content), file_type="glb", force="mesh")
    assert len(out.faces) > 0 and int(r.headers["x-mesh-faces"]) == len(out.faces)
    # In the input frame: the input sits at (100, -50, 20) with half-sizes (7, 5, 6). The model works in
    # [-1, 1]^3 after a uniform scale by the largest side, so mapped back the result lies in the cube of
    # half-size 7 around the input's centre, and (even with random weights) is of that size, not unit-sized.
    lo, hi = coarse_mesh.bounds
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    assert np.all(np.abs(out.bounds - centre) <= half * 1.02), (out.bounds, centre, half)
    assert 0.5 * half < (out.bounds[1] - out.bounds[0]).max() / 2 <= 1.02 * half
    assert np.linalg.norm(out.bounds.mean(axis=0) - centre) < 0.2 * half

    # The same pipeline as `python -m ml.refine`: the same inputs and seed give the same mesh.
    import torch

    from ml.refine import RefinePipeline

    ckpt, config = tiny_model
    torch.set_num_threads(1)  # as the worker (serve-tiny.yaml torch_threads: 1): same reduction order
    pipe = RefinePipeline.from_checkpoint(ckpt, config, device="cpu")
    ref = pipe(Image.open(io.BytesIO(view_png)), trimesh.load(io.BytesIO(coarse_glb), file_type="glb", force="mesh"),
               steps=2, octree_resolution=16, seed=7)
    assert len(ref.faces) == len(out.faces)
    np.testing.assert_allclose(np.sort(out.vertices, axis=0), np.sort(ref.vertices, axis=0), atol=1e-4)


def test_parameters_are_used(served, view_png, coarse_glb):
    client, _ = served
    files = {"image": ("v.png", view_png), "coarse_mesh": ("m.glb", coarse_glb)}
    a = post(client, files=files, data={"steps": "2", "octree_resolution": "16"})
    b = post(client, files=files, data={"steps": "2", "octree_resolution": "32"})
    assert a.status_code == b.status_code == 200
    # A finer marching-cubes grid gives a finer mesh: the form values reach the pipeline.
    assert int(b.headers["x-mesh-faces"]) > 2 * int(a.headers["x-mesh-faces"])


# ------------------------------------------------------------------------------------- auth


def test_missing_or_wrong_key_is_401_and_health_docs_stay_open(served, view_png, coarse_glb):
    client, _ = served
    files = {"image": ("v.png", view_png), "coarse_mesh": ("m.glb", coarse_glb)}
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": TEST_KEY + "x"}, {"Authorization": "Bearer nope"}):
        r = post(client, files=files, data=FAST, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["detail"]["code"] == "unauthorized"
        assert "X-API-Key" in r.headers["www-authenticate"]
    for path in ("/info", "/"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=AUTH).status_code == 200
    for path in ("/health", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200
    # Bearer works too; a structurally bad request then gets past auth to a 400.
    r = post(client, files={"image": ("v.png", view_png)}, headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert r.status_code == 400


def test_openapi_documents_the_multipart_body_and_key(served):
    client, _ = served
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/infer"]["post"]
    props = op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(props) == {"image", "coarse_mesh", "steps", "guidance", "octree_resolution", "seed", "timeout_s"}
    assert props["octree_resolution"]["maximum"] == 128
    assert op["security"] == [{"ApiKey": []}]
    assert spec["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert "model/gltf-binary" in op["responses"]["200"]["content"]
    assert "security" not in spec["paths"]["/health"]["get"]
    # The hand-written parts are valid OpenAPI 3.1 schemas, and they accept what the server accepts.
    from openapi_schema_validator import OAS31Validator

    body_schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    OAS31Validator.check_schema(body_schema)
    OAS31Validator.check_schema(spec["components"]["schemas"]["Error"])
    OAS31Validator(body_schema).validate({"image": "x", "coarse_mesh": "y", "steps": 4, "octree_resolution": 32})
    assert not OAS31Validator(body_schema).is_valid({"image": "x", "coarse_mesh": "y", "steps": 1})


# ------------------------------------------------------------------------------------- bad input


def _png(w, h, mode="RGBA", color=(200, 120, 60, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color[: len(mode)] if mode != "L" else 128).save(buf, format="PNG")
    return buf.getvalue()


def _glb_with_bad_json() -> bytes:
    js = b'{"asset": {"version": "2.0"}, "meshes": [{"primitives": [{"attributes": {"POSITION": 9}}]}]}  '
    js += b" " * (-len(js) % 4)
    return struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(js)) + struct.pack("<I4s", len(js), b"JSON") + js


def _mesh_bytes(kind: str) -> bytes:
    if kind == "point_cloud":
        return trimesh.PointCloud(np.random.default_rng(0).random((50, 3))).export(file_type="ply")
    if kind == "one_triangle":
        return trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]]).export(file_type="glb")
    if kind == "collapsed":
        return trimesh.Trimesh(np.ones((4, 3)), [[0, 1, 2], [0, 2, 3], [0, 1, 3], [1, 2, 3]], process=False).export(
            file_type="ply"
        )
    if kind == "nan":
        return b"v 0 0 0\nv 1 0 0\nv 0 1 0\nv nan 0 1\nf 1 2 3\nf 1 2 4\nf 2 3 4\nf 1 3 4\n"
    if kind == "too_many_faces":
        return trimesh.creation.icosphere(subdivisions=4).export(file_type="glb")  # 5120 faces > 5000
    raise KeyError(kind)


def _thin_stripe_png() -> bytes:
    # 600x600, opaque only in a 2-px horizontal stripe: fitted into the square it is 0 px high
    a = np.zeros((600, 600, 4), dtype=np.uint8)
    a[300:302, 20:580] = (200, 50, 50, 255)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _case(files=None, data=None, content=None, ctype=None):
    return {"files": files, "data": data, "content": content, "ctype": ctype}


# name -> (request builder taking (png, glb), expected status, accepted error codes)
BAD = {
    "json_body": (lambda p, g: _case(content=b'{"image": "x"}', ctype="application/json"), 415, {"unsupported_media_type"}),
    "text_body": (lambda p, g: _case(content=b"image=x", ctype="text/plain"), 415, {"unsupported_media_type"}),
    "multipart_no_boundary": (lambda p, g: _case(content=b"xx", ctype="multipart/form-data"), 400, {"malformed_multipart"}),
    "multipart_garbage": (
        lambda p, g: _case(content=b"--zz\r\nnot a part header\r\n\r\n\x00\x01", ctype="multipart/form-data; boundary=zz"),
        400,
        {"malformed_multipart", "missing_field"},
    ),
    "missing_image": (lambda p, g: _case(files={"coarse_mesh": ("m.glb", g)}), 400, {"missing_field"}),
    "missing_mesh": (lambda p, g: _case(files={"image": ("v.png", p)}), 400, {"missing_field"}),
    "unknown_field": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"stepz": "3"}), 400, {"unknown_field"}),
    "duplicate_field": (
        lambda p, g: _case(files=[("image", ("a.png", p)), ("image", ("b.png", p)), ("coarse_mesh", ("m.glb", g))]),
        400,
        {"duplicate_field"},
    ),
    "image_as_text": (lambda p, g: _case(files={"coarse_mesh": ("m.glb", g)}, data={"image": "view.png"}), 400, {"not_a_file"}),
    "steps_not_int": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"steps": "ten"}), 422, {"invalid_parameter"}),
    "steps_one": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"steps": "1"}), 422, {"parameter_out_of_range"}),
    "steps_huge": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"steps": "100000"}), 422, {"parameter_out_of_range"}),
    "guidance_nan": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"guidance": "nan"}), 422, {"invalid_parameter"}),
    "octree_too_big": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"octree_resolution": "4096"}), 422, {"parameter_out_of_range"}),
    "seed_negative": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g)}, data={"seed": "-3"}), 422, {"parameter_out_of_range"}),
    "image_not_an_image": (lambda p, g: _case(files={"image": ("v.png", b"hello, world"), "coarse_mesh": ("m.glb", g)}), 415, {"unsupported_image_format"}),
    "image_is_a_mesh": (lambda p, g: _case(files={"image": ("v.png", g), "coarse_mesh": ("m.glb", g)}), 415, {"unsupported_image_format"}),
    "image_truncated": (lambda p, g: _case(files={"image": ("v.png", p[:60]), "coarse_mesh": ("m.glb", g)}), 422, {"corrupt_image"}),
    "image_2x2": (lambda p, g: _case(files={"image": ("v.png", _png(2, 2)), "coarse_mesh": ("m.glb", g)}), 422, {"image_too_small"}),
    "image_fully_transparent": (
        lambda p, g: _case(files={"image": ("v.png", _png(64, 64, color=(0, 0, 0, 0))), "coarse_mesh": ("m.glb", g)}, data=FAST),
        422,
        {"unrefinable_input"},
    ),
    "image_over_byte_cap": (
        lambda p, g: _case(files={"image": ("v.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 250_000), "coarse_mesh": ("m.glb", g)}),
        413,
        {"file_too_large"},
    ),
    "mesh_empty_file": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", b"")}), 400, {"empty_file"}),
    "mesh_random_bytes": (
        lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", np.random.default_rng(1).bytes(999))}),
        415,
        {"unsupported_mesh_format"},
    ),
    "mesh_is_an_image": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", p)}), 415, {"unsupported_mesh_format"}),
    "mesh_gltf_json": (
        lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.gltf", b'{"asset": {"version": "2.0"}, "buffers": [{"uri": "m.bin"}]}')}),
        415,
        {"unsupported_mesh_format"},
    ),
    "mesh_truncated_glb": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", g[: len(g) // 2])}), 422, {"corrupt_mesh"}),
    "mesh_glb_bad_json": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", _glb_with_bad_json())}), 422, {"corrupt_mesh", "empty_mesh"}),
    "mesh_point_cloud": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.ply", _mesh_bytes("point_cloud"))}), 422, {"empty_mesh"}),
    "mesh_one_triangle": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", _mesh_bytes("one_triangle"))}), 422, {"mesh_too_small"}),
    "mesh_collapsed_to_a_point": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.ply", _mesh_bytes("collapsed"))}), 422, {"degenerate_mesh"}),
    "mesh_nan_vertex": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.obj", _mesh_bytes("nan"))}), 422, {"invalid_mesh"}),
    "mesh_obj_garbage": (
        lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.obj", b"v 1 2\nv x y z\nf 9 9 9\n")}),
        422,
        {"corrupt_mesh", "empty_mesh", "invalid_mesh"},
    ),
    "image_object_too_thin": (
        lambda p, g: _case(files={"image": ("v.png", _thin_stripe_png()), "coarse_mesh": ("m.glb", g)}),
        422,
        {"unrefinable_input"},
    ),
    "mesh_too_many_faces": (lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.glb", _mesh_bytes("too_many_faces"))}), 413, {"mesh_too_large"}),
    "mesh_over_byte_cap": (
        lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.obj", b"v 0 0 0\n" * 40_000)}),
        413,
        {"file_too_large"},
    ),
    "body_over_request_cap": (
        lambda p, g: _case(files={"image": ("v.png", p), "coarse_mesh": ("m.obj", b"v 0 0 0\n" * 90_000)}),
        413,
        {"request_too_large"},
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_input_is_a_4xx_naming_the_problem(served, view_png, coarse_glb, name):
    client, _ = served
    build, status, codes = BAD[name]
    c = build(view_png, coarse_glb)
    headers = dict(AUTH)
    if c["ctype"]:
        headers["Content-Type"] = c["ctype"]
    if c["content"] is not None:
        r = client.post("/infer", content=c["content"], headers=headers)
    else:
        r = client.post("/infer", files=c["files"], data=c["data"], headers=headers)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert detail["code"] in codes, (name, detail)
    assert len(detail["message"]) > 10


def test_media_type_case_and_no_gzip(served, view_png, coarse_glb):
    client, _ = served
    from ml.serving.client import encode_multipart

    body, ctype = encode_multipart(FAST, {"image": ("v.png", view_png), "coarse_mesh": ("m.glb", coarse_glb)})
    ctype = ctype.replace("multipart/form-data", "Multipart/Form-Data")
    r = client.post("/infer", content=body, headers={**AUTH, "Content-Type": ctype, "Accept-Encoding": "gzip"})
    assert r.status_code == 200, r.content[:300]
    assert "content-encoding" not in r.headers  # GLBs are sent as they are (see build_server)


def test_wrong_method_is_405(served):
    client, _ = served
    assert client.get("/infer", headers=AUTH).status_code == 405


def test_timeout_aborts_the_refinement_and_the_worker_carries_on(served, view_png, coarse_glb):
    client, cfg = served
    files = {"image": ("v.png", view_png), "coarse_mesh": ("m.glb", coarse_glb)}
    t0 = time.monotonic()
    # 128^3 decoding takes ~10 s on one core: far past a 1 s limit, which the client may set below the
    # server's request_timeout_s (the same deadline mechanism serves both).
    r = post(client, files=files, data={"steps": "4", "octree_resolution": "128", "timeout_s": "1"})
    took = time.monotonic() - t0
    assert r.status_code == 504, (r.status_code, r.headers)
    assert r.json()["detail"]["code"] == "timeout"
    assert took < 6, took
    r = post(client, files=files, data={**FAST, "timeout_s": str(cfg.request_timeout_s + 1)})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "timeout_s"
    r = post(client, files=files, data=FAST)
    assert r.status_code == 200


def test_still_serving_after_all_the_bad_input(served, view_png, coarse_glb):
    client, _ = served
    h = client.get("/health").json()
    assert h["model_loaded"] and h["workers"] == {"infer_0": "ready"} and h["queue"]["inflight"] == 0
    r = post(client, files={"image": ("v.png", view_png), "coarse_mesh": ("m.glb", coarse_glb)}, data=FAST)
    assert r.status_code == 200 and r.content[:4] == b"glTF"
    assert json.loads(client.get("/health").content)["status"] == "ok"
