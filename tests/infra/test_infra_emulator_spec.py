"""Every emulator response validates against RunPod's OpenAPI document (runpod-openapi-v2.json).

    .venv/bin/python -m pytest tests/infra/test_infra_emulator_spec.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.runpod import PodRequest, RunPodClient, RunPodError
from tests.emulator import Clock, RunPodEmulator, spec

ROOT = Path(__file__).resolve().parents[2]
SHARED_SPEC = ROOT.parent / "shared" / "reference" / "runpod-openapi-v2.json"


def _exercise(emu: RunPodEmulator) -> None:
    """Drive every emulated operation through success and through its error paths."""
    rp = RunPodClient(emu.api_key, emu.base_url, sleep=lambda s: None, max_retries=1)

    def fails(fn, *a, **kw):
        with pytest.raises(RunPodError):
            fn(*a, **kw)

    rp.request("PUT", "/v2/account/ssh-keys", json={"keys": [emu.public_key]})
    rp.request("GET", "/v2/account/ssh-keys")
    rp.list_gpu_types()
    rp.list_gpu_types(availability=True, count=2, cloud="COMMUNITY")
    rp.get_gpu_type("NVIDIA A40", availability=True)
    fails(rp.get_gpu_type, "NVIDIA Nonexistent")
    fails(rp.request, "GET", "/v2/catalog/gpus", params={"include": "AVAILABILITY"})  # 400: product missing
    rp.list_data_centers(gpu_availability=True)
    vol = rp.create_network_volume("ultrashape-data", 20, "US-KS-2", "HIGH_PERFORMANCE")
    rp.update_network_volume(vol.id, size_gb=30)
    fails(rp.update_network_volume, vol.id, size_gb=10)  # 400 shrink
    fails(rp.create_network_volume, "x", 5, "US-KS-2")  # 422 size < 10
    rp.get_network_volume(vol.id)
    base = PodRequest(name="ultrashape-a40", image="runpod/pytorch:x", gpu_type_id="NVIDIA A40",
                      ports=["22/tcp", "6006/http", "8000/http"], volume_gb=20, start_ssh=True)
    pod = rp.create_pod(base)
    rp.get_pod(pod.id)
    pod = rp.wait_for_pod(pod.id, poll=0.01, require_ssh=emu.ssh)
    rp.list_pods()
    rp.update_pod(pod.id, env={"A": "1"}, name="ultrashape-a40")
    fails(rp.update_pod, pod.id, mounts={"network": [{"volumeId": vol.id, "path": "/workspace"}]})  # 400 kind
    rp.restart_pod(pod.id)
    rp.stop_pod(pod.id)
    assert rp.stop_pod(pod.id).status == "EXITED"  # a 409 for a pod already stopped is success
    fails(rp.restart_pod, pod.id)  # 409: restart is not allowed on an EXITED pod
    rp.start_pod(pod.id)
    on_vol = rp.create_pod(PodRequest(name="ultrashape-h100", image="runpod/pytorch:x",
                                      gpu_type_id="NVIDIA H100 80GB HBM3", network_volume_id=vol.id))
    fails(rp.delete_network_volume, vol.id)  # 400: mounted
    rp.pod_action(on_vol.id, "terminate")  # 204 via action
    emu.out_of_capacity("NVIDIA A40", times=1)
    fails(rp.create_pod, base)  # 400 capacity
    emu.forbid("NVIDIA H100 PCIe")
    fails(rp.create_pod, PodRequest(name="n", image="i", gpu_type_id="NVIDIA H100 PCIe"))  # 403
    fails(rp.request, "POST", "/v2/pods", json={"name": "", "gpu": {"id": "NVIDIA A40"}})  # 422
    fails(rp.request, "POST", "/v2/pods/" + pod.id + "/action", json={"action": "explode"})  # 422
    emu.inject(429, "GET", "/v2/pods", times=2, retry_after=1)
    fails(rp.list_pods)  # 429 twice (max_retries=1)
    emu.inject(503, "GET", "/v2/pods/*", times=2)
    fails(rp.get_pod, pod.id)  # 503 twice
    emu.inject(402, "POST", "/v2/pods", times=1)
    fails(rp.create_pod, base)
    fails(RunPodClient("rpa_bad", emu.base_url).list_pods)  # 401
    fails(rp.request, "DELETE", "/v2/catalog/gpus")  # 405
    emu.advance(3600)
    rp.billing(bucket_size="hour", last_n=3)
    rp.billing(start_time="2026-01-01T00:00:00Z", end_time="2026-01-03T00:00:00Z", bucket_size="day")
    rp.pod_billing(pod.id, bucket_size="day", last_n=2)
    rp.pod_billing(bucket_size="week", last_n=1)
    rp.network_volume_billing(vol.id, bucket_size="month", last_n=1)
    rp.network_volume_billing(bucket_size="year", last_n=1)
    fails(rp.request, "GET", "/v2/billing/pods", params={"lastN": 2, "startTime": "2026-01-01T00:00:00Z"})  # 400
    fails(rp.request, "GET", "/v2/billing", params={"bucketSize": "fortnight"})  # 422
    rp.terminate_pod(pod.id)
    fails(rp.get_pod, pod.id)  # 404
    rp.delete_network_volume(vol.id)


@pytest.mark.integration
def test_every_response_matches_the_openapi_document(tmp_path):
    with RunPodEmulator(tmp_path, Clock(real=True), ssh=False, provision_seconds=0.01, start_seconds=0.01) as emu:
        _exercise(emu)
        exchanges = list(emu.exchanges)
    seen = set()
    problems = []
    for x in exchanges:
        assert x.template, f"{x.method} {x.path}: not a path of the document"
        if spec.operation(x.method, x.template) is None:
            # A method the path does not have: the document's MethodNotAllowedError response.
            assert x.status == 405 and x.headers.get("Allow") and x.content_type == "application/problem+json"
            problems += spec.schema_errors("#/components/schemas/ErrorResponse", x.body)
            seen.add((x.method, x.template, x.status))
            continue
        declared = spec.declared_statuses(x.method, x.template)
        assert str(x.status) in declared or "default" in declared, (x.method, x.template, x.status)
        ref, ctype = spec.response_schema_ref(x.method, x.template, x.status)
        if ref is None:
            assert x.body is None, f"{x.method} {x.path} -> {x.status} must have no body"
        else:
            assert x.content_type == ctype, (x.method, x.path, x.status, x.content_type, ctype)
            for err in spec.schema_errors(ref, x.body):
                problems.append(f"{x.method} {x.path} -> {x.status}: {err}")
        assert "RateLimit" in x.headers and "RateLimit-Policy" in x.headers
        if x.status == 429:
            assert int(x.headers["Retry-After"]) >= 0
        seen.add((x.method, x.template, x.status))
    assert not problems, "\n".join(problems[:20])
    # The scenario really covered the kit's operations, successes and failures alike.
    statuses = {s for _, _, s in seen}
    assert {200, 201, 204, 400, 401, 402, 403, 404, 405, 409, 422, 429, 503} <= statuses, statuses
    ops = {(m, t) for m, t, _ in seen}
    for needed in [("POST", "/v2/pods"), ("GET", "/v2/pods"), ("GET", "/v2/pods/{id}"), ("PATCH", "/v2/pods/{id}"),
                   ("DELETE", "/v2/pods/{id}"), ("POST", "/v2/pods/{id}/action"), ("POST", "/v2/network-volumes"),
                   ("GET", "/v2/network-volumes"), ("PATCH", "/v2/network-volumes/{id}"),
                   ("DELETE", "/v2/network-volumes/{id}"), ("GET", "/v2/catalog/gpus"),
                   ("GET", "/v2/catalog/gpus/{id}"), ("GET", "/v2/catalog/datacenters"), ("GET", "/v2/billing"),
                   ("GET", "/v2/billing/pods"), ("GET", "/v2/billing/network-volumes")]:
        assert needed in ops, needed


@pytest.mark.unit
def test_client_request_bodies_match_the_document():
    full = PodRequest(name="ultrashape-h100", image="runpod/pytorch:x", gpu_type_id="NVIDIA H100 PCIe", gpu_count=2,
                      cloud="COMMUNITY", disk_gb=100, volume_gb=50, env={"PUBLIC_KEY": "ssh-ed25519 AAAA x"},
                      data_center_ids=["EU-RO-1"], min_cuda_version="12.8")
    assert spec.schema_errors("#/components/schemas/CreatePodRequest", full.to_json()) == []
    on_volume = PodRequest(name="n", image="i", gpu_type_id="g", network_volume_id="vol1")
    body = on_volume.to_json()
    assert "persistent" not in body["mounts"]
    assert spec.schema_errors("#/components/schemas/CreatePodRequest", body) == []
    # The validator is not vacuous: an unknown field and a zero GPU count are both caught.
    bad = {**full.to_json(), "bogus": 1}
    bad["gpu"] = {"id": "g", "count": 0}
    errs = spec.schema_errors("#/components/schemas/CreatePodRequest", bad)
    assert any("bogus" in e for e in errs) and any("count" in e for e in errs)


@pytest.mark.unit
def test_spec_copy_matches_the_shared_reference():
    if not SHARED_SPEC.is_file():
        pytest.skip(f"{SHARED_SPEC} is only on the team's machines")
    assert spec.SPEC_PATH.read_bytes() == SHARED_SPEC.read_bytes(), (
        "tests/emulator/runpod-openapi-v2.json differs from ../shared/reference: copy the reference over it "
        "and re-run the infra tests")
