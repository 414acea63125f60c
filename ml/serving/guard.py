"""The HTTP guard: auth, admission (bounded queue), upload limits and request checks, before LitServe.

It is a plain ASGI middleware wrapped around LitServe's FastAPI app, because three things must
happen before LitServe sees a request, and LitServe 0.2.x has no hook for them:
- the key is checked before a single body byte is read (LitServe's own auth is a route dependency,
  which runs only after the middleware stack has read the body);
- a full queue answers 503 at once, so a burst costs no memory and no worker time;
- a body that is not well-formed multipart would make LitServe's handler answer 500
  (it parses the form itself and turns every parser error into "Internal server error").
Requests that pass are replayed, byte for byte, to LitServe.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from ml.serving.auth import ApiKey
from ml.serving.config import ServeConfig
from ml.serving.validation import (
    IMAGE_FIELD,
    KNOWN_FIELDS,
    MESH_FIELD,
    RequestError,
    check_part_size,
    parse_params,
    sniff_image,
    sniff_mesh,
    split_form,
)

log = logging.getLogger("ml.serving")

INFER_PATH = "/infer"
# Reachable without a key: liveness for load balancers and `fab serve`, and the API's own docs.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the two files
TEXT_PART_MAX = 1024  # a parameter value longer than this is not a number anybody means


class InflightCounter:
    """Requests admitted and not yet answered.

    A plain counter: the guard runs on one asyncio loop (ml.serving starts exactly one API server
    process, num_api_servers=1), so admission needs no lock. With several API server processes the
    bound would hold per process.
    """

    def __init__(self) -> None:
        self.value = 0


@dataclass
class GuardSettings:
    cfg: ServeConfig
    api_key: ApiKey | None  # None: auth disabled (loopback only; __main__ enforces that)
    inflight: InflightCounter

    @classmethod
    def create(cls, cfg: ServeConfig, api_key: ApiKey | None) -> GuardSettings:
        return cls(cfg=cfg, api_key=api_key, inflight=InflightCounter())

    @property
    def backstop_s(self) -> float:
        # The worker aborts a refinement at request_timeout_s and LitServe drops one that queued for
        # queue_timeout_s; this outer limit only fires if a worker hangs outside the model (e.g. in a
        # C extension), so a client never waits forever.
        return self.cfg.queue_timeout_s + self.cfg.request_timeout_s + 30.0


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    for k, v in (headers or {}).items():
        raw.append((k.lower().encode(), v.encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def send_error(send, err: RequestError, headers: dict[str, str] | None = None) -> None:
    await send_json(send, err.status, {"detail": err.detail()}, headers)


class Guard:
    """ASGI middleware; LitServer(middlewares=[(Guard, {"settings": GuardSettings(...)})])."""

    def __init__(self, app, settings: GuardSettings):
        self.app = app
        self.s = settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.s.api_key is not None and path not in OPEN_PATHS:
            if not self.s.api_key.matches(_presented_key(scope)):
                err = RequestError(
                    401,
                    "unauthorized",
                    "missing or wrong API key: send header 'X-API-Key: <key>' "
                    "(or 'Authorization: Bearer <key>'); the server printed where its key is stored",
                )
                await send_error(send, err, {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})
                return
        if path != INFER_PATH or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if not self._admit():
            err = RequestError(
                503,
                "queue_full",
                f"the server is busy ({self.s.cfg.max_queue} requests running or queued); retry later",
            )
            await send_error(send, err, {"Retry-After": "5"})
            return
        try:
            await self._infer(scope, receive, send)
        finally:
            self.s.inflight.value -= 1

    def _admit(self) -> bool:
        # No await between the check and the increment: atomic on the event loop.
        if self.s.inflight.value >= self.s.cfg.max_queue:
            return False
        self.s.inflight.value += 1
        return True

    async def _infer(self, scope, receive, send) -> None:
        try:
            body = await self._read_checked(scope, receive)
        except RequestError as err:
            await send_error(send, err)
            return
        except _ClientGone:
            return

        sent = False

        async def replay_receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, replay_receive, tracking_send), timeout=self.s.backstop_s)
        except asyncio.TimeoutError:
            log.error("request to %s exceeded the %.0f s backstop; the worker may be stuck", INFER_PATH, self.s.backstop_s)
            if not started:
                err = RequestError(504, "timeout", f"no answer within {self.s.backstop_s:.0f} s; the request was dropped")
                await send_error(send, err)

    async def _read_checked(self, scope, receive) -> bytes:
        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data") and not ctype.startswith("multipart/form-data"):
            # Media types are case-insensitive, but LitServe's handler compares them case-sensitively
            # and would treat "Multipart/Form-Data" as JSON (a 500). Normalise it for LitServe.
            ctype = "multipart/form-data" + ctype[len("multipart/form-data"):]
            scope["headers"] = [(k, ctype.encode("latin-1")) if k == b"content-type" else (k, v)
                                for k, v in scope["headers"]]
        if not ctype.lower().startswith("multipart/form-data"):
            raise RequestError(
                415,
                "unsupported_media_type",
                f"POST {INFER_PATH} takes multipart/form-data (got {ctype[:60] or 'no Content-Type'}); "
                f"e.g. curl -F image=@view.png -F coarse_mesh=@coarse.glb",
            )
        if "boundary=" not in ctype:
            raise RequestError(400, "malformed_multipart", "multipart/form-data Content-Type without a boundary")
        cap = self.s.cfg.limits.max_request_bytes + MULTIPART_SLACK
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "bad_content_length", f"Content-Length {declared[:20]!r} is not a number")
            if int(declared) > cap:
                raise RequestError(
                    413, "request_too_large", f"request body is {declared} bytes; the limit is {cap} bytes"
                )
        try:
            body = await asyncio.wait_for(_read_body(receive, cap), timeout=self.s.cfg.upload_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(
                408, "upload_timeout", f"the upload did not finish within {self.s.cfg.upload_timeout_s:g} s"
            ) from None
        await self._check_form(scope, body)
        return body

    async def _check_form(self, scope, body: bytes) -> None:
        # A scope without "app" makes Starlette raise MultiPartException instead of its own
        # HTTPException, so that parser errors land here as 400s.
        sub_scope = {k: v for k, v in scope.items() if k != "app"}
        done = False

        async def rcv():
            nonlocal done
            if done:
                return {"type": "http.disconnect"}
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(sub_scope, rcv)
        try:
            form = await request.form(
                max_files=len(KNOWN_FIELDS), max_fields=len(KNOWN_FIELDS), max_part_size=TEXT_PART_MAX
            )
        except MultiPartException as e:
            raise RequestError(400, "malformed_multipart", f"the multipart body cannot be parsed: {e.message}") from None
        except Exception as e:  # python-multipart raises its own types on some malformed inputs
            raise RequestError(400, "malformed_multipart", f"the multipart body cannot be parsed: {e}") from None
        try:
            if not form.multi_items():
                raise RequestError(
                    400, "missing_field", f"the form is empty; send '{IMAGE_FIELD}' and '{MESH_FIELD}' files", IMAGE_FIELD
                )
            files, params = split_form(form.multi_items())
            for name, upload in files.items():
                data = await upload.read()
                check_part_size(name, len(data), self.s.cfg.limits)
                if name == IMAGE_FIELD:
                    sniff_image(data[:64])
                else:
                    sniff_mesh(data)
            parse_params(params, self.s.cfg.defaults, self.s.cfg.limits, self.s.cfg.request_timeout_s)
        finally:
            await form.close()


class _ClientGone(Exception):
    pass


async def _read_body(receive, cap: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            # Stop reading here: the rest of an oversized upload is never buffered.
            raise RequestError(413, "request_too_large", f"request body exceeds the limit of {cap} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _presented_key(scope) -> str | None:
    headers = Headers(scope=scope)
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None
