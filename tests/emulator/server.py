"""The RunPod REST v2 emulator: an HTTP server on loopback with RunPod's state machine behind it.

See the package docstring (tests/emulator/__init__.py) for how tests use it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import fnmatch
import json
import secrets
import shutil
import string
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from . import catalog, spec
from .podhost import PodHost, make_key, ssh_supported

ACTIVE = ("PROVISIONING", "STARTING", "RUNNING")
ALLOWED_ACTIONS = {
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
    "ERROR": ["start", "terminate"],
    "PROVISIONING": ["stop", "terminate"],
    "STARTING": ["stop", "terminate"],
}
RATE_LIMIT = '"minute";r=59;t=60, "hour";r=2999;t=3600, "day";r=49999;t=86400'
RATE_LIMIT_POLICY = '"minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400'


class Clock:
    """The emulator's notion of now (Unix seconds). `advance()` moves it forward.

    real=True (the default) also follows wall time, so pods leave PROVISIONING on their own;
    real=False freezes it, for billing tests that need exact figures (then advance it, e.g. by
    passing `sleep=emu.advance` to the RunPodClient so every wait moves the clock)."""

    def __init__(self, start: Optional[float] = None, real: bool = True):
        self._start = float(start if start is not None else time.time())
        self._t0 = time.monotonic()
        self.real = real
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._start + self._offset + ((time.monotonic() - self._t0) if self.real else 0.0)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds


@dataclass
class Fault:
    """An injected failure, matched on method and path (fnmatch pattern)."""

    kind: str  # "status" | "lost"
    method: str
    path: str
    times: Optional[int]  # None = until cleared
    status: int = 500
    detail: str = ""
    retry_after: Optional[int] = None
    apply: bool = True  # for "lost": process the request (True) or drop it unprocessed (False)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and fnmatch.fnmatchcase(path, self.path) and (
            self.times is None or self.hits < self.times
        )


@dataclass
class Segment:
    """A span of time at one billing rate (USD/h), for billing records."""

    start: float
    end: Optional[float]
    gpu_rate: float
    disk_rate: float


@dataclass
class EmuPod:
    """One emulated pod. `workspace` is the host directory its /workspace shows."""

    id: str
    name: str
    body: dict  # the create request as sent
    status: str
    created_at: float
    workspace: Path
    pod_dir: Path
    data_center_id: str
    gpu_type_id: str
    gpu_count: int
    cloud: str
    cost_per_hr: float
    env: dict[str, str]
    host: Optional[PodHost] = None
    ssh_port: Optional[int] = None
    status_since: float = 0.0
    started_at: Optional[float] = None
    segments: list[Segment] = field(default_factory=list)
    session_env: dict[str, str] = field(default_factory=dict)

    @property
    def ssh_host(self) -> str:
        return "127.0.0.1"

    @property
    def persistent_gb(self) -> int:
        return int(((self.body.get("mounts") or {}).get("persistent") or {}).get("size") or 0)

    @property
    def network_volume_id(self) -> Optional[str]:
        net = (self.body.get("mounts") or {}).get("network") or []
        return net[0]["volumeId"] if net else None


@dataclass
class EmuVolume:
    id: str
    name: str
    size: int
    data_center: str
    type: str
    created_at: float
    path: Path
    deleted_at: Optional[float] = None

    def json(self) -> dict:
        return {"id": self.id, "name": self.name, "size": self.size, "dataCenter": self.data_center, "type": self.type}


@dataclass
class Exchange:
    """One request the emulator answered (tests validate these against the OpenAPI document)."""

    method: str
    path: str
    template: Optional[str]
    status: int
    content_type: Optional[str]
    body: Any
    headers: dict


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: Optional[list[str]] = None, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers or {}


_TITLES = {400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 422: "Unprocessable Entity", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class RunPodEmulator:
    """See tests/emulator/__init__.py."""

    def __init__(
        self,
        root: Path,
        clock: Optional[Clock] = None,
        *,
        provision_seconds: float = 0.3,
        start_seconds: float = 0.2,
        ssh: Optional[bool] = None,
        balance_usd: float = 1000.0,
        api_key: Optional[str] = None,
    ):
        self.root = Path(root) / "runpod-emulator"
        self.root.mkdir(parents=True, exist_ok=True)
        self.clock = clock or Clock()
        self.provision_seconds = provision_seconds
        self.start_seconds = start_seconds
        ok, why = ssh_supported()
        if ssh and not ok:
            raise RuntimeError(f"RunPodEmulator(ssh=True): {why}")
        self.ssh = ok if ssh is None else ssh
        self.ssh_unavailable_reason = why
        self.api_key = api_key or "rpa_EMU" + secrets.token_hex(12).upper()
        self.balance_usd = balance_usd
        self.pods: dict[str, EmuPod] = {}
        self.terminated: dict[str, EmuPod] = {}
        self.volumes: dict[str, EmuVolume] = {}
        self.ssh_keys: list[str] = []
        self.faults: list[Fault] = []
        self.capacity_out: dict[str, Optional[int]] = {}  # gpu type -> remaining refusals (None = all)
        self.forbidden: set[str] = set()
        self.exchanges: list[Exchange] = []
        self.lock = threading.RLock()
        self.host_key = self.root / "ssh" / "host_ed25519_key"
        self.user_key = self.root / "ssh" / "user_ed25519_key"
        if self.ssh or shutil.which("ssh-keygen"):
            make_key(self.host_key, "runpod-emulator-host")
            make_key(self.user_key, "runpod-emulator-user")
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "RunPodEmulator":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        emu = self

        class Handler(_Handler):
            emulator = emu

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="runpod-emulator", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self.lock:
            for pod in list(self.pods.values()) + list(self.terminated.values()):
                if pod.host:
                    pod.host.remove()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server, "start the emulator first (use it as a context manager)"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def public_key(self) -> str:
        """A public key whose private half is `user_key`: pass it as the pod's PUBLIC_KEY."""
        return (self.user_key.with_suffix(".pub")).read_text().strip()

    def client_env(self) -> dict[str, str]:
        """RUNPOD_API_KEY and RUNPOD_API_BASE pointing at this emulator (for subprocesses, monkeypatch)."""
        return {"RUNPOD_API_KEY": self.api_key, "RUNPOD_API_BASE": self.base_url}

    def ssh_command(self, pod_id: str) -> list[str]:
        """`ssh` argv (without the remote command) that logs into the pod as root with user_key."""
        pod = self.pod(pod_id)
        if pod.ssh_port is None:
            raise RuntimeError(f"pod {pod_id} is {pod.status}: no SSH port")
        return ["ssh", "-i", str(self.user_key), "-p", str(pod.ssh_port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "root@127.0.0.1"]

    # ---- test controls -------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the clock forward (billing accrues, pods progress toward RUNNING)."""
        self.clock.advance(seconds)
        self.tick()

    def pod(self, pod_id: str) -> EmuPod:
        with self.lock:
            self.tick()
            if pod_id in self.pods:
                return self.pods[pod_id]
            if pod_id in self.terminated:
                return self.terminated[pod_id]
            raise KeyError(f"no pod {pod_id} in the emulator (pods: {', '.join(self.pods) or 'none'})")

    def pods_named(self, name: str) -> list[EmuPod]:
        with self.lock:
            self.tick()
            return [p for p in self.pods.values() if p.name == name]

    def wait_running(self, pod_id: str, timeout: float = 10.0) -> EmuPod:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = self.pod(pod_id)
            if pod.status == "RUNNING":
                return pod
            if not self.clock.real:
                self.advance(max(self.provision_seconds, self.start_seconds))
            time.sleep(0.02)
        raise TimeoutError(f"pod {pod_id} is still {self.pod(pod_id).status}")

    def inject(self, status: int, method: str = "*", path: str = "*", times: Optional[int] = 1,
               detail: str = "", retry_after: Optional[int] = None) -> Fault:
        """The next `times` matching requests get `status` (e.g. 500, 503, 429 with retry_after, 402)."""
        f = Fault("status", method.upper() if method != "*" else "*", path, times, status, detail, retry_after)
        with self.lock:
            self.faults.append(f)
        return f

    def lose_response(self, method: str = "POST", path: str = "/v2/pods", times: Optional[int] = 1,
                      apply: bool = True) -> Fault:
        """The next `times` matching requests are processed (apply=True) but the connection is closed
        without a reply, as when a response is lost on the way back."""
        f = Fault("lost", method.upper(), path, times, apply=apply)
        with self.lock:
            self.faults.append(f)
        return f

    def out_of_capacity(self, gpu_type_id: str, times: Optional[int] = None) -> None:
        """Creates on this GPU type get RunPod's 400 capacity error (`times` of them, None = all)."""
        with self.lock:
            self.capacity_out[gpu_type_id] = times

    def restore_capacity(self, gpu_type_id: str) -> None:
        with self.lock:
            self.capacity_out.pop(gpu_type_id, None)

    def forbid(self, gpu_type_id: str) -> None:
        """Creates on this GPU type get 403 (the account cannot use that pool)."""
        with self.lock:
            self.forbidden.add(gpu_type_id)

    def set_balance(self, usd: float) -> None:
        """Account balance before spend; creates and starts get 402 once spend reaches it."""
        with self.lock:
            self.balance_usd = usd

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
            self.capacity_out.clear()
            self.forbidden.clear()

    def spend_usd(self, until: Optional[float] = None) -> float:
        """Everything billed so far (pods and volumes)."""
        t = self.clock.now() if until is None else until
        with self.lock:
            total = 0.0
            for pod in list(self.pods.values()) + list(self.terminated.values()):
                g, d = _integrate(pod.segments, float("-inf"), t)
                total += g + d
            for v in self.volumes.values():
                total += _volume_amount(v, float("-inf"), t)
            return total

    def requests_to(self, method: str, path_glob: str) -> list[Exchange]:
        with self.lock:
            return [x for x in self.exchanges if x.method == method and fnmatch.fnmatchcase(x.path, path_glob)]

    # ---- state machine -------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance pods whose provisioning/start time has passed (called on every request)."""
        with self.lock:
            now = self.clock.now()
            for pod in self.pods.values():
                if pod.status == "PROVISIONING" and now - pod.status_since >= self.provision_seconds:
                    self._set_status(pod, "STARTING", pod.status_since + self.provision_seconds)
                if pod.status == "STARTING" and now - pod.status_since >= self.start_seconds:
                    self._boot(pod, pod.status_since + self.start_seconds)

    def _boot(self, pod: EmuPod, at: float) -> None:
        if self.ssh:
            if pod.host is None:
                pod.host = PodHost(pod.pod_dir, pod.workspace, self.host_key)
            pod.session_env = {
                **pod.env,
                "RUNPOD_POD_ID": pod.id,
                "RUNPOD_API_KEY": self.api_key,
                "RUNPOD_API_BASE": self.base_url,
                "RUNPOD_GPU_COUNT": str(pod.gpu_count),
                "RUNPOD_DC_ID": pod.data_center_id,
            }
            try:
                pod.ssh_port = pod.host.start(pod.session_env)
            except Exception as e:  # the container did not come up: RunPod shows ERROR
                (pod.pod_dir / "error.txt").write_text(str(e))
                self._set_status(pod, "ERROR", at)
                return
        else:
            pod.ssh_port = None
        pod.started_at = at
        self._set_status(pod, "RUNNING", at)

    def _set_status(self, pod: EmuPod, status: str, at: float) -> None:
        pod.status = status
        pod.status_since = at
        if pod.segments and pod.segments[-1].end is None:
            pod.segments[-1].end = at
        if status == "TERMINATED":
            return
        active = status in ACTIVE
        disk_gb = (pod.body.get("disk") or 0) + pod.persistent_gb if active else pod.persistent_gb
        disk_rate = disk_gb * (catalog.DISK_RUNNING_GB_MONTH if active else catalog.DISK_STOPPED_GB_MONTH) \
            / catalog.HOURS_PER_MONTH
        pod.segments.append(Segment(at, None, pod.cost_per_hr if active else 0.0, disk_rate))

    def _halt(self, pod: EmuPod) -> None:
        if pod.host:
            pod.host.stop()
        pod.ssh_port = None
        pod.started_at = None

    # ---- JSON views ----------------------------------------------------------------------------

    def pod_json(self, pod: EmuPod) -> dict:
        now = self.clock.now()
        b = pod.body
        running = pod.status == "RUNNING"
        direct = None
        if running and pod.ssh_port and "22/tcp" in (b.get("ports") or []):
            direct = {"host": "127.0.0.1", "port": pod.ssh_port, "username": "root",
                      "command": f"ssh root@127.0.0.1 -p {pod.ssh_port}"}
        proxy_user = f"{pod.id}-{pod.id[:8]}"
        ports_rt = []
        for p in b.get("ports") or []:
            num, _, proto = p.partition("/")
            if proto == "tcp" and num == "22":
                ports_rt.append({"private": 22, "public": pod.ssh_port, "type": "tcp", "ip": "127.0.0.1"})
            else:
                ports_rt.append({"private": int(num), "public": None, "type": proto, "ip": None})
        mounts = b.get("mounts") or {}
        return {
            "id": pod.id,
            "name": pod.name,
            "image": b.get("image", ""),
            "args": b.get("args", ""),
            "disk": b.get("disk", 50),
            "ports": list(b.get("ports") or []),
            "env": dict(pod.env),
            "registry": b.get("registry"),
            "status": pod.status,
            "actions": list(ALLOWED_ACTIONS.get(pod.status, [])),
            "mounts": mounts,
            "gpu": {"id": pod.gpu_type_id, "count": pod.gpu_count},
            "cloud": pod.cloud,
            "dataCenterId": pod.data_center_id,
            "cudaVersion": "12.8",
            "ssh": {
                "proxy": {"host": "ssh.runpod.io", "port": 22, "username": proxy_user,
                          "command": f"ssh {proxy_user}@ssh.runpod.io"},
                "direct": direct,
            },
            "template": None,
            "cost": pod.cost_per_hr if pod.status in ACTIVE else 0.0,
            "locked": bool(b.get("locked", False)),
            "globalNetworking": {"enabled": False},
            "runtime": ({"uptime": int(now - pod.started_at), "ports": ports_rt} if running and pod.started_at
                        else None),
            "createdAt": _iso(pod.created_at),
            "startedAt": _iso(pod.started_at) if pod.started_at else None,
        }

    def gpu_json(self, gpu_id: str, q: dict) -> dict:
        name, mem, ps, pc, ms, mc, pool = catalog.GPU_TYPES[gpu_id]
        d: dict[str, Any] = {"id": gpu_id, "name": name, "pool": pool, "manufacturer": "NVIDIA", "memory": mem,
                             "secure": True, "community": True,
                             "price": {"secure": ps, "community": pc}, "maxCount": {"secure": ms, "community": mc}}
        if pool:
            d["price"]["serverless"] = round(ps * 1.9, 2)
        if q.get("include") == ["AVAILABILITY"]:
            level = "NONE" if gpu_id in self.capacity_out else "HIGH"
            d["availability"] = level
            dcs = [{"id": dc, "name": catalog.DATA_CENTERS[dc][0], "availability": level}
                   for dc in catalog.DATA_CENTERS if gpu_id in catalog.DEFAULT_STOCK[dc]]
            if level != "NONE":
                d["dataCenters"] = dcs
            d["cudaVersions"] = [{"version": "12.8", "available": level != "NONE"},
                                 {"version": "12.4", "available": level != "NONE"}]
        return d

    # ---- request handling ----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict, body: Optional[bytes]) -> tuple[int, dict, Any, bool]:
        """(status, headers, JSON body or None, drop_connection)."""
        url = urlsplit(raw_path)
        path = unquote(url.path)
        query = {k: ",".join(v).split(",") for k, v in parse_qs(url.query).items()}
        drop = False
        with self.lock:
            self.tick()
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault:
                fault.hits += 1
                if fault.kind == "status":
                    h = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                    return self._problem(fault.status, fault.detail or _default_detail(fault.status), headers=h)
                drop = True
                if not fault.apply:
                    return 0, {}, None, True
            try:
                auth = headers.get("authorization", "")
                if not auth.startswith("Bearer "):
                    raise ApiError(401, "missing bearer token")
                if auth[len("Bearer "):] != self.api_key:
                    raise ApiError(401, "invalid API key")
                template = spec.path_template(path)
                if template is None:
                    raise ApiError(404, f"no route for {path}")
                op = spec.operation(method, template)
                if op is None:
                    allowed = ", ".join(m.upper() for m in spec.spec()["paths"][template] if m != "parameters")
                    raise ApiError(405, "The requested method is not allowed for this path.", headers={"Allow": allowed})
                data = None
                ref = spec.request_schema_ref(method, template)
                if ref:
                    try:
                        data = json.loads(body or b"null")
                    except ValueError:
                        raise ApiError(400, "request body is not valid JSON")
                    errs = spec.schema_errors(ref, data)
                    if errs:
                        raise ApiError(422, "Request validation failed.", errors=errs)
                handler: Callable = getattr(self, "op_" + op["operationId"], None)
                if handler is None:
                    raise ApiError(404, f"{op['operationId']} is not emulated")
                status, out = handler(path=path, query=query, data=data)
                return status, _rate_headers(), out, drop
            except ApiError as e:
                return (*self._problem(e.status, e.detail, e.errors, e.headers)[:3], drop)

    def _problem(self, status: int, detail: str, errors=None, headers=None) -> tuple[int, dict, Any, bool]:
        body = {"title": _TITLES.get(status, "Error"), "status": status, "detail": detail}
        if errors:
            body["errors"] = errors
        return status, {**_rate_headers(), **(headers or {})}, body, False

    # operations (named after the document's operationIds) ---------------------------------------

    def op_listPods(self, path, query, data):
        return 200, {"pods": [self.pod_json(p) for p in self.pods.values()]}

    def op_getPod(self, path, query, data):
        return 200, self.pod_json(self._pod_or_404(path.split("/")[3]))

    def op_createPod(self, path, query, data):
        if "gpu" not in data:
            raise ApiError(400, "exactly one of gpu or cpu must be set; the emulator has GPU pods only")
        mounts = data.get("mounts") or {}
        if mounts.get("persistent") and mounts.get("network"):
            raise ApiError(400, "mounts.persistent and mounts.network are mutually exclusive")
        gpu_id, count = data["gpu"]["id"], int(data["gpu"].get("count", 1))
        cloud = data.get("cloud", "SECURE")
        if gpu_id not in catalog.GPU_TYPES:
            raise ApiError(400, f"unknown GPU type '{gpu_id}'; see GET /v2/catalog/gpus")
        if gpu_id in self.forbidden:
            raise ApiError(403, f"access denied to the {gpu_id} pool")
        max_count = catalog.GPU_TYPES[gpu_id][4 if cloud == "SECURE" else 5]
        if count > max_count:
            raise ApiError(400, f"gpu.count {count} exceeds the largest {gpu_id} machine ({max_count})")
        price = catalog.GPU_TYPES[gpu_id][2 if cloud == "SECURE" else 3] * count
        if self.spend_usd() >= self.balance_usd:
            raise ApiError(402, "Insufficient balance: add funds to deploy this pod")
        dcs = list(data.get("dataCenterIds") or [])
        vol = None
        if mounts.get("network"):
            vol_id = mounts["network"][0]["volumeId"]
            vol = self.volumes.get(vol_id)
            if vol is None or vol.deleted_at is not None:
                raise ApiError(400, f"network volume {vol_id} not found")
            if dcs and vol.data_center not in dcs:
                raise ApiError(400, f"network volume {vol_id} is in {vol.data_center}, not in dataCenterIds {dcs}")
            dcs = [vol.data_center]
        dcs = [dc for dc in (dcs or list(catalog.DATA_CENTERS)) if gpu_id in catalog.DEFAULT_STOCK.get(dc, ())]
        if gpu_id in self.capacity_out or not dcs:
            left = self.capacity_out.get(gpu_id)
            if left is not None:
                self.capacity_out[gpu_id] = left - 1
                if left - 1 <= 0:
                    del self.capacity_out[gpu_id]
            raise ApiError(400, catalog.CAPACITY_DETAIL)
        env = dict(data.get("env") or {})
        if data.get("startSsh") and "PUBLIC_KEY" not in env and self.ssh_keys:
            env["PUBLIC_KEY"] = "\n".join(self.ssh_keys)
        pod_id = _new_id(set(self.pods) | set(self.terminated))
        pod_dir = self.root / "pods" / pod_id
        pod_dir.mkdir(parents=True)
        workspace = vol.path if vol else pod_dir / "workspace"
        workspace.mkdir(parents=True, exist_ok=True)
        now = self.clock.now()
        pod = EmuPod(id=pod_id, name=data["name"], body=data, status="PROVISIONING", created_at=now,
                     workspace=workspace, pod_dir=pod_dir, data_center_id=dcs[0], gpu_type_id=gpu_id,
                     gpu_count=count, cloud=cloud, cost_per_hr=round(price, 4), env=env)
        self.pods[pod_id] = pod
        self._set_status(pod, "PROVISIONING", now)
        self.tick()
        return 201, self.pod_json(pod)

    def op_updatePod(self, path, query, data):
        pod = self._pod_or_404(path.split("/")[3])
        mounts = data.get("mounts")
        if mounts:
            old = pod.body.get("mounts") or {}
            if set(mounts) - set(old):
                raise ApiError(400, "mount kind is fixed at create")
            if mounts.get("network") and mounts["network"][0]["volumeId"] != old["network"][0]["volumeId"]:
                raise ApiError(400, "the volumeId of a network mount is immutable")
        for k in ("name", "image", "args", "disk", "ports", "registry", "locked"):
            if k in data:
                pod.body[k] = data[k]
        if mounts:
            pod.body["mounts"] = {**(pod.body.get("mounts") or {}), **mounts}
        if "name" in data:
            pod.name = data["name"]
        if "env" in data:
            pod.env = dict(data["env"])  # PATCH replaces env; it reaches the container on its next start
        return 200, self.pod_json(pod)

    def op_deletePod(self, path, query, data):
        self._terminate(self._pod_or_404(path.split("/")[3]))
        return 204, None

    def op_podAction(self, path, query, data):
        pod = self._pod_or_404(path.split("/")[3])
        action = data["action"]
        if action not in ALLOWED_ACTIONS.get(pod.status, []):
            raise ApiError(409, f"cannot {action} a pod that is {pod.status}; allowed: "
                                f"{', '.join(ALLOWED_ACTIONS.get(pod.status, [])) or 'none'}")
        now = self.clock.now()
        if action == "terminate":
            self._terminate(pod)
            return 204, None
        if action == "stop":
            self._halt(pod)
            self._set_status(pod, "EXITED", now)
        elif action == "start":
            if self.spend_usd() >= self.balance_usd:
                raise ApiError(402, "Insufficient balance: add funds to start this pod")
            self._set_status(pod, "STARTING", now)  # a stopped pod keeps its machine: no provisioning
            self.tick()
        elif action == "restart":
            self._halt(pod)
            self._set_status(pod, "STARTING", now)
            self.tick()
        return 200, self.pod_json(pod)

    def _terminate(self, pod: EmuPod) -> None:
        self._halt(pod)
        if pod.host:
            pod.host.remove()
        self._set_status(pod, "TERMINATED", self.clock.now())
        del self.pods[pod.id]
        self.terminated[pod.id] = pod
        if pod.network_volume_id is None:
            # mounts.persistent storage "is destroyed with it"
            shutil.rmtree(pod.workspace, ignore_errors=True)

    def _pod_or_404(self, pod_id: str) -> EmuPod:
        if pod_id not in self.pods:
            raise ApiError(404, f"pod {pod_id} not found")
        return self.pods[pod_id]

    def op_listNetworkVolumes(self, path, query, data):
        return 200, {"networkVolumes": [v.json() for v in self.volumes.values() if v.deleted_at is None]}

    def op_getNetworkVolume(self, path, query, data):
        return 200, self._volume_or_404(path.split("/")[3]).json()

    def op_createNetworkVolume(self, path, query, data):
        dc = data["dataCenter"]
        if dc not in catalog.DATA_CENTERS:
            raise ApiError(400, f"unknown data center '{dc}'; see GET /v2/catalog/datacenters")
        vtype = data.get("type") or catalog.DATA_CENTERS[dc][2][0]
        if vtype not in catalog.DATA_CENTERS[dc][2]:
            raise ApiError(400, f"{dc} has no {vtype} storage")
        if self.spend_usd() >= self.balance_usd:
            raise ApiError(402, "Insufficient balance: add funds to create a network volume")
        vid = _new_id(set(self.volumes))
        v = EmuVolume(vid, data["name"], data["size"], dc, vtype, self.clock.now(), self.root / "volumes" / vid)
        v.path.mkdir(parents=True)
        self.volumes[vid] = v
        return 201, v.json()

    def op_updateNetworkVolume(self, path, query, data):
        v = self._volume_or_404(path.split("/")[3])
        if "size" in data and data["size"] < v.size:
            raise ApiError(400, f"network volume storage cannot be reduced ({v.size} GB -> {data['size']} GB)")
        v.name = data.get("name", v.name)
        v.size = data.get("size", v.size)
        return 200, v.json()

    def op_deleteNetworkVolume(self, path, query, data):
        v = self._volume_or_404(path.split("/")[3])
        users = [p.id for p in self.pods.values() if p.network_volume_id == v.id]
        if users:
            raise ApiError(400, f"network volume {v.id} is attached to pods {', '.join(users)}; terminate them first")
        v.deleted_at = self.clock.now()
        shutil.rmtree(v.path, ignore_errors=True)
        return 204, None

    def _volume_or_404(self, vid: str) -> EmuVolume:
        v = self.volumes.get(vid)
        if v is None or v.deleted_at is not None:
            raise ApiError(404, f"network volume {vid} not found")
        return v

    def op_getSshKeys(self, path, query, data):
        return 200, {"keys": list(self.ssh_keys)}

    def op_updateSshKeys(self, path, query, data):
        self.ssh_keys = list(data["keys"])
        return 200, {"keys": list(self.ssh_keys)}

    def _catalog_query(self, query: dict) -> dict:
        inc = query.get("include")
        if inc and inc != ["AVAILABILITY"]:
            raise ApiError(422, f"include: unsupported value {inc}", errors=[f"$.include: {inc} is not one of ['AVAILABILITY']"])
        if inc and not query.get("product"):
            raise ApiError(400, "product is required with include=AVAILABILITY")
        for k in ("product", "count", "cloud", "countryCodes", "cudaVersions", "minCudaVersion"):
            if k in query and not inc:
                raise ApiError(400, f"{k} is valid only with include=AVAILABILITY")
        return query

    def op_listGpuTypes(self, path, query, data):
        q = self._catalog_query(query)
        return 200, {"gpus": [self.gpu_json(g, q) for g in catalog.GPU_TYPES]}

    def op_getGpuType(self, path, query, data):
        q = self._catalog_query(query)
        gid = path[len("/v2/catalog/gpus/"):]
        if gid not in catalog.GPU_TYPES:
            raise ApiError(404, f"GPU type '{gid}' not found")
        return 200, self.gpu_json(gid, q)

    def op_listDataCenters(self, path, query, data):
        out = []
        for dc, (name, region, vtypes, gn) in catalog.DATA_CENTERS.items():
            d = {"id": dc, "name": name, "region": region, "networkVolumeTypes": vtypes, "compliance": [],
                 "globalNetwork": gn}
            if "GPU_AVAILABILITY" in (query.get("include") or []):
                d["gpuAvailability"] = [
                    {"id": g, "name": catalog.GPU_TYPES[g][0],
                     "availability": "NONE" if g in self.capacity_out else "HIGH"}
                    for g in catalog.GPU_TYPES if g in catalog.DEFAULT_STOCK[dc]
                ]
            out.append(d)
        return 200, {"dataCenters": out}

    # billing ------------------------------------------------------------------------------------

    def _window(self, query: dict) -> tuple[float, float, str]:
        bucket = (query.get("bucketSize") or ["day"])[0]
        if bucket not in ("hour", "day", "week", "month", "year"):
            raise ApiError(422, f"bucketSize: {bucket!r} is not one of hour, day, week, month, year")
        now = self.clock.now()
        if "lastN" in query:
            if "startTime" in query or "endTime" in query:
                raise ApiError(400, "lastN is mutually exclusive with startTime/endTime")
            try:
                n = int(query["lastN"][0])
            except ValueError:
                raise ApiError(422, "lastN must be an integer")
            if n < 1:
                raise ApiError(422, "lastN must be >= 1")
            end = _bucket_end(now, bucket)
            start = end
            for _ in range(n):
                start = _bucket_start(start - 1, bucket)
            return start, end, bucket
        try:
            start = _parse_iso(query["startTime"][0]) if "startTime" in query else now - 30 * 86400
            end = _parse_iso(query["endTime"][0]) if "endTime" in query else now
        except ValueError as e:
            raise ApiError(422, f"startTime/endTime must be RFC 3339: {e}")
        if end <= start:
            raise ApiError(400, "endTime must be after startTime")
        start = _bucket_start(start, bucket)
        if _bucket_start(end, bucket) != end:
            end = _bucket_end(end, bucket)
        return start, end, bucket

    def _buckets(self, start: float, end: float, bucket: str):
        t = start
        while t < end:
            e = _bucket_end(t, bucket)
            yield t, e
            t = e

    def _pod_records(self, start, end, bucket, pod_id=None):
        until = self.clock.now()
        recs = []
        pods = list(self.pods.values()) + list(self.terminated.values())
        for a, b in self._buckets(start, end, bucket):
            for pod in sorted(pods, key=lambda p: p.created_at):
                if pod_id and pod.id != pod_id:
                    continue
                if pod.created_at >= b or (pod.status == "TERMINATED" and pod.status_since < a):
                    continue
                g, d = _integrate(pod.segments, a, min(b, until))
                recs.append({"startTime": _iso(a), "endTime": _iso(b), "podId": pod.id,
                             "totalAmount": round(g + d, 6), "gpuAmount": round(g, 6), "cpuAmount": 0.0,
                             "diskAmount": round(d, 6)})
        return recs

    def _volume_records(self, start, end, bucket, volume_id=None):
        until = self.clock.now()
        recs = []
        for a, b in self._buckets(start, end, bucket):
            for v in self.volumes.values():
                if (volume_id and v.id != volume_id) or v.created_at >= b or (v.deleted_at and v.deleted_at < a):
                    continue
                amt = _volume_amount(v, a, min(b, until))
                std = amt if v.type == "STANDARD" else 0.0
                recs.append({"startTime": _iso(a), "endTime": _iso(b), "networkVolumeId": v.id,
                             "totalAmount": round(amt, 6), "standardAmount": round(std, 6),
                             "highPerformanceAmount": round(amt - std, 6)})
        return recs

    def op_listPodBilling(self, path, query, data):
        start, end, bucket = self._window(query)
        pod_id = (query.get("podId") or [None])[0]
        recs = self._pod_records(start, end, bucket, pod_id)
        totals = {k: round(sum(r[k] for r in recs), 6) for k in ("totalAmount", "gpuAmount", "cpuAmount", "diskAmount")}
        return 200, {"records": recs, "metadata": {
            "query": {"startTime": _iso(start), "endTime": _iso(end), "bucketSize": bucket, "podId": pod_id},
            "recordCount": len(recs), "uniquePodCount": len({r["podId"] for r in recs}), "totals": totals}}

    def op_listNetworkVolumeBilling(self, path, query, data):
        start, end, bucket = self._window(query)
        vid = (query.get("networkVolumeId") or [None])[0]
        recs = self._volume_records(start, end, bucket, vid)
        keys = ("totalAmount", "standardAmount", "highPerformanceAmount")
        totals = {k: round(sum(r[k] for r in recs), 6) for k in keys}
        return 200, {"records": recs, "metadata": {
            "query": {"startTime": _iso(start), "endTime": _iso(end), "bucketSize": bucket, "networkVolumeId": vid},
            "recordCount": len(recs), "uniqueNetworkVolumeCount": len({r["networkVolumeId"] for r in recs}),
            "totals": totals}}

    def op_listBilling(self, path, query, data):
        start, end, bucket = self._window(query)
        pods = self._pod_records(start, end, bucket)
        vols = self._volume_records(start, end, bucket)
        zero = ("podCpuAmount", "serverlessGpuAmount", "serverlessCpuAmount", "serverlessDiskAmount",
                "serverlessFeeAmount", "endpointAmount", "clusterGpuAmount", "clusterDiskAmount",
                "clusterNetworkingAmount")
        recs = []
        for a, b in self._buckets(start, end, bucket):
            sa, sb = _iso(a), _iso(b)
            pg = sum(r["gpuAmount"] for r in pods if r["startTime"] == sa)
            pd = sum(r["diskAmount"] for r in pods if r["startTime"] == sa)
            vs = sum(r["standardAmount"] for r in vols if r["startTime"] == sa)
            vh = sum(r["highPerformanceAmount"] for r in vols if r["startTime"] == sa)
            rec = {"startTime": sa, "endTime": sb, "totalAmount": round(pg + pd + vs + vh, 6),
                   "podGpuAmount": round(pg, 6), "podDiskAmount": round(pd, 6),
                   "storageStandardAmount": round(vs, 6), "storageHighPerformanceAmount": round(vh, 6)}
            rec.update({k: 0.0 for k in zero})
            recs.append(rec)
        amount_keys = [k for k in recs[0] if k.endswith("Amount")] if recs else []
        totals = {k: round(sum(r[k] for r in recs), 6) for k in amount_keys}
        if not recs:
            totals = {k: 0.0 for k in ("totalAmount", "podGpuAmount", "podDiskAmount", "storageStandardAmount",
                                       "storageHighPerformanceAmount") + zero}
        return 200, {"records": recs, "metadata": {
            "query": {"startTime": _iso(start), "endTime": _iso(end), "bucketSize": bucket},
            "recordCount": len(recs), "totals": totals}}


class _Handler(BaseHTTPRequestHandler):
    emulator: RunPodEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, out, drop = self.emulator.handle(method, self.path, headers, body)
        path = unquote(urlsplit(self.path).path)
        if drop:
            # The request was (maybe) applied, but the reply never arrives.
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        ctype = None
        payload = b""
        if out is not None:
            ctype = "application/problem+json" if status >= 400 else "application/json"
            payload = json.dumps(out).encode()
        with self.emulator.lock:
            self.emulator.exchanges.append(
                Exchange(method, path, spec.path_template(path), status, ctype, out, dict(out_headers)))
        self.send_response(status)
        for k, v in out_headers.items():
            self.send_header(k, v)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")


# ------------------------------------------------------------------------------------------------


def _rate_headers() -> dict:
    return {"RateLimit": RATE_LIMIT, "RateLimit-Policy": RATE_LIMIT_POLICY}


def _default_detail(status: int) -> str:
    return {
        402: "Insufficient balance: add funds to continue",
        429: "rate limit exceeded for the minute window",
        500: "internal error",
        502: "upstream unavailable",
        503: "service temporarily unavailable",
        504: "upstream timed out",
    }.get(status, _TITLES.get(status, "error"))


def _new_id(taken: set[str]) -> str:
    alphabet = string.ascii_lowercase + string.digits
    while True:
        i = "".join(secrets.choice(alphabet) for _ in range(14))
        if i not in taken:
            return i


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _bucket_start(t: float, bucket: str) -> float:
    d = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    if bucket == "hour":
        d = d.replace(minute=0, second=0, microsecond=0)
    elif bucket == "day":
        d = d.replace(hour=0, minute=0, second=0, microsecond=0)
    elif bucket == "week":  # ISO weeks start on Monday
        d = (d - dt.timedelta(days=d.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    elif bucket == "month":
        d = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        d = d.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    return d.timestamp()


def _bucket_end(t: float, bucket: str) -> float:
    s = dt.datetime.fromtimestamp(_bucket_start(t, bucket), tz=dt.timezone.utc)
    if bucket == "hour":
        e = s + dt.timedelta(hours=1)
    elif bucket == "day":
        e = s + dt.timedelta(days=1)
    elif bucket == "week":
        e = s + dt.timedelta(days=7)
    elif bucket == "month":
        e = s + dt.timedelta(days=calendar.monthrange(s.year, s.month)[1])
    else:
        e = s.replace(year=s.year + 1)
    return e.timestamp()


def _integrate(segments: list[Segment], a: float, b: float) -> tuple[float, float]:
    """(gpu USD, disk USD) billed over [a, b)."""
    g = d = 0.0
    for s in segments:
        lo, hi = max(a, s.start), min(b, s.end if s.end is not None else b)
        if hi > lo:
            hours = (hi - lo) / 3600.0
            g += s.gpu_rate * hours
            d += s.disk_rate * hours
    return g, d


def _volume_amount(v: EmuVolume, a: float, b: float) -> float:
    lo, hi = max(a, v.created_at), min(b, v.deleted_at if v.deleted_at is not None else b)
    if hi <= lo:
        return 0.0
    return v.size * catalog.NETWORK_VOLUME_GB_MONTH[v.type] / catalog.HOURS_PER_MONTH * (hi - lo) / 3600.0
