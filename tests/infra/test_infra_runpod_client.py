"""infra/runpod.py against the RunPod emulator: typed calls, retries by status, no duplicate creates.

    .venv/bin/python -m pytest tests/infra/test_infra_runpod_client.py -q
"""

from __future__ import annotations

import subprocess

import pytest

from infra.runpod import NoCandidatePlaced, PodRequest, RunPodClient, RunPodError
from tests.emulator import Clock, RunPodEmulator

pytestmark = pytest.mark.integration

H100 = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"]


def req(emu, name="ultrashape-test", gpu="NVIDIA A40", **kw) -> PodRequest:
    kw.setdefault("env", {"PUBLIC_KEY": emu.public_key} if emu.ssh else {})
    kw.setdefault("volume_gb", 20)
    return PodRequest(name=name, image="runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404", gpu_type_id=gpu,
                      ports=["22/tcp", "6006/http", "8000/http"], **kw)


def ssh(emu, pod_id, command: str) -> str:
    r = subprocess.run(emu.ssh_command(pod_id) + [command], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_create_reaches_running_with_ssh(ssh_emu, sleeps):
    emu = ssh_emu
    rp = RunPodClient(emu.api_key, emu.base_url, sleep=sleeps)
    pod = rp.create_pod(req(emu))
    assert pod.status == "PROVISIONING" and pod.ssh_port is None and pod.cost_per_hr == 0.40
    pod = rp.wait_for_pod(pod.id, poll=0.05)
    assert pod.status == "RUNNING" and pod.ssh_ready
    assert (pod.ssh_host, pod.public_ip, pod.ssh_username) == ("127.0.0.1", "127.0.0.1", "root")
    assert pod.proxy_url(6006) == f"https://{pod.id}-6006.proxy.runpod.net"
    # The pod is a real SSH server whose /workspace is its own directory, with the pod's env.
    emu.pod(pod.id).workspace.joinpath("marker").write_text("hello")
    out = ssh(emu, pod.id, "cat /workspace/marker; echo; echo $RUNPOD_POD_ID $RUNPOD_API_BASE $RUNPOD_API_KEY")
    assert out.split() == ["hello", pod.id, emu.base_url, emu.api_key]


def test_stop_keeps_workspace_kills_jobs_and_start_gives_a_new_port(ssh_emu, sleeps):
    emu = ssh_emu
    rp = RunPodClient(emu.api_key, emu.base_url, sleep=sleeps)
    pod = rp.wait_for_pod(rp.create_pod(req(emu)).id, poll=0.05)
    ssh(emu, pod.id, "echo data > /workspace/kept; tmux new -d -s job 'sleep 300'; tmux ls")
    port1 = pod.ssh_port
    stopped = rp.stop_pod(pod.id)
    assert stopped.status == "EXITED" and stopped.cost_per_hr == 0.0 and stopped.ssh_port is None
    assert "start" in stopped.actions
    started = rp.wait_for_pod(rp.start_pod(pod.id).id, poll=0.05)
    assert started.ssh_port != port1
    assert ssh(emu, pod.id, "cat /workspace/kept").strip() == "data"
    # Stopping killed every process of the pod, the detached job included.
    r = subprocess.run(emu.ssh_command(pod.id) + ["tmux ls"], capture_output=True, text=True)
    assert r.returncode != 0


def test_capacity_error_on_first_gpu_falls_to_the_next(emu, client):
    emu.out_of_capacity(H100[0])
    tried = []
    pod = client.create_pod_any(req(emu, gpu="ignored"), H100, on_attempt=lambda g, e: tried.append((g, e)))
    assert pod.gpu_type_id == H100[1]
    assert [g for g, _ in tried] == H100[:2]
    assert tried[0][1].status_code == 400 and "no longer any instances" in tried[0][1].message
    assert len(emu.requests_to("POST", "/v2/pods")) == 2


def test_forbidden_pool_is_skipped(emu, client):
    emu.forbid(H100[0])
    assert client.create_pod_any(req(emu), H100).gpu_type_id == H100[1]


def test_every_candidate_refused_says_what_was_tried(emu, client):
    for g in H100:
        emu.out_of_capacity(g)
    with pytest.raises(NoCandidatePlaced) as ei:
        client.create_pod_any(req(emu), H100)
    assert [g for g, _ in ei.value.attempts] == H100
    assert "NVIDIA H100 PCIe: 400" in str(ei.value) and "gpuTypes" in str(ei.value)
    assert not emu.pods


def test_429_waits_retry_after_then_succeeds(emu, client, sleeps):
    emu.inject(429, "POST", "/v2/pods", times=2, retry_after=7)
    pod = client.create_pod(req(emu))
    assert sleeps[:2] == [7.0, 7.0]
    assert len(emu.pods) == 1 and pod.id in emu.pods
    assert [x.status for x in emu.requests_to("POST", "/v2/pods")] == [429, 429, 201]


def test_5xx_on_reads_is_retried_with_backoff(emu, client, sleeps):
    emu.inject(503, "GET", "/v2/pods", times=3)
    assert client.list_pods() == []
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]  # exponential


def test_5xx_on_create_is_reconciled_then_retried_without_duplicate(emu, client):
    emu.inject(502, "POST", "/v2/pods", times=1)
    pod = client.create_pod(req(emu))
    assert list(emu.pods) == [pod.id]
    assert [x.status for x in emu.requests_to("POST", "/v2/pods")] == [502, 201]


def test_lost_create_response_is_found_by_name_not_repeated(emu, client):
    emu.lose_response("POST", "/v2/pods", times=1, apply=True)
    pod = client.create_pod(req(emu, name="ultrashape-h100"))
    assert [p.id for p in emu.pods_named("ultrashape-h100")] == [pod.id]
    assert not emu.requests_to("POST", "/v2/pods")  # the only POST never got a reply


def test_lost_request_that_never_applied_is_sent_again(emu, client):
    emu.lose_response("POST", "/v2/pods", times=1, apply=False)
    pod = client.create_pod(req(emu))
    assert list(emu.pods) == [pod.id]


def test_an_older_pod_with_the_name_is_not_taken_for_the_new_one(emu, client):
    old = client.create_pod(req(emu))
    emu.lose_response("POST", "/v2/pods", times=1, apply=False)
    new = client.create_pod(req(emu))
    assert new.id != old.id and len(emu.pods) == 2


def test_402_stops_with_a_clear_message(emu, client):
    emu.set_balance(0)
    with pytest.raises(RunPodError) as ei:
        client.create_pod_any(req(emu), H100)
    e = ei.value
    assert e.status_code == 402 and (e.method, e.path) == ("POST", "/v2/pods")
    assert "Insufficient balance" in e.message and "add credit" in str(e)
    assert len(emu.requests_to("POST", "/v2/pods")) == 1  # no other candidate tried


def test_422_is_never_retried_and_lists_violations(emu, client, sleeps):
    with pytest.raises(RunPodError) as ei:
        client.request("POST", "/v2/pods", json={"name": "x", "image": "i", "gpu": {"id": "NVIDIA A40", "count": 0},
                                                 "bogus": 1})
    e = ei.value
    assert e.status_code == 422 and e.errors and not sleeps
    assert "POST /v2/pods -> 422" in str(e)
    assert any("count" in x for x in e.errors) and any("bogus" in x for x in e.errors)


def test_delete_twice_is_fine_and_missing_pod_is_404(emu, client):
    pod = client.create_pod(req(emu))
    client.terminate_pod(pod.id)
    client.terminate_pod(pod.id)  # already gone: fine
    assert client.find_pod(pod.id) is None
    with pytest.raises(RunPodError) as ei:
        client.terminate_pod(pod.id, missing_ok=False)
    assert ei.value.status_code == 404 and pod.id in ei.value.message


def test_lost_stop_reply_is_reconciled_by_reading_the_pod(emu, client):
    pod = client.wait_for_pod(client.create_pod(req(emu)).id, poll=0.05, require_ssh=emu.ssh)
    emu.lose_response("POST", f"/v2/pods/{pod.id}/action", times=1, apply=True)
    assert client.stop_pod(pod.id).status == "EXITED"
    assert len(emu.requests_to("POST", f"/v2/pods/{pod.id}/action")) == 0  # not sent twice (a 409 would say so)


def test_invalid_action_is_409(emu, client):
    pod = client.create_pod(req(emu))
    client.stop_pod(pod.id)
    with pytest.raises(RunPodError) as ei:
        client.restart_pod(pod.id)
    assert ei.value.status_code == 409


def test_stop_of_a_pod_already_stopped_is_success(emu, client):
    """The watchdog may stop the pod while `fab teardown` waits for jobs: teardown's own stop then gets
    a 409 from RunPod, which must read as done, not as an error."""
    pod = client.create_pod(req(emu))
    client.stop_pod(pod.id)
    again = client.stop_pod(pod.id)
    assert again.status == "EXITED"
    assert [x.status for x in emu.requests_to("POST", f"/v2/pods/{pod.id}/action")] == [200, 409]  # sent, 409'd, read as done


def test_bad_key_and_missing_key(emu, monkeypatch):
    with pytest.raises(RunPodError) as ei:
        RunPodClient("rpa_wrong", emu.base_url).list_pods()
    assert ei.value.status_code == 401 and "RUNPOD_API_KEY" in str(ei.value)
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(RunPodError, match="no API key"):
        RunPodClient()
    for k, v in emu.client_env().items():
        monkeypatch.setenv(k, v)
    rp = RunPodClient()
    assert rp.base_url == emu.base_url and rp.list_pods() == [] and "rpa_" not in repr(rp)


def test_catalog_prices_and_availability(emu, client):
    gpus = {g.id: g for g in client.list_gpu_types()}
    assert gpus["NVIDIA A40"].price("SECURE") == 0.40 and gpus["NVIDIA A40"].availability is None
    assert gpus["NVIDIA H100 80GB HBM3"].price("SECURE", 2) == pytest.approx(5.38)
    emu.out_of_capacity("NVIDIA A40")
    a40 = client.get_gpu_type("NVIDIA A40", availability=True, cloud="SECURE")
    assert a40.availability == "NONE" and a40.data_centers == {}
    h100 = client.get_gpu_type(H100[0], availability=True)
    assert h100.availability == "HIGH" and "EU-RO-1" in h100.data_centers


def test_network_volume_is_shared_between_pods(emu, client):
    vol = client.create_network_volume("ultrashape-data", 50, "EU-RO-1")
    assert client.find_network_volumes("ultrashape-data")[0].id == vol.id
    a = client.create_pod(req(emu, name="ultrashape-a40", volume_gb=None, network_volume_id=vol.id))
    b = client.create_pod(req(emu, name="ultrashape-h100", gpu=H100[0], volume_gb=None, network_volume_id=vol.id))
    assert a.network_volume_id == vol.id and a.data_center_id == b.data_center_id == "EU-RO-1"
    assert emu.pod(a.id).workspace == emu.pod(b.id).workspace
    with pytest.raises(RunPodError) as ei:
        client.delete_network_volume(vol.id)
    assert ei.value.status_code == 400
    client.terminate_pod(a.id)
    client.terminate_pod(b.id)
    client.delete_network_volume(vol.id)
    client.delete_network_volume(vol.id)  # idempotent
    assert client.list_network_volumes() == []


def test_billing_follows_the_clock(tmp_path):
    # A frozen clock at a bucket boundary: the figures are exact.
    t0 = 1_780_000_000 - (1_780_000_000 % 86400)
    with RunPodEmulator(tmp_path, Clock(t0, real=False), ssh=False, provision_seconds=0, start_seconds=0) as emu:
        rp = RunPodClient(emu.api_key, emu.base_url, sleep=emu.advance)
        pod = rp.create_pod(PodRequest(name="ultrashape-a40", image="runpod/pytorch:x", gpu_type_id="NVIDIA A40",
                                       disk_gb=50, volume_gb=100))
        emu.advance(2 * 3600)
        rp.stop_pod(pod.id)
        emu.advance(3600)
        rep = rp.pod_billing(pod.id, bucket_size="hour", last_n=4)
        # Four hourly buckets, the last one the current (just begun) hour.
        assert [r.pod_id for r in rep.records] == [pod.id] * 4
        assert rep.records[0].start_time == rep.query["startTime"]
        gpu = [r.amounts["gpuAmount"] for r in rep.records]
        assert gpu == pytest.approx([0.40, 0.40, 0.0, 0.0])
        running_disk = 150 * 0.10 / 730
        stopped_disk = 100 * 0.20 / 730
        assert rep.total_amount == pytest.approx(0.80 + 2 * running_disk + stopped_disk, abs=1e-5)
        assert rp.billing(bucket_size="day", last_n=1).total_amount == pytest.approx(rep.total_amount, abs=1e-5)
        assert emu.spend_usd() == pytest.approx(rep.total_amount, abs=1e-5)
        with pytest.raises(ValueError):
            rp.pod_billing(pod.id, last_n=1, start_time="2026-01-01T00:00:00Z")


def test_catalog_cli_quotes_each_stack(emu, monkeypatch, capsys):
    from infra.catalog import main

    for k, v in emu.client_env().items():
        monkeypatch.setenv(k, v)
    emu.out_of_capacity("NVIDIA H100 80GB HBM3")
    assert main(["--stack", "a40", "--stack", "h100"]) == 0
    out = capsys.readouterr().out
    assert "a40: 1x GPU, SECURE cloud" in out
    import re

    assert re.search(r"NVIDIA A40 +\$0\.40/h +availability HIGH", out)
    assert re.search(r"NVIDIA H100 80GB HBM3 +\$2\.69/h +availability NONE", out)
    assert re.search(r"NVIDIA H100 PCIe +\$2\.39/h +availability HIGH", out)
