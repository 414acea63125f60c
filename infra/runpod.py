"""A small typed client for RunPod's REST v2 API: the only code in the kit that speaks HTTP to RunPod.

    from infra.runpod import RunPodClient
    rp = RunPodClient()                       # key from RUNPOD_API_KEY, base URL from RUNPOD_API_BASE
    pod = rp.get_pod("7h9k2m4n6p")
    print(pod.status, pod.ssh_host, pod.ssh_port, pod.cost_per_hr)

The contract is `../shared/reference/runpod-openapi-v2.json` (createPod's description carries the
table of which failures are worth retrying). The policy here, by status code:

| status        | what the client does                                                            |
|---------------|---------------------------------------------------------------------------------|
| 422           | raise at once: the body breaks the contract, retrying cannot help               |
| 400, 403      | raise at once; `create_pod_any` moves on to the next GPU candidate              |
| 402           | raise at once; `create_pod_any` stops: no candidate can succeed without balance |
| 404, 409      | raise at once (callers that expect them, e.g. an idempotent delete, catch them) |
| 429           | sleep `Retry-After` seconds and send again (the request was not processed)      |
| 5xx, no reply | back off and send again, but only if repeating is safe (GET, PUT, PATCH, DELETE) |

A POST that creates something (a pod, a network volume) is never blindly repeated: if its response
is lost or is a 5xx, the pod may exist anyway and a second POST would be a second bill. The create
calls instead list what exists under the (deterministic) name and return the new object if it is
there, and only send again when it is not. Pod actions are reconciled the same way (read the pod,
see whether the transition already happened).

Layers (as in SkyPilot's adaptor/provision split): this module speaks HTTP and returns dataclasses;
`infra/resources.py` speaks Pulumi; nothing else imports `requests` for RunPod.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import requests

DEFAULT_BASE_URL = "https://api.runpod.io"  # `servers[0]` in the OpenAPI document
API_KEY_ENV = "RUNPOD_API_KEY"
API_BASE_ENV = "RUNPOD_API_BASE"
# RunPod's HTTP proxy: every `<port>/http` entry of a pod is reachable at this address.
# It is a RunPod convention, not part of the OpenAPI document; RUNPOD_PROXY_URL overrides it.
PROXY_URL_TEMPLATE = "https://{pod_id}-{port}.proxy.runpod.net"
PROXY_URL_ENV = "RUNPOD_PROXY_URL"

# Methods that can be sent twice with the same effect as once (RFC 9110 §9.2.2, plus PATCH because
# every PATCH this client sends sets absolute values).
IDEMPOTENT = frozenset({"GET", "PUT", "PATCH", "DELETE", "HEAD"})


class RunPodError(Exception):
    """A failed RunPod request: the request, the status and RunPod's own words.

    `status_code` is None when no response arrived at all (connection dropped, timeout)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: Optional[int],
        method: str,
        path: str,
        title: str = "",
        errors: Optional[list[str]] = None,
        retry_after: Optional[float] = None,
        no_response: bool = False,
    ):
        self.status_code = status_code
        self.no_response = no_response
        self.method = method
        self.path = path
        self.message = message  # RunPod's `detail` (or our description when there was no reply)
        self.title = title
        self.errors = list(errors or [])
        self.retry_after = retry_after
        if status_code is not None:
            text = f"RunPod {method} {path} -> {f'{status_code} {title}'.strip()}: {message}"
        elif no_response:
            text = f"RunPod {method} {path} -> no response: {message}"
        elif method == "-":  # not a request at all (e.g. no API key)
            text = f"RunPod: {message}"
        else:  # a failure we diagnosed from a request's answer (a pod in ERROR, a name clash)
            text = f"RunPod {method} {path}: {message}"
        if self.errors:
            text += " [" + "; ".join(self.errors) + "]"
        hint = _HINTS.get(status_code)
        if hint:
            text += f". {hint}"
        super().__init__(text)

    @property
    def lost(self) -> bool:
        """True when the request may or may not have been applied (no reply, or a 5xx)."""
        return self.no_response or (self.status_code is not None and self.status_code >= 500)


_HINTS = {
    401: "Check the API key: set RUNPOD_API_KEY or `pulumi config set --secret runpod:apiKey <key>`",
    402: "Your RunPod balance is too low: add credit at https://www.runpod.io/console/user/billing",
    403: "The API key lacks access to this resource (keys are scoped; create one with read/write on pods)",
    422: "The request does not match RunPod's API contract; this is a bug in the caller, not a capacity problem",
}


# --------------------------------------------------------------------------------------------
# Typed records. Each keeps the raw JSON in `raw` so fields we do not model are still reachable.
# --------------------------------------------------------------------------------------------


@dataclass
class Pod:
    id: str
    name: str
    status: str  # PROVISIONING | STARTING | RUNNING | EXITED | ERROR | TERMINATED
    image: str
    gpu_type_id: Optional[str]
    gpu_count: int
    cloud: str
    data_center_id: Optional[str]
    cost_per_hr: float  # USD/h billed now (0.0 when EXITED)
    disk_gb: int  # container disk
    volume_gb: Optional[int]  # host-local persistent mount size, if any
    volume_mount_path: Optional[str]
    network_volume_id: Optional[str]
    ports: list[str]
    env: dict[str, str]
    actions: list[str]
    ssh_host: Optional[str]  # direct SSH (needs 22/tcp); None until RUNNING
    ssh_port: Optional[int]
    ssh_username: Optional[str]
    public_ip: Optional[str]
    uptime_seconds: Optional[int]
    created_at: Optional[str]
    started_at: Optional[str]
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "Pod":
        mounts = d.get("mounts") or {}
        persistent = mounts.get("persistent") or None
        network = (mounts.get("network") or [None])[0]
        direct = ((d.get("ssh") or {}).get("direct")) or None
        runtime = d.get("runtime") or {}
        public_ip = direct["host"] if direct else None
        if public_ip is None:
            for p in runtime.get("ports") or []:
                if p.get("ip"):
                    public_ip = p["ip"]
                    break
        gpu = d.get("gpu") or {}
        return cls(
            id=d["id"],
            name=d["name"],
            status=d["status"],
            image=d.get("image", ""),
            gpu_type_id=gpu.get("id"),
            gpu_count=int(gpu.get("count", 1)) if gpu else 0,
            cloud=d.get("cloud", "SECURE"),
            data_center_id=d.get("dataCenterId"),
            cost_per_hr=float(d.get("cost") or 0.0),
            disk_gb=int(d.get("disk") or 0),
            volume_gb=persistent["size"] if persistent else None,
            volume_mount_path=(persistent or network or {}).get("path"),
            network_volume_id=network["volumeId"] if network else None,
            ports=list(d.get("ports") or []),
            env=dict(d.get("env") or {}),
            actions=list(d.get("actions") or []),
            ssh_host=direct["host"] if direct else None,
            ssh_port=int(direct["port"]) if direct else None,
            ssh_username=direct["username"] if direct else None,
            public_ip=public_ip,
            uptime_seconds=runtime.get("uptime"),
            created_at=d.get("createdAt"),
            started_at=d.get("startedAt"),
            raw=d,
        )

    def proxy_url(self, port: int) -> str:
        """The HTTPS address RunPod's proxy gives an `<port>/http` port of this pod."""
        template = os.environ.get(PROXY_URL_ENV, PROXY_URL_TEMPLATE)
        return template.format(pod_id=self.id, port=port)

    @property
    def ssh_ready(self) -> bool:
        return self.status == "RUNNING" and self.ssh_host is not None and self.ssh_port is not None


@dataclass
class NetworkVolume:
    id: str
    name: str
    size_gb: int
    data_center_id: str
    type: str  # STANDARD | HIGH_PERFORMANCE
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "NetworkVolume":
        return cls(d["id"], d["name"], int(d["size"]), d["dataCenter"], d.get("type", "STANDARD"), raw=d)


@dataclass
class GpuType:
    id: str  # what pod create takes, e.g. "NVIDIA A40"
    name: str
    memory_gb: int
    secure: bool
    community: bool
    price_secure: float  # USD/h for ONE GPU; a pod costs this times gpu.count
    price_community: float
    max_count_secure: int
    max_count_community: int
    availability: Optional[str]  # NONE | LOW | MEDIUM | HIGH, only when asked for
    data_centers: dict[str, str]  # data center id -> availability level, only when asked for
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "GpuType":
        price = d.get("price") or {}
        mc = d.get("maxCount") or {}
        return cls(
            id=d["id"],
            name=d.get("name", d["id"]),
            memory_gb=int(d.get("memory") or 0),
            secure=bool(d.get("secure")),
            community=bool(d.get("community")),
            price_secure=float(price.get("secure") or 0.0),
            price_community=float(price.get("community") or 0.0),
            max_count_secure=int(mc.get("secure") or 0),
            max_count_community=int(mc.get("community") or 0),
            availability=d.get("availability"),
            data_centers={x["id"]: x["availability"] for x in d.get("dataCenters") or []},
            raw=d,
        )

    def price(self, cloud: str, count: int = 1) -> float:
        """List price in USD/h for `count` GPUs on `cloud` (SECURE or COMMUNITY)."""
        return (self.price_secure if cloud.upper() == "SECURE" else self.price_community) * count


@dataclass
class BillingRecord:
    """One time bucket of spend. `pod_id` / `network_volume_id` are set on per-resource routes."""

    start_time: str
    end_time: str
    total_amount: float
    amounts: dict[str, float]  # every *Amount field of the record, as sent
    pod_id: Optional[str] = None
    network_volume_id: Optional[str] = None

    @classmethod
    def from_json(cls, d: dict) -> "BillingRecord":
        return cls(
            start_time=d["startTime"],
            end_time=d["endTime"],
            total_amount=float(d["totalAmount"]),
            amounts={k: float(v) for k, v in d.items() if k.endswith("Amount")},
            pod_id=d.get("podId"),
            network_volume_id=d.get("networkVolumeId"),
        )


@dataclass
class BillingReport:
    records: list[BillingRecord]
    total_amount: float  # metadata.totals.totalAmount: the sum over the returned window
    query: dict  # the resolved window RunPod echoes back (startTime, endTime, bucketSize, filter)
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "BillingReport":
        md = d.get("metadata") or {}
        return cls(
            records=[BillingRecord.from_json(r) for r in d.get("records") or []],
            total_amount=float((md.get("totals") or {}).get("totalAmount") or 0.0),
            query=dict(md.get("query") or {}),
            raw=d,
        )


@dataclass
class PodRequest:
    """The body of a pod create, in our names. Only GPU pods: the kit has no use for CPU pods."""

    name: str
    image: str
    gpu_type_id: str
    gpu_count: int = 1
    cloud: str = "SECURE"
    disk_gb: int = 50
    volume_gb: Optional[int] = None  # host-local /workspace; exclusive with network_volume_id
    network_volume_id: Optional[str] = None
    volume_mount_path: str = "/workspace"
    ports: list[str] = field(default_factory=lambda: ["22/tcp"])
    env: dict[str, str] = field(default_factory=dict)
    data_center_ids: list[str] = field(default_factory=list)
    start_ssh: bool = True
    min_cuda_version: Optional[str] = None

    def to_json(self) -> dict:
        body: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "gpu": {"id": self.gpu_type_id, "count": self.gpu_count},
            "cloud": self.cloud,
            "disk": self.disk_gb,
            "ports": list(self.ports),
            "env": dict(self.env),
            "startSsh": self.start_ssh,
        }
        if self.min_cuda_version:
            body["gpu"]["minCudaVersion"] = self.min_cuda_version
        if self.network_volume_id:
            # The spec allows one mount kind per pod: a network volume replaces the host-local one.
            body["mounts"] = {"network": [{"volumeId": self.network_volume_id, "path": self.volume_mount_path}]}
        elif self.volume_gb:
            body["mounts"] = {"persistent": {"size": self.volume_gb, "path": self.volume_mount_path}}
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        return body


class NoCandidatePlaced(RunPodError):
    """Every GPU candidate was refused (400/403). `attempts` lists (gpu type, error) per candidate."""

    def __init__(self, name: str, attempts: list[tuple[str, RunPodError]]):
        self.attempts = attempts
        last = attempts[-1][1] if attempts else None
        tried = "; ".join(f"{gpu}: {e.status_code} {e.message}" for gpu, e in attempts)
        super().__init__(
            f"no GPU candidate could be placed for pod '{name}' (tried {tried}). If every candidate "
            "returned 400 with the same detail the request itself breaks a rule; otherwise there is no "
            "capacity now: add GPU types to gpuTypes, try cloudType COMMUNITY, or try again later",
            status_code=last.status_code if last else None,
            method="POST",
            path="/v2/pods",
        )


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class RunPodClient:
    """Typed calls on RunPod's REST v2 API with the retry policy in the module docstring.

    `sleep` is injectable so tests can count the waits without spending them."""

    def __init__(
        self,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        max_retry_after: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        session: Optional[requests.Session] = None,
    ):
        key = api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise RunPodError(
                "no API key: pass api_key, set RUNPOD_API_KEY, or `pulumi config set --secret runpod:apiKey <key>` "
                "(create one at https://www.runpod.io/console/user/settings)",
                status_code=None,
                method="-",
                path="-",
            )
        self.api_key = key
        self.base_url = (base_url or os.environ.get(API_BASE_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.sleep = sleep
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"
        self.session.headers["User-Agent"] = "ultrashape-kit/0.1 (+infra/runpod.py)"

    def __repr__(self) -> str:  # never print the key
        return f"RunPodClient(base_url={self.base_url!r})"

    # ---- transport -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[dict] = None,
        json: Any = None,
        retry_lost: Optional[bool] = None,
    ) -> Any:
        """Send one request with retries; return the decoded JSON body (None for 204).

        `retry_lost` says whether a request whose outcome is unknown (5xx, no reply) may be sent
        again; it defaults to True for idempotent methods only."""
        method = method.upper()
        if retry_lost is None:
            retry_lost = method in IDEMPOTENT
        url = self.base_url + path
        attempt = 0
        while True:
            try:
                resp = self.session.request(method, url, params=_clean(params), json=json, timeout=self.timeout)
            except requests.RequestException as e:  # connection refused/reset, timeout
                err = RunPodError(
                    f"no response ({type(e).__name__}: {e}); the request may or may not have been applied",
                    status_code=None,
                    method=method,
                    path=path,
                    no_response=True,
                )
                if retry_lost and attempt < self.max_retries:
                    self.sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                raise err from e
            if resp.status_code < 400:
                if resp.status_code == 204 or not resp.content:
                    return None
                try:
                    return resp.json()
                except ValueError as e:
                    raise RunPodError(
                        f"response is not JSON: {resp.text[:200]!r}",
                        status_code=resp.status_code, method=method, path=path,
                    ) from e
            err = _error_from(resp, method, path)
            if resp.status_code == 429 and attempt < self.max_retries:
                # Rejected before processing, so safe to repeat whatever the method.
                self.sleep(min(err.retry_after if err.retry_after is not None else self._backoff(attempt),
                               self.max_retry_after))
                attempt += 1
                continue
            if resp.status_code >= 500 and retry_lost and attempt < self.max_retries:
                self.sleep(self._backoff(attempt))
                attempt += 1
                continue
            raise err

    def _backoff(self, attempt: int) -> float:
        # Exponential with a little jitter so parallel callers do not retry in lockstep.
        delay = min(self.backoff_max, self.backoff_base * (2**attempt))
        return delay * (0.8 + 0.4 * random.random())

    # ---- pods ------------------------------------------------------------------------------

    def list_pods(self) -> list[Pod]:
        return [Pod.from_json(p) for p in self.request("GET", "/v2/pods")["pods"]]

    def find_pods(self, name: str) -> list[Pod]:
        """Pods with exactly this name (RunPod does not make names unique; we do, by convention)."""
        return [p for p in self.list_pods() if p.name == name]

    def get_pod(self, pod_id: str) -> Pod:
        return Pod.from_json(self.request("GET", f"/v2/pods/{pod_id}"))

    def find_pod(self, pod_id: str) -> Optional[Pod]:
        """get_pod, but None when the pod does not exist (terminated pods disappear)."""
        try:
            return self.get_pod(pod_id)
        except RunPodError as e:
            if e.status_code == 404:
                return None
            raise

    def create_pod(self, req: PodRequest) -> Pod:
        """POST /v2/pods, never creating a duplicate.

        A create whose outcome is unknown (5xx or no reply) is reconciled by listing pods under
        `req.name`: a pod that was not there before the call is the one we created. Only if none
        appeared is the POST sent again, after a backoff."""
        before = {p.id for p in self.find_pods(req.name)}
        attempt = 0
        while True:
            try:
                return Pod.from_json(self.request("POST", "/v2/pods", json=req.to_json(), retry_lost=False))
            except RunPodError as e:
                if not e.lost:
                    raise
                new = [p for p in self.find_pods(req.name) if p.id not in before]
                if new:
                    return new[0]
                if attempt >= self.max_retries:
                    raise
                self.sleep(self._backoff(attempt))
                attempt += 1

    def create_pod_any(
        self,
        req: PodRequest,
        gpu_type_ids: Iterable[str],
        on_attempt: Optional[Callable[[str, Optional[RunPodError]], None]] = None,
    ) -> Pod:
        """Try each GPU type in order of preference until one places (createPod's table):
        400 and 403 move on to the next candidate; 402 and 422 stop at once; 429/5xx are retried
        in place by `request`/`create_pod`."""
        attempts: list[tuple[str, RunPodError]] = []
        for gpu in gpu_type_ids:
            try:
                pod = self.create_pod(dataclasses.replace(req, gpu_type_id=gpu))
            except RunPodError as e:
                if on_attempt:
                    on_attempt(gpu, e)
                if e.status_code in (400, 403):
                    attempts.append((gpu, e))
                    continue
                raise
            if on_attempt:
                on_attempt(gpu, None)
            return pod
        raise NoCandidatePlaced(req.name, attempts)

    def update_pod(self, pod_id: str, **fields: Any) -> Pod:
        """PATCH the given API fields (e.g. env={...}, ports=[...], name=...)."""
        return Pod.from_json(self.request("PATCH", f"/v2/pods/{pod_id}", json=fields))

    def pod_action(self, pod_id: str, action: str) -> Optional[Pod]:
        """start | stop | restart | terminate. A lost reply is reconciled by reading the pod."""
        try:
            body = self.request("POST", f"/v2/pods/{pod_id}/action", json={"action": action}, retry_lost=False)
        except RunPodError as e:
            if e.status_code == 409:
                # 409: the action is not valid for the pod's current status. If the pod is already where the
                # action would take it (the watchdog stopped it while `fab teardown` waited for jobs), that is
                # success, not an error; otherwise (e.g. stop on a pod in ERROR) the 409 stands.
                pod = self.find_pod(pod_id)
                if action == "terminate" and (pod is None or pod.status == "TERMINATED"):
                    return None
                if pod is not None and _action_done(action, pod.status):
                    return pod
                raise
            if not e.lost:
                raise
            # Read the pod (GET is retried) and finish the job only if it did not happen.
            pod = self.find_pod(pod_id)
            if action == "terminate":
                if pod is None or pod.status == "TERMINATED":
                    return None
            elif pod is not None and _action_done(action, pod.status):
                return pod
            body = self.request("POST", f"/v2/pods/{pod_id}/action", json={"action": action}, retry_lost=False)
        return Pod.from_json(body) if body else None

    def start_pod(self, pod_id: str) -> Pod:
        return self.pod_action(pod_id, "start")  # type: ignore[return-value]

    def stop_pod(self, pod_id: str) -> Pod:
        return self.pod_action(pod_id, "stop")  # type: ignore[return-value]

    def restart_pod(self, pod_id: str) -> Pod:
        return self.pod_action(pod_id, "restart")  # type: ignore[return-value]

    def terminate_pod(self, pod_id: str, missing_ok: bool = True) -> None:
        """DELETE /v2/pods/{id}. A pod that is already gone is fine unless missing_ok=False."""
        try:
            self.request("DELETE", f"/v2/pods/{pod_id}")
        except RunPodError as e:
            if e.status_code == 404 and missing_ok:
                return
            raise

    delete_pod = terminate_pod

    def wait_for_pod(
        self,
        pod_id: str,
        status: str = "RUNNING",
        timeout: float = 900.0,
        poll: float = 5.0,
        require_ssh: bool = True,
        on_poll: Optional[Callable[[Pod], None]] = None,
    ) -> Pod:
        """Poll until the pod reaches `status` (and, for RUNNING, has a direct SSH endpoint)."""
        deadline = time.monotonic() + timeout
        while True:
            pod = self.get_pod(pod_id)
            if on_poll:
                on_poll(pod)
            if pod.status == status and (not require_ssh or status != "RUNNING" or pod.ssh_ready):
                return pod
            if pod.status in ("ERROR", "TERMINATED") and status not in ("ERROR", "TERMINATED"):
                raise RunPodError(
                    f"pod {pod_id} went to {pod.status} while waiting for {status}; see its logs in the "
                    "RunPod console, then `pulumi destroy` or fix the image",
                    status_code=None, method="GET", path=f"/v2/pods/{pod_id}",
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"pod {pod_id} is still {pod.status} after {timeout:.0f} s waiting for {status}"
                    + (" with SSH" if require_ssh and status == "RUNNING" else "")
                    + "; it is still billed: stop it (`fab teardown`) or wait and run `pulumi up` again"
                )
            self.sleep(poll)

    # ---- network volumes -------------------------------------------------------------------

    def list_network_volumes(self) -> list[NetworkVolume]:
        return [NetworkVolume.from_json(v) for v in self.request("GET", "/v2/network-volumes")["networkVolumes"]]

    def find_network_volumes(self, name: str) -> list[NetworkVolume]:
        return [v for v in self.list_network_volumes() if v.name == name]

    def get_network_volume(self, volume_id: str) -> NetworkVolume:
        return NetworkVolume.from_json(self.request("GET", f"/v2/network-volumes/{volume_id}"))

    def create_network_volume(
        self, name: str, size_gb: int, data_center_id: str, type: Optional[str] = None
    ) -> NetworkVolume:
        """POST /v2/network-volumes, reconciled by name like create_pod (a volume is billed too)."""
        body: dict[str, Any] = {"name": name, "size": size_gb, "dataCenter": data_center_id}
        if type:
            body["type"] = type
        before = {v.id for v in self.find_network_volumes(name)}
        attempt = 0
        while True:
            try:
                return NetworkVolume.from_json(self.request("POST", "/v2/network-volumes", json=body, retry_lost=False))
            except RunPodError as e:
                if not e.lost:
                    raise
                new = [v for v in self.find_network_volumes(name) if v.id not in before]
                if new:
                    return new[0]
                if attempt >= self.max_retries:
                    raise
                self.sleep(self._backoff(attempt))
                attempt += 1

    def update_network_volume(self, volume_id: str, *, name: Optional[str] = None,
                              size_gb: Optional[int] = None) -> NetworkVolume:
        body = _clean({"name": name, "size": size_gb})
        return NetworkVolume.from_json(self.request("PATCH", f"/v2/network-volumes/{volume_id}", json=body))

    def delete_network_volume(self, volume_id: str, missing_ok: bool = True) -> None:
        try:
            self.request("DELETE", f"/v2/network-volumes/{volume_id}")
        except RunPodError as e:
            if e.status_code == 404 and missing_ok:
                return
            raise

    # ---- catalog ---------------------------------------------------------------------------

    def list_gpu_types(
        self, *, availability: bool = False, count: Optional[int] = None, cloud: Optional[str] = None
    ) -> list[GpuType]:
        """GPU types with list prices; with availability=True also pod stock (overall and per DC)."""
        params = _catalog_params(availability, count, cloud)
        return [GpuType.from_json(g) for g in self.request("GET", "/v2/catalog/gpus", params=params)["gpus"]]

    def get_gpu_type(
        self, gpu_type_id: str, *, availability: bool = False, count: Optional[int] = None,
        cloud: Optional[str] = None,
    ) -> GpuType:
        params = _catalog_params(availability, count, cloud)
        path = "/v2/catalog/gpus/" + requests.utils.quote(gpu_type_id, safe="")
        return GpuType.from_json(self.request("GET", path, params=params))

    def list_data_centers(self, *, gpu_availability: bool = False) -> list[dict]:
        params = {"include": "GPU_AVAILABILITY"} if gpu_availability else None
        return list(self.request("GET", "/v2/catalog/datacenters", params=params)["dataCenters"])

    # ---- billing ---------------------------------------------------------------------------

    def billing(self, **window: Any) -> BillingReport:
        """GET /v2/billing: total spend per bucket. Window: start_time/end_time (datetime or RFC
        3339 string) or last_n, and bucket_size (hour|day|week|month|year)."""
        return BillingReport.from_json(self.request("GET", "/v2/billing", params=_billing_params(**window)))

    def pod_billing(self, pod_id: Optional[str] = None, **window: Any) -> BillingReport:
        """GET /v2/billing/pods, one record per pod per bucket (or only `pod_id`'s)."""
        params = _billing_params(**window)
        params["podId"] = pod_id
        return BillingReport.from_json(self.request("GET", "/v2/billing/pods", params=params))

    def network_volume_billing(self, network_volume_id: Optional[str] = None, **window: Any) -> BillingReport:
        params = _billing_params(**window)
        params["networkVolumeId"] = network_volume_id
        return BillingReport.from_json(self.request("GET", "/v2/billing/network-volumes", params=params))


# --------------------------------------------------------------------------------------------


def _clean(d: Optional[dict]) -> Optional[dict]:
    return None if d is None else {k: v for k, v in d.items() if v is not None}


def _action_done(action: str, status: str) -> bool:
    if action == "stop":
        return status == "EXITED"
    if action == "start":
        return status in ("PROVISIONING", "STARTING", "RUNNING")
    return False  # a restart cannot be recognised from the status; send it again


def _catalog_params(availability: bool, count: Optional[int], cloud: Optional[str]) -> dict:
    if not availability:
        # count/cloud are "valid only with include=AVAILABILITY" (400 otherwise).
        return {}
    return _clean({"include": "AVAILABILITY", "product": "POD", "count": count, "cloud": cloud})  # type: ignore


def _billing_params(
    start_time: Any = None, end_time: Any = None, bucket_size: Optional[str] = None, last_n: Optional[int] = None
) -> dict:
    if last_n is not None and (start_time is not None or end_time is not None):
        raise ValueError("billing: pass last_n or start_time/end_time, not both (the API rejects both)")
    return {
        "startTime": _rfc3339(start_time),
        "endTime": _rfc3339(end_time),
        "bucketSize": bucket_size,
        "lastN": last_n,
    }


def _rfc3339(t: Any) -> Optional[str]:
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, (int, float)):  # a Unix timestamp
        t = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    if t.tzinfo is None:
        raise ValueError(f"billing time {t!r} has no timezone; pass an aware datetime (UTC)")
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error_from(resp: requests.Response, method: str, path: str) -> RunPodError:
    title, detail, errors = "", "", []
    try:
        body = resp.json()
        if isinstance(body, dict):
            title = str(body.get("title") or "")
            detail = str(body.get("detail") or "")
            errors = [str(x) for x in body.get("errors") or []]
    except ValueError:
        detail = resp.text[:300]
    retry_after = None
    ra = resp.headers.get("Retry-After")
    if ra is not None:
        try:
            retry_after = float(ra)  # "integer seconds on this API"
        except ValueError:
            retry_after = None
    return RunPodError(
        detail or resp.reason or "error",
        status_code=resp.status_code,
        method=method,
        path=path,
        title=title or (resp.reason or ""),
        errors=errors,
        retry_after=retry_after,
    )
