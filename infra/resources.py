"""Pulumi dynamic providers for a RunPod pod and network volume, on top of infra/runpod.py.

    pod = Pod("pod", PodArgs(name="ultrashape-h100", gpu_types=[...], image=..., ...))
    pulumi.export("sshPort", pod.ssh_port)

Layering (as SkyPilot keeps `adaptors/` apart from `provision/`): the RunPodClient speaks HTTP and
knows the retry table; the providers here speak Pulumi (check/diff/create/read/update/delete) and
never touch HTTP; infra/__main__.py reads the stack and declares resources.

What the providers promise:
- create tries the GPU types in order (400/403 -> next, 402 stops), waits for RUNNING with a direct
  SSH endpoint, then checks that sshd actually answers (an SSH banner on the port). If any of that
  fails, the pod it made is terminated before the error is raised, because a failed create leaves
  nothing in Pulumi's state and an orphaned H100 is a bill nobody sees.
- a pod that already carries the stack's deterministic name is adopted instead of duplicated (e.g.
  after `pulumi up` was killed mid-create, or state was lost), if it matches the request.
- diff replaces the pod for changes to what RunPod cannot change on a placed pod (GPU type, count,
  cloud, image, disks, volume, placement); env, ports and name are patched in place. Replacement is
  delete-before-replace: two pods must never carry the same name.
- delete is idempotent: a pod or volume that is already gone is success.
- no secret in plain state: the API key is an input only when it came from `runpod:apiKey` (a
  secret), and both it and the env (which may hold WANDB_API_KEY) are declared secret outputs. The
  serialized providers hold no key (they carry only timing settings).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from infra.runpod import NetworkVolume as ApiVolume
from infra.runpod import Pod as ApiPod
from infra.runpod import PodRequest, RunPodClient, RunPodError

# Inputs whose change needs a new pod. (RunPod could PATCH `image` and `disk`, but that restarts the
# container and wipes its disk anyway; a fresh pod is the honest version of that.)
POD_REPLACE_KEYS = ("gpuCount", "cloudType", "image", "containerDiskGb", "volumeGb", "networkVolumeId",
                    "volumeMountPath", "minCudaVersion")
# Inputs patched in place.
POD_UPDATE_KEYS = ("env", "ports", "name")
# Inputs that only steer the provider (how to reach the API, how long to wait): no pod change.
POD_META_KEYS = ("apiKey", "apiBase", "createTimeoutSeconds")
SECRET_OUTPUTS = ["apiKey", "env"]


def _client(props: dict, sleep=None) -> RunPodClient:
    kwargs = {"sleep": sleep} if sleep is not None else {}
    return RunPodClient(api_key=props.get("apiKey") or None, base_url=props.get("apiBase") or None, **kwargs)


def ssh_answers(host: str, port: int, timeout: float = 5.0) -> bool:
    """True when something speaking SSH listens there (reads the 'SSH-2.0-...' banner)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def pod_outputs(pod: ApiPod, props: dict) -> dict:
    """The provider's outputs: the inputs, plus what RunPod assigned."""
    http = [int(p.split("/")[0]) for p in props.get("ports", []) if p.endswith("/http")]
    return {
        **props,
        "podId": pod.id,
        "gpuTypeId": pod.gpu_type_id,
        "status": pod.status,
        "dataCenterId": pod.data_center_id,
        "publicIp": pod.public_ip,
        "sshHost": pod.ssh_host,
        "sshPort": pod.ssh_port,
        "sshUser": pod.ssh_username or "root",
        "sshCommand": f"ssh root@{pod.ssh_host} -p {pod.ssh_port}" if pod.ssh_host else None,
        "tensorboardUrl": pod.proxy_url(6006) if 6006 in http else None,
        "apiUrl": pod.proxy_url(8000) if 8000 in http else None,
        "costPerHr": pod.cost_per_hr,
    }


class PodProvider(ResourceProvider):
    """CRUD for one RunPod GPU pod. `poll_seconds` is how often create polls the pod's status."""

    serialize_as_secret_always = False  # it holds no secret: only poll_seconds

    def __init__(self, poll_seconds: float = 5.0, sleep=None):
        super().__init__()
        self.poll_seconds = poll_seconds
        self.sleep = sleep  # tests: the emulator's clock; None: time.sleep

    def check(self, olds: dict, news: dict) -> CheckResult:
        failures = []
        if not news.get("gpuTypes"):
            failures.append(CheckFailure("gpuTypes", "list at least one GPU type, e.g. ['NVIDIA A40']"))
        if int(news.get("gpuCount") or 0) < 1:
            failures.append(CheckFailure("gpuCount", "must be >= 1"))
        if news.get("cloudType") not in ("SECURE", "COMMUNITY"):
            failures.append(CheckFailure("cloudType", "must be SECURE or COMMUNITY"))
        if "22/tcp" not in (news.get("ports") or []):
            failures.append(CheckFailure("ports", "must include '22/tcp' (direct SSH)"))
        if news.get("networkVolumeId") and news.get("volumeGb"):
            failures.append(CheckFailure("volumeGb", "a pod has a network volume or a host-local one, not both"))
        return CheckResult(news, failures)

    def diff(self, id_: str, olds: dict, news: dict) -> DiffResult:
        replaces = [k for k in POD_REPLACE_KEYS if olds.get(k) != news.get(k)]
        # The GPU list is an order of preference: reordering it, or adding types, keeps a pod that
        # runs on one of them. Only losing the placed type forces a new pod.
        if olds.get("gpuTypeId") and olds["gpuTypeId"] not in (news.get("gpuTypes") or []):
            replaces.append("gpuTypes")
        placed_dc = olds.get("dataCenterId")
        if news.get("dataCenterIds") and placed_dc and placed_dc not in news["dataCenterIds"]:
            replaces.append("dataCenterIds")
        # Only inputs count: the output placeholders the program declares (podId: None, ...) and the
        # provider-steering keys (apiKey, apiBase, createTimeoutSeconds) never mean a change to the pod.
        changed = [k for k in _INPUT_KEYS if k not in POD_META_KEYS and olds.get(k) != news.get(k)]
        return DiffResult(
            changes=bool(replaces or changed),
            replaces=replaces,
            stables=["podId", "gpuTypeId", "dataCenterId"] if not replaces else [],
            delete_before_replace=True,
        )

    def create(self, props: dict) -> CreateResult:
        rp = _client(props, self.sleep)
        name = props["name"]
        req = PodRequest(
            name=name,
            image=props["image"],
            gpu_type_id=props["gpuTypes"][0],
            gpu_count=int(props["gpuCount"]),
            cloud=props["cloudType"],
            disk_gb=int(props["containerDiskGb"]),
            volume_gb=int(props.get("volumeGb") or 0) or None,
            network_volume_id=props.get("networkVolumeId") or None,
            volume_mount_path=props.get("volumeMountPath") or "/workspace",
            ports=list(props["ports"]),
            env=dict(props.get("env") or {}),
            data_center_ids=list(props.get("dataCenterIds") or []),
            min_cuda_version=props.get("minCudaVersion") or None,
        )
        pod = self._adopt(rp, req, props)
        created = pod is None
        if created:
            pod = rp.create_pod_any(req, props["gpuTypes"])
        try:
            pod = self._wait_ready(rp, pod.id, float(props.get("createTimeoutSeconds") or 1200))
        except BaseException as e:
            if created:
                self._cleanup(rp, pod.id, e)
            raise
        return CreateResult(pod.id, pod_outputs(pod, props))

    def _adopt(self, rp: RunPodClient, req: PodRequest, props: dict) -> Optional[ApiPod]:
        """An existing live pod with our name: reuse it if it is what we would create, else refuse."""
        live = [p for p in rp.find_pods(req.name) if p.status != "TERMINATED"]
        if not live:
            return None
        if len(live) > 1:
            raise RunPodError(
                f"{len(live)} pods are named '{req.name}' ({', '.join(p.id for p in live)}); terminate the extra ones "
                "in the RunPod console, then run `pulumi up` again",
                status_code=None, method="GET", path="/v2/pods",
            )
        pod = live[0]
        mismatch = []
        if pod.gpu_type_id not in props["gpuTypes"]:
            mismatch.append(f"GPU {pod.gpu_type_id} not in {props['gpuTypes']}")
        if pod.image != req.image:
            mismatch.append(f"image {pod.image} != {req.image}")
        if pod.gpu_count != req.gpu_count:
            mismatch.append(f"gpuCount {pod.gpu_count} != {req.gpu_count}")
        if (pod.network_volume_id or None) != (req.network_volume_id or None):
            mismatch.append(f"network volume {pod.network_volume_id} != {req.network_volume_id}")
        if mismatch:
            raise RunPodError(
                f"a pod named '{req.name}' already exists ({pod.id}, {pod.status}) but differs from the stack: "
                f"{'; '.join(mismatch)}. Terminate it in the RunPod console (or `pulumi import`), then `pulumi up`",
                status_code=None, method="GET", path="/v2/pods",
            )
        if pod.status == "EXITED":
            rp.start_pod(pod.id)
        return pod

    def _wait_ready(self, rp: RunPodClient, pod_id: str, timeout: float) -> ApiPod:
        t0 = time.monotonic()
        pod = rp.wait_for_pod(pod_id, "RUNNING", timeout=timeout, poll=self.poll_seconds, require_ssh=True)
        # RUNNING with a port mapping is not yet sshd accepting connections: wait for the banner.
        while not ssh_answers(pod.ssh_host, pod.ssh_port, timeout=min(5.0, self.poll_seconds * 4 + 1)):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(
                    f"pod {pod_id} is RUNNING but SSH at {pod.ssh_host}:{pod.ssh_port} did not answer within "
                    f"{timeout:.0f} s; does the image start sshd from PUBLIC_KEY (RunPod's images do)?"
                )
            (time.sleep if self.sleep is None else self.sleep)(self.poll_seconds)
            pod = rp.get_pod(pod_id)
        return pod

    @staticmethod
    def _cleanup(rp: RunPodClient, pod_id: str, cause: BaseException) -> None:
        try:
            rp.terminate_pod(pod_id)
        except Exception as e:  # the create failed AND we cannot clean up: say exactly what to do
            raise RunPodError(
                f"pod {pod_id} was created but never became usable ({cause}); terminating it failed too ({e}). "
                f"It is still billed: please delete it manually in the RunPod console",
                status_code=None, method="DELETE", path=f"/v2/pods/{pod_id}",
            ) from cause

    def read(self, id_: str, props: dict) -> ReadResult:
        pod = _client(props, self.sleep).find_pod(id_)
        if pod is None or pod.status == "TERMINATED":
            return ReadResult(None, {})  # gone: `pulumi refresh` drops it from state
        return ReadResult(id_, pod_outputs(pod, {k: v for k, v in props.items() if k in _INPUT_KEYS}))

    def update(self, id_: str, olds: dict, news: dict) -> UpdateResult:
        rp = _client(news, self.sleep)
        patch: dict[str, Any] = {}
        if olds.get("env") != news.get("env"):
            patch["env"] = dict(news.get("env") or {})  # reaches the container at its next (re)start
        if olds.get("ports") != news.get("ports"):
            patch["ports"] = list(news["ports"])
        if olds.get("name") != news.get("name"):
            patch["name"] = news["name"]
        pod = rp.update_pod(id_, **patch) if patch else rp.get_pod(id_)
        return UpdateResult(pod_outputs(pod, {k: v for k, v in news.items() if k in _INPUT_KEYS}))

    def delete(self, id_: str, props: dict) -> None:
        _client(props, self.sleep).terminate_pod(id_, missing_ok=True)


_INPUT_KEYS = ("name", "gpuTypes", "gpuCount", "cloudType", "image", "containerDiskGb", "volumeGb",
               "networkVolumeId", "volumeMountPath", "ports", "env", "dataCenterIds", "minCudaVersion",
               "createTimeoutSeconds", "apiKey", "apiBase")


class NetworkVolumeProvider(ResourceProvider):
    """CRUD for the shared network volume, found by name so that every stack uses the same one."""

    serialize_as_secret_always = False

    def check(self, olds: dict, news: dict) -> CheckResult:
        failures = []
        size = int(news.get("sizeGb") or 0)
        if not 10 <= size <= 4096:
            failures.append(CheckFailure("sizeGb", f"must be 10..4096 GB, got {size}"))
        if olds.get("sizeGb") and size < int(olds["sizeGb"]):
            failures.append(CheckFailure("sizeGb", f"network volumes cannot shrink ({olds['sizeGb']} -> {size} GB)"))
        if not news.get("dataCenterId"):
            failures.append(CheckFailure("dataCenterId", "a network volume needs a data center"))
        return CheckResult(news, failures)

    def diff(self, id_: str, olds: dict, news: dict) -> DiffResult:
        replaces = [k for k in ("dataCenterId", "type") if k in news and olds.get(k) != news.get(k)]
        changes = bool(replaces) or olds.get("sizeGb") != news.get("sizeGb") or olds.get("name") != news.get("name")
        return DiffResult(changes=changes, replaces=replaces, delete_before_replace=False)

    def create(self, props: dict) -> CreateResult:
        rp = _client(props)
        same = [v for v in rp.find_network_volumes(props["name"])]
        here = [v for v in same if v.data_center_id == props["dataCenterId"]]
        if here:
            vol, adopted = here[0], True
            if vol.size_gb < int(props["sizeGb"]):
                vol = rp.update_network_volume(vol.id, size_gb=int(props["sizeGb"]))
        elif same:
            raise RunPodError(
                f"network volume '{props['name']}' exists in {same[0].data_center_id}, not in {props['dataCenterId']}; "
                f"set ultrashape:dataCenterIds to ['{same[0].data_center_id}'] so both stacks share it",
                status_code=None, method="GET", path="/v2/network-volumes",
            )
        else:
            vol = rp.create_network_volume(props["name"], int(props["sizeGb"]), props["dataCenterId"],
                                           props.get("type") or None)
            adopted = False
        return CreateResult(vol.id, self._outs(vol, props, adopted))

    @staticmethod
    def _outs(vol: ApiVolume, props: dict, adopted: bool) -> dict:
        return {**props, "volumeId": vol.id, "sizeGb": vol.size_gb, "dataCenterId": vol.data_center_id,
                "volumeType": vol.type, "adopted": adopted}

    def read(self, id_: str, props: dict) -> ReadResult:
        try:
            vol = _client(props).get_network_volume(id_)
        except RunPodError as e:
            if e.status_code == 404:
                return ReadResult(None, {})
            raise
        return ReadResult(id_, self._outs(vol, props, bool(props.get("adopted"))))

    def update(self, id_: str, olds: dict, news: dict) -> UpdateResult:
        rp = _client(news)
        vol = rp.update_network_volume(id_, name=news.get("name"), size_gb=int(news["sizeGb"]))
        return UpdateResult(self._outs(vol, news, bool(olds.get("adopted"))))

    def delete(self, id_: str, props: dict) -> None:
        rp = _client(props)
        users = [p for p in rp.list_pods() if p.network_volume_id == id_]
        if users:
            raise RunPodError(
                f"network volume {id_} is still mounted by {', '.join(f'{p.name} ({p.id})' for p in users)}; "
                "destroy those stacks first (the data would go with it)",
                status_code=None, method="DELETE", path=f"/v2/network-volumes/{id_}",
            )
        rp.delete_network_volume(id_, missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The resources the program declares.
# ------------------------------------------------------------------------------------------------


@dataclass
class PodArgs:
    name: pulumi.Input[str]
    gpu_types: pulumi.Input[list]
    gpu_count: pulumi.Input[int]
    cloud_type: pulumi.Input[str]
    image: pulumi.Input[str]
    container_disk_gb: pulumi.Input[int]
    volume_gb: pulumi.Input[int]
    network_volume_id: Optional[pulumi.Input[str]]
    ports: pulumi.Input[list]
    env: pulumi.Input[dict]
    data_center_ids: pulumi.Input[list]
    min_cuda_version: Optional[pulumi.Input[str]] = None
    volume_mount_path: str = "/workspace"
    create_timeout_seconds: int = 1200
    api_key: Optional[pulumi.Input[str]] = None  # a secret Output, or None to use RUNPOD_API_KEY
    api_base: Optional[str] = None

    def props(self) -> dict:
        return {
            "name": self.name, "gpuTypes": self.gpu_types, "gpuCount": self.gpu_count,
            "cloudType": self.cloud_type, "image": self.image, "containerDiskGb": self.container_disk_gb,
            "volumeGb": self.volume_gb, "networkVolumeId": self.network_volume_id, "ports": self.ports,
            "env": self.env, "dataCenterIds": self.data_center_ids, "minCudaVersion": self.min_cuda_version,
            "volumeMountPath": self.volume_mount_path, "createTimeoutSeconds": self.create_timeout_seconds,
            "apiKey": self.api_key, "apiBase": self.api_base,
        }


_POD_OUTPUTS = ("podId", "gpuTypeId", "status", "dataCenterId", "publicIp", "sshHost", "sshPort", "sshUser",
                "sshCommand", "tensorboardUrl", "apiUrl", "costPerHr")


class _SnakeOutputs:
    """Pulumi maps camelCase output names onto attributes verbatim; this gives the program snake_case ones."""

    def __getattr__(self, item: str):
        camel = _CAMEL.get(item)
        if camel is None:
            raise AttributeError(item)
        return getattr(self, camel)


class Pod(_SnakeOutputs, Resource, module="runpod", name="Pod"):
    """A RunPod GPU pod. Outputs: pod_id, gpu_type_id, public_ip, ssh_host, ssh_port, ssh_command,
    tensorboard_url, api_url, cost_per_hr, data_center_id (and every input)."""

    pod_id: pulumi.Output[str]
    gpu_type_id: pulumi.Output[str]
    public_ip: pulumi.Output[str]
    ssh_host: pulumi.Output[str]
    ssh_port: pulumi.Output[int]
    ssh_command: pulumi.Output[str]
    tensorboard_url: pulumi.Output[Optional[str]]
    api_url: pulumi.Output[Optional[str]]
    cost_per_hr: pulumi.Output[float]
    data_center_id: pulumi.Output[str]
    env: pulumi.Output[dict]

    def __init__(self, name: str, args: PodArgs, opts: Optional[pulumi.ResourceOptions] = None,
                 provider: Optional[PodProvider] = None):
        props = args.props()
        for k in _POD_OUTPUTS:
            props[k] = None  # declared so Pulumi creates the Output attributes
        opts = pulumi.ResourceOptions.merge(
            opts, pulumi.ResourceOptions(additional_secret_outputs=SECRET_OUTPUTS,
                                         delete_before_replace=True))
        super().__init__(provider or PodProvider(), name, props, opts)



@dataclass
class NetworkVolumeArgs:
    name: str
    size_gb: int
    data_center_id: str
    type: Optional[str] = None
    api_key: Optional[pulumi.Input[str]] = None
    api_base: Optional[str] = None

    def props(self) -> dict:
        return {"name": self.name, "sizeGb": self.size_gb, "dataCenterId": self.data_center_id,
                "type": self.type, "apiKey": self.api_key, "apiBase": self.api_base}


class NetworkVolume(_SnakeOutputs, Resource, module="runpod", name="NetworkVolume"):
    """The shared network volume. Outputs: volume_id, size_gb, data_center_id, volume_type, adopted."""

    volume_id: pulumi.Output[str]
    adopted: pulumi.Output[bool]

    def __init__(self, name: str, args: NetworkVolumeArgs, opts: Optional[pulumi.ResourceOptions] = None,
                 provider: Optional[NetworkVolumeProvider] = None):
        props = args.props()
        props.update({"volumeId": None, "volumeType": None, "adopted": None})
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["apiKey"]))
        super().__init__(provider or NetworkVolumeProvider(), name, props, opts)


_CAMEL = {
    "pod_id": "podId", "gpu_type_id": "gpuTypeId", "public_ip": "publicIp", "ssh_host": "sshHost",
    "ssh_port": "sshPort", "ssh_user": "sshUser", "ssh_command": "sshCommand", "tensorboard_url": "tensorboardUrl",
    "api_url": "apiUrl", "cost_per_hr": "costPerHr", "data_center_id": "dataCenterId",
    "volume_id": "volumeId", "volume_type": "volumeType", "size_gb": "sizeGb",
}
