"""Mutated requests through both check layers (the HTTP guard, then the worker's decode_request).

No model is needed: the guard runs in front of a recording app, and whatever passes it is decoded
the way the worker decodes it. Every outcome must be a pass or a 4xx with a JSON error; never an
exception that LitServe would turn into a 500.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import trimesh
from fastapi import HTTPException
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ml.config import from_dict
from ml.serving.api import RefineAPI
from ml.serving.auth import ApiKey
from ml.serving.client import encode_multipart
from ml.serving.config import ServeConfig
from ml.serving.guard import Guard, GuardSettings

pytestmark = pytest.mark.unit
KEY = "fuzz-key-0123456789abcdef"
N_MUTATIONS = 150


def _inputs() -> tuple[bytes, bytes]:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((8, 8, 56, 56), fill=(200, 120, 60, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), trimesh.creation.icosphere(1).export(file_type="glb")


@pytest.fixture(scope="module")
def rig():
    cfg = from_dict(ServeConfig, {"limits": {"max_mesh_bytes": 200_000, "max_image_bytes": 100_000, "max_request_bytes": 400_000}})
    api = RefineAPI("unused.pt", "unused.yaml", cfg)  # decode_request only: no setup, no model
    decoded: list = []

    async def infer(request: Request) -> Response:
        form = await request.form()
        try:
            api.decode_request(form)
        except HTTPException as e:
            assert 400 <= e.status_code < 500 and isinstance(e.detail, dict), e
            return Response(status_code=e.status_code)
        decoded.append(1)
        return Response(b"ok", status_code=200)

    app = Starlette(routes=[Route("/infer", infer, methods=["POST"])])
    app.add_middleware(Guard, settings=GuardSettings.create(cfg, ApiKey(KEY, "test", False)))
    with TestClient(app, raise_server_exceptions=True) as client:
        yield client, decoded


def test_valid_request_passes_both_layers(rig):
    client, decoded = rig
    png, glb = _inputs()
    body, ctype = encode_multipart({"steps": "3"}, {"image": ("v.png", png), "coarse_mesh": ("m.glb", glb)})
    n = len(decoded)
    r = client.post("/infer", content=body, headers={"Content-Type": ctype, "X-API-Key": KEY})
    assert r.status_code == 200 and len(decoded) == n + 1


def test_mutated_requests_never_5xx(rig):
    client, _ = rig
    png, glb = _inputs()
    body, ctype = encode_multipart({"steps": "3", "seed": "5"}, {"image": ("v.png", png), "coarse_mesh": ("m.glb", glb)})
    rng = np.random.default_rng(0)
    seen: dict[int, int] = {}
    for i in range(N_MUTATIONS):
        b = bytearray(body)
        kind = i % 4
        if kind == 0:  # truncation anywhere
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 1:  # a burst of flipped bytes
            at = int(rng.integers(0, len(b)))
            for j in range(at, min(len(b), at + int(rng.integers(1, 64)))):
                b[j] = int(rng.integers(0, 256))
        elif kind == 2:  # a chunk deleted
            at = int(rng.integers(0, len(b)))
            del b[at : at + int(rng.integers(1, 2000))]
        else:  # a chunk duplicated
            at = int(rng.integers(0, len(b)))
            b[at:at] = b[at : at + int(rng.integers(1, 2000))]
        r = client.post("/infer", content=bytes(b), headers={"Content-Type": ctype, "X-API-Key": KEY})
        assert r.status_code == 200 or 400 <= r.status_code < 500, (i, kind, r.status_code, r.text[:300])
        if r.status_code != 200 and r.content:
            assert r.headers["content-type"].startswith("application/json") or r.content == b""
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert len(seen) >= 3, seen  # the mutations reach several different checks


# ------------------------------------------------------------------------------------- guard alone


class _Downstream:
    """An ASGI app standing in for LitServe behind the guard: records what reaches it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _drive(guard: Guard, headers: list[tuple[bytes, bytes]], receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/infer", "headers": headers, "query_string": b""}
    await guard(scope, receive, send)
    return sent


def _status_and_body(sent: list[dict]) -> tuple[int, dict]:
    import json

    return sent[0]["status"], json.loads(sent[1]["body"])


def test_full_queue_is_503_before_the_body_is_read():
    import asyncio

    cfg = from_dict(ServeConfig, {"max_queue": 2})
    settings = GuardSettings.create(cfg, ApiKey(KEY, "test", False))
    down = _Downstream()
    guard = Guard(down, settings)
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"x-api-key", KEY.encode()), (b"content-type", b"multipart/form-data; boundary=x")]
    settings.inflight.value = 2  # two requests already admitted
    status, body = _status_and_body(asyncio.run(_drive(guard, headers, receive)))
    assert status == 503 and body["detail"]["code"] == "queue_full"
    assert reads == 0 and down.calls == 0 and settings.inflight.value == 2


def test_slow_upload_is_408_and_frees_its_slot():
    import asyncio

    cfg = from_dict(ServeConfig, {"upload_timeout_s": 0.3})
    settings = GuardSettings.create(cfg, ApiKey(KEY, "test", False))
    guard = Guard(_Downstream(), settings)
    first = True

    async def receive():  # one chunk, then the client goes quiet
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"--x\r\n", "more_body": True}
        await asyncio.sleep(3600)

    headers = [(b"x-api-key", KEY.encode()), (b"content-type", b"multipart/form-data; boundary=x")]
    status, body = _status_and_body(asyncio.run(_drive(guard, headers, receive)))
    assert status == 408 and body["detail"]["code"] == "upload_timeout"
    assert settings.inflight.value == 0


def test_chunked_upload_over_the_cap_stops_reading():
    import asyncio

    cfg = from_dict(ServeConfig, {"limits": {"max_request_bytes": 100_000, "max_image_bytes": 50_000, "max_mesh_bytes": 50_000}})
    guard = Guard(_Downstream(), GuardSettings.create(cfg, ApiKey(KEY, "test", False)))
    chunks = 0

    async def receive():  # no Content-Length: 64 KiB chunks forever
        nonlocal chunks
        chunks += 1
        return {"type": "http.request", "body": b"\0" * 65536, "more_body": True}

    headers = [(b"x-api-key", KEY.encode()), (b"content-type", b"multipart/form-data; boundary=x")]
    status, body = _status_and_body(asyncio.run(_drive(guard, headers, receive)))
    assert status == 413 and body["detail"]["code"] == "request_too_large"
    assert chunks <= (100_000 + 65536) // 65536 + 2
