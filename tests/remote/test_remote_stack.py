"""Stack -> target resolution: the selected stack, the pod found by name, refusals to guess."""

from __future__ import annotations

import hashlib
import json

import pytest

from infra.runpod import Pod, PodRequest, RunPodClient
from remote import LocalTarget, TargetError
from remote.stack import PodTarget, default_stack, pulumi_selected_stack, ssh_endpoint, target_for
from remote.target import REPO

emulator = pytest.importorskip("tests.emulator")


def pod_json(**over) -> dict:
    d = {
        "id": "p1", "name": "ultrashape-a40", "status": "RUNNING", "image": "img:1", "cost": 0.4,
        "ssh": {"proxy": None, "direct": {"host": "1.2.3.4", "port": 40022, "username": "root", "command": ""}},
        "runtime": {"ports": [{"private": 22, "public": 40022, "type": "tcp", "ip": "1.2.3.4"}]},
    }
    d.update(over)
    return d


@pytest.mark.unit
def test_remote_ssh_endpoint_agrees_or_refuses():
    assert ssh_endpoint(Pod.from_json(pod_json())) == ("1.2.3.4", 40022)
    # Only the runtime list has it (ssh block not filled yet): use it.
    assert ssh_endpoint(Pod.from_json(pod_json(ssh={"proxy": None, "direct": None}))) == ("1.2.3.4", 40022)
    bad = pod_json(runtime={"ports": [{"private": 22, "public": 41000, "type": "tcp", "ip": "1.2.3.4"}]})
    with pytest.raises(TargetError, match="refusing to be ambiguous.*40022.*41000"):
        ssh_endpoint(Pod.from_json(bad))
    with pytest.raises(TargetError, match="22/tcp"):
        ssh_endpoint(Pod.from_json(pod_json(ssh={"proxy": None, "direct": None}, runtime={"ports": []})))


@pytest.mark.unit
def test_remote_default_stack_from_pulumi_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("ULTRASHAPE_STACK", raising=False)
    monkeypatch.setenv("PULUMI_HOME", str(tmp_path))
    assert pulumi_selected_stack() is None
    assert default_stack() == "local"
    assert isinstance(target_for(None), LocalTarget)
    # What `pulumi stack select h100` writes (pkg/workspace: <project>-<sha1(Pulumi.yaml path)>-workspace.json).
    digest = hashlib.sha1(str(REPO.resolve() / "Pulumi.yaml").encode()).hexdigest()
    (tmp_path / "workspaces").mkdir()
    (tmp_path / "workspaces" / f"ultrashape-{digest}-workspace.json").write_text(json.dumps({"stack": "organization/ultrashape/h100"}))
    assert default_stack() == "h100"
    monkeypatch.setenv("ULTRASHAPE_STACK", "a40")
    assert default_stack() == "a40"


@pytest.mark.integration
def test_remote_pod_target_finds_starts_or_explains(tmp_path, monkeypatch):
    with emulator.RunPodEmulator(tmp_path, ssh=False, provision_seconds=0.05, start_seconds=0.05) as emu:
        rp = RunPodClient(emu.api_key, emu.base_url, sleep=lambda s: None)
        msgs = []
        t = PodTarget("a40", client=rp, log=msgs.append, poll=0.01)  # cheap: nothing contacted yet
        assert not msgs and t.pod is None
        with pytest.raises(TargetError, match="pulumi up --stack a40"):
            t.ensure_running()
        req = PodRequest(name="ultrashape-a40", image="runpod/pytorch:x", gpu_type_id="NVIDIA A40", ports=["22/tcp"])
        pod = rp.create_pod(req)
        rp.wait_for_pod(pod.id, poll=0.01, require_ssh=False)
        rp.stop_pod(pod.id)
        rp.wait_for_pod(pod.id, "EXITED", poll=0.01)
        t2 = PodTarget("a40", client=rp, log=msgs.append, poll=0.01, start=False)
        with pytest.raises(TargetError, match="is stopped"):
            t2.ensure_running()
        # Without SSH in this emulator mode the pod never gets an endpoint: the start is what we check.
        with pytest.raises(TargetError):
            PodTarget("a40", client=rp, log=msgs.append, poll=0.01, wait_timeout=0.3).ensure_running()
        assert any("was stopped: starting it" in m for m in msgs)
        assert rp.get_pod(pod.id).status in ("STARTING", "RUNNING")
        rp.create_pod(req)
        with pytest.raises(TargetError, match="refusing to be ambiguous: 2 pods"):
            PodTarget("a40", client=rp).find_pod()
