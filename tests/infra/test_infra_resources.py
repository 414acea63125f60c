"""The Pulumi dynamic providers (infra/resources.py) driven directly against the RunPod emulator.

    .venv/bin/python -m pytest tests/infra/test_infra_resources.py -q

Pulumi calls check/diff/create/read/update/delete on these objects; here the test does, with the
props the program (infra/__main__.py) would pass.
"""

from __future__ import annotations

import base64
import subprocess

import dill
import pytest
from pulumi.dynamic.dynamic import serialize_provider

from infra.resources import NetworkVolumeProvider, PodProvider, pod_outputs, ssh_answers
from infra.runpod import RunPodClient, RunPodError

pytestmark = pytest.mark.integration

H100 = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"]


def props(emu, **kw) -> dict:
    p = {
        "name": "ultrashape-h100", "gpuTypes": list(H100), "gpuCount": 1, "cloudType": "SECURE",
        "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404", "containerDiskGb": 50, "volumeGb": 20,
        "networkVolumeId": None, "volumeMountPath": "/workspace", "ports": ["22/tcp", "6006/http", "8000/http"],
        "env": {"PUBLIC_KEY": emu.public_key, "WANDB_API_KEY": "wandb-secret"} if emu.ssh else {},
        "dataCenterIds": [], "minCudaVersion": "12.8", "createTimeoutSeconds": 30,
        "apiKey": emu.api_key, "apiBase": emu.base_url,
    }
    p.update(kw)
    return p


def test_create_waits_for_ssh_and_reports_endpoints(ssh_emu):
    emu = ssh_emu
    prov = PodProvider(poll_seconds=0.05)
    res = prov.create(props(emu))
    o = res.outs
    assert o["podId"] == res.id and o["status"] == "RUNNING" and o["gpuTypeId"] == H100[0]
    assert (o["sshHost"], o["publicIp"], o["sshUser"]) == ("127.0.0.1", "127.0.0.1", "root")
    assert o["sshPort"] == emu.pod(res.id).ssh_port and ssh_answers("127.0.0.1", o["sshPort"])
    assert o["tensorboardUrl"] == f"https://{res.id}-6006.proxy.runpod.net"
    assert o["apiUrl"] == f"https://{res.id}-8000.proxy.runpod.net"
    assert o["costPerHr"] == 2.69
    r = subprocess.run(emu.ssh_command(res.id) + ["echo $WANDB_API_KEY; ls -d /workspace"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["wandb-secret", "/workspace"], r.stderr


def test_capacity_on_first_gpu_places_on_the_next(emu):
    emu.out_of_capacity(H100[0])
    res = PodProvider(poll_seconds=0.05).create(props(emu))
    assert res.outs["gpuTypeId"] == H100[1] and res.outs["costPerHr"] == 2.39


def test_429_and_5xx_during_create_are_retried_and_leave_one_pod(emu, sleeps):
    emu.inject(429, "POST", "/v2/pods", times=1, retry_after=3)
    emu.inject(503, "POST", "/v2/pods", times=1)
    emu.inject(500, "GET", "/v2/pods/*", times=2)
    res = PodProvider(poll_seconds=0.05, sleep=sleeps).create(props(emu))
    assert list(emu.pods) == [res.id]
    assert [x.status for x in emu.requests_to("POST", "/v2/pods")] == [429, 503, 201]
    assert sleeps[0] == 3.0  # Retry-After honoured
    assert [x.status for x in emu.requests_to("GET", "/v2/pods/*")][:3] == [500, 500, 200]


def test_lost_create_reply_gives_no_duplicate(emu):
    emu.lose_response("POST", "/v2/pods", times=1, apply=True)
    res = PodProvider(poll_seconds=0.05).create(props(emu))
    assert [p.id for p in emu.pods_named("ultrashape-h100")] == [res.id]


def test_402_stops_clearly(emu):
    emu.set_balance(0)
    with pytest.raises(RunPodError) as ei:
        PodProvider(poll_seconds=0.05).create(props(emu))
    assert ei.value.status_code == 402 and "balance" in str(ei.value)
    assert not emu.pods and len(emu.requests_to("POST", "/v2/pods")) == 1


def test_a_pod_that_never_gets_ready_is_terminated_not_orphaned(tmp_path):
    from tests.emulator import Clock, RunPodEmulator

    # A frozen clock never lets the pod leave PROVISIONING (real sleeps do not move it).
    with RunPodEmulator(tmp_path, Clock(real=False), ssh=False) as emu:
        with pytest.raises(TimeoutError, match="still PROVISIONING"):
            PodProvider(poll_seconds=0.05).create(props(emu, createTimeoutSeconds=0.3))
        assert not emu.pods and len(emu.terminated) == 1


def test_existing_pod_with_the_name_is_adopted_not_duplicated(emu):
    prov = PodProvider(poll_seconds=0.05)
    first = prov.create(props(emu))
    again = prov.create(props(emu))  # e.g. `pulumi up` killed after the create, state lost
    assert again.id == first.id and len(emu.pods) == 1
    RunPodClient(emu.api_key, emu.base_url).stop_pod(first.id)
    assert prov.create(props(emu)).outs["status"] == "RUNNING"  # a stopped one is started
    with pytest.raises(RunPodError, match="already exists.*image"):
        prov.create(props(emu, image="runpod/pytorch:other-tag"))
    assert len(emu.pods) == 1


def test_diff_replaces_for_gpu_image_disk_and_updates_env_in_place(emu):
    prov = PodProvider()
    olds = {**props(emu), "gpuTypeId": H100[0], "dataCenterId": "EU-RO-1", "podId": "x"}
    # As the engine passes them: the program's inputs plus the output placeholders it declares.
    from infra.resources import _POD_OUTPUTS

    news = {**props(emu), **{k: None for k in _POD_OUTPUTS}}
    d = prov.diff("x", olds, news)
    assert not d.changes and not d.replaces
    for key, value in [("image", "runpod/pytorch:2.0"), ("containerDiskGb", 80), ("volumeGb", 40),
                       ("gpuCount", 2), ("cloudType", "COMMUNITY"), ("networkVolumeId", "vol1")]:
        d = prov.diff("x", olds, {**news, key: value})
        assert d.changes and d.replaces == [key] and d.delete_before_replace, key
    d = prov.diff("x", olds, {**news, "gpuTypes": ["NVIDIA A40"]})
    assert d.replaces == ["gpuTypes"]
    d = prov.diff("x", olds, {**news, "gpuTypes": list(reversed(H100))})  # still contains the placed GPU
    assert not d.replaces
    d = prov.diff("x", olds, {**news, "env": {"A": "1"}})
    assert d.changes and not d.replaces
    d = prov.diff("x", olds, {**news, "apiKey": "rpa_rotated", "createTimeoutSeconds": 5})
    assert not d.changes


def test_update_patches_env_and_ports(emu):
    prov = PodProvider(poll_seconds=0.05)
    p = props(emu)
    res = prov.create(p)
    new = {**p, "env": {"A": "1"}, "ports": ["22/tcp", "8000/http"]}
    out = prov.update(res.id, {**p, **res.outs}, new).outs
    assert emu.pod(res.id).env == {"A": "1"} and out["tensorboardUrl"] is None and out["apiUrl"]


def test_delete_twice_is_fine_and_read_notices_a_gone_pod(emu):
    prov = PodProvider(poll_seconds=0.05)
    res = prov.create(props(emu))
    state = {**props(emu), **res.outs}
    assert prov.read(res.id, state).id == res.id
    prov.delete(res.id, state)
    prov.delete(res.id, state)
    assert not emu.pods
    assert prov.read(res.id, state).id is None


def test_network_volume_is_shared_by_name_and_kept_while_mounted(emu):
    vp = NetworkVolumeProvider()
    vprops = {"name": "ultrashape-data", "sizeGb": 50, "dataCenterId": "EU-RO-1", "type": None,
              "apiKey": emu.api_key, "apiBase": emu.base_url}
    a = vp.create(vprops)  # the a40 stack
    b = vp.create({**vprops, "sizeGb": 80})  # the h100 stack finds the same volume, grows it
    assert a.id == b.id and not a.outs["adopted"] and b.outs["adopted"] and b.outs["sizeGb"] == 80
    assert len(emu.volumes) == 1
    with pytest.raises(RunPodError, match="exists in EU-RO-1"):
        vp.create({**vprops, "dataCenterId": "US-KS-2"})
    assert vp.check({"sizeGb": 80}, {**vprops, "sizeGb": 50}).failures  # cannot shrink
    assert vp.diff(a.id, a.outs, {**vprops, "dataCenterId": "US-KS-2"}).replaces == ["dataCenterId"]
    pod = PodProvider(poll_seconds=0.05).create(props(emu, networkVolumeId=a.id, volumeGb=0))
    assert emu.pod(pod.id).workspace == emu.volumes[a.id].path
    with pytest.raises(RunPodError, match="still mounted by ultrashape-h100"):
        vp.delete(a.id, a.outs)
    PodProvider().delete(pod.id, pod.outs)
    vp.delete(a.id, a.outs)
    vp.delete(a.id, a.outs)
    assert vp.read(a.id, a.outs).id is None


def test_no_secret_in_the_serialized_provider_or_plain_outputs(emu):
    blob = base64.b64decode(serialize_provider(PodProvider(poll_seconds=0.05)))
    assert emu.api_key.encode() not in blob
    assert isinstance(dill.loads(blob), PodProvider)
    assert PodProvider.serialize_as_secret_always is False  # nothing secret captured, so no need
    # What the program marks secret (infra.resources.SECRET_OUTPUTS) covers every secret-bearing output.
    from infra.resources import SECRET_OUTPUTS

    res = PodProvider(poll_seconds=0.05).create(props(emu))
    leaky = [k for k, v in res.outs.items() if k not in SECRET_OUTPUTS and
             any(s in str(v) for s in (emu.api_key, "wandb-secret"))]
    assert leaky == []
