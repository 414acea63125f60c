"""A small stdlib client for the refine API, and a launcher for the server as a child process.

    from ml.serving.client import RefineClient
    glb = RefineClient("http://127.0.0.1:8000", api_key).infer("view.png", "coarse.glb", steps=50)

    with ServerProcess(["--ckpt", ck, "--config", cfg, "--port", "8123"]) as srv:   # tests, bench, local demo
        RefineClient(srv.url, key).health()

No third-party HTTP library: this runs on laptops (`fab infer`) and pods alike.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from ml.serving.validation import IMAGE_FIELD, MESH_FIELD


class ServingError(RuntimeError):
    """A non-2xx answer from the server; `detail` is its JSON error body when it sent one."""

    def __init__(self, status: int, detail: dict | str):
        self.status = status
        self.detail = detail
        msg = detail.get("message", detail) if isinstance(detail, dict) else detail
        code = f" [{detail.get('code')}]" if isinstance(detail, dict) and detail.get("code") else ""
        super().__init__(f"HTTP {status}{code}: {msg}")


def encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) for multipart/form-data."""
    boundary = "----ultrashape" + secrets.token_hex(16)
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, data) in files.items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _as_file(x: str | os.PathLike | bytes, default_name: str) -> tuple[str, bytes]:
    if isinstance(x, (bytes, bytearray)):
        return default_name, bytes(x)
    p = Path(x)
    return p.name, p.read_bytes()


class RefineClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _open(self, req: urllib.request.Request) -> tuple[int, bytes, dict]:
        if self.api_key:
            req.add_header("X-API-Key", self.api_key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                detail = json.loads(body).get("detail", body.decode(errors="replace"))
            except (ValueError, AttributeError):
                detail = body.decode(errors="replace")[:500]
            raise ServingError(e.code, detail) from None

    def health(self) -> dict:
        """GET /health (no key needed); its JSON whether ready (200) or still loading (503)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=min(self.timeout_s, 10.0)) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return json.loads(e.read())
            raise ServingError(e.code, e.read().decode(errors="replace")[:500]) from None

    def infer(
        self,
        image: str | os.PathLike | bytes,
        coarse_mesh: str | os.PathLike | bytes,
        **params: int | float,
    ) -> bytes:
        """POST /infer; returns the refined GLB bytes. params: steps, guidance, octree_resolution, seed, timeout_s."""
        return self.infer_with_headers(image, coarse_mesh, **params)[0]

    def infer_with_headers(
        self,
        image: str | os.PathLike | bytes,
        coarse_mesh: str | os.PathLike | bytes,
        **params: int | float,
    ) -> tuple[bytes, dict]:
        """As infer(), plus the response headers, lower-cased (x-mesh-faces, x-refine-seconds, ...)."""
        fields = {k: str(v) for k, v in params.items() if v is not None}
        body, ctype = encode_multipart(
            fields, {IMAGE_FIELD: _as_file(image, "image.png"), MESH_FIELD: _as_file(coarse_mesh, "coarse_mesh.glb")}
        )
        req = urllib.request.Request(f"{self.url}/infer", data=body, method="POST", headers={"Content-Type": ctype})
        _, out, headers = self._open(req)
        return out, headers


class ServerProcess:
    """`python -m ml.serving ARGS` as a child in its own process group; waits for the ready line.

    Leaving the `with` block (or stop()) ends the whole group: LitServe's API server, its inference
    worker and its multiprocessing manager are all children of this process.
    """

    READY_PREFIX = "ml.serving: ready on "

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 start_timeout_s: float = 300.0, python: str = sys.executable):
        self.cmd = [python, "-m", "ml.serving", *args]
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=400)
        self.url: str | None = None
        self._ready = threading.Event()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,  # own process group: stop() kills the tree
        )
        threading.Thread(target=self._pump, daemon=True, name="server-output").start()
        t_end = time.monotonic() + self.start_timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.output()}")
            if time.monotonic() > t_end:
                self.stop()
                raise TimeoutError(f"server not ready within {self.start_timeout_s:g} s:\n{self.output()}")

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(self.READY_PREFIX) and not self._ready.is_set():
                self.url = line[len(self.READY_PREFIX):].split()[0].replace("0.0.0.0", "127.0.0.1")
                self._ready.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        # start_new_session made the child a group leader: its pid is the group id, which stays valid
        # (and reachable with killpg) after the child itself has exited and been reaped, as long as
        # its orphans live. os.getpgid(pid) would fail exactly then.
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)  # ml.serving shuts LitServe down cleanly on SIGTERM
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # whatever is left of the group (workers, manager)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
