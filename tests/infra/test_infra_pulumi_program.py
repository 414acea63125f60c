"""The Pulumi program with each stack's real config file, under pulumi.runtime.set_mocks (no CLI, no cloud).

    .venv/bin/python -m pytest tests/infra/test_infra_pulumi_program.py -q
"""

from __future__ import annotations

import json
import runpy
import subprocess
from pathlib import Path

import pulumi
import pytest
import yaml

from infra.stack_config import load_stack_config

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "infra" / "__main__.py"
FAKE_KEY = "rpa_TESTKEY0123456789"
FAKE_WANDB = "wandb-secret-0123456789"


class Mocks(pulumi.runtime.Mocks):
    """Records every resource; answers as the providers would after a create."""

    def __init__(self):
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(args)
        outs = dict(args.inputs)
        if args.typ.endswith("runpod:Pod"):
            outs.update(podId="pod123", gpuTypeId=args.inputs["gpuTypes"][0], sshHost="203.0.113.7",
                        sshPort=40022, publicIp="203.0.113.7", sshCommand="ssh root@203.0.113.7 -p 40022",
                        tensorboardUrl="https://pod123-6006.proxy.runpod.net",
                        apiUrl="https://pod123-8000.proxy.runpod.net", costPerHr=2.69, dataCenterId="EU-RO-1",
                        status="RUNNING", sshUser="root")
            return "pod123", outs
        if args.typ.endswith("runpod:NetworkVolume"):
            outs.update(volumeId="vol123", volumeType="STANDARD", adopted=False)
            return "vol123", outs
        return args.name + "_id", outs

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


def _stack_values(stack: str) -> dict[str, str]:
    """The stack file's config as Pulumi's runtime hands it to a program: strings, arrays as JSON."""
    data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in data.items()}


@pytest.fixture
def home_with_key(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@studio", "-f",
                    str(home / ".ssh" / "id_ed25519")], check=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.delenv("RUNPOD_API_BASE", raising=False)
    return home


def run_program(stack: str, extra: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                preview: bool = False):
    mocks = Mocks()
    config = {**_stack_values(stack), **(extra or {})}
    secrets = {"runpod:apiKey": FAKE_KEY, "ultrashape:wandbApiKey": FAKE_WANDB} if secrets is None else secrets
    config.update(secrets)
    pulumi.runtime.set_all_config(config, secret_keys=list(secrets))
    pulumi.runtime.set_mocks(mocks, project="ultrashape", stack=stack, preview=preview)
    ns = runpy.run_path(str(PROGRAM), run_name="__main__")
    # Registration is asynchronous: settle every output (hence every resource) before looking.
    for v in ns["outputs"].values():
        resolve(v)
    return mocks, ns


def resolve(value):
    """(value, is_secret) of an Output (or a plain value) once the mocked engine has settled it."""
    from pulumi.runtime.sync_await import _sync_await

    o = pulumi.Output.from_input(value)
    return _sync_await(o.future()), _sync_await(o.is_secret())


def _secret_value(v):
    """The plain value of an engine-level secret; fails if `v` is not marked secret."""
    from pulumi.runtime import rpc

    assert isinstance(v, dict) and v.get(rpc._special_sig_key) == rpc._special_secret_sig, f"not a secret: {v!r}"
    return v["value"]


def _resource(mocks: Mocks, suffix: str):
    found = [r for r in mocks.resources if r.typ.endswith(suffix)]
    assert len(found) == 1, [r.typ for r in mocks.resources]
    return found[0]


@pytest.mark.unit
@pytest.mark.parametrize("stack", ["a40", "h100"])
def test_stack_declares_pod_and_shared_volume(stack, home_with_key):
    cfg = load_stack_config(stack)
    mocks, ns = run_program(stack)
    pod = _resource(mocks, "runpod:Pod")
    vol = _resource(mocks, "runpod:NetworkVolume")
    inputs = pod.inputs
    # Inputs come from the real stack file, through the same reader the playbooks use.
    assert inputs["name"] == f"ultrashape-{stack}"
    assert inputs["gpuTypes"] == cfg.gpu_types
    assert inputs["gpuCount"] == cfg.gpu_count == 1
    assert inputs["cloudType"] == "SECURE"
    assert inputs["image"] == cfg.image and ":" in inputs["image"] and not inputs["image"].endswith(":latest")
    assert inputs["image"].startswith("runpod/pytorch:")
    assert inputs["containerDiskGb"] == cfg.container_disk_gb
    assert inputs["ports"] == ["22/tcp", "6006/http", "8000/http"]
    assert inputs["volumeMountPath"] == "/workspace"
    assert inputs["minCudaVersion"] == "12.8"
    # The shared volume: same deterministic name in both stacks, its data center pins the pod.
    assert vol.inputs["name"] == "ultrashape-data"
    assert inputs["networkVolumeId"] == "vol123"
    assert inputs["volumeGb"] == 0  # a pod has one kind of volume
    assert inputs["dataCenterIds"] == [vol.inputs["dataCenterId"]]
    # The pod's env: the user's public key, the watchdog's settings, the volume id, the W&B secret.
    env, env_secret = resolve(ns["pod"].env)
    assert env_secret
    pub = (home_with_key / ".ssh" / "id_ed25519.pub").read_text().strip()
    assert env["PUBLIC_KEY"] == pub
    assert env["ULTRASHAPE_STACK"] == stack
    assert env["ULTRASHAPE_BUDGET_USD"] == f"{cfg.budget_usd:g}"
    assert env["ULTRASHAPE_AUTOSTOP_IDLE_MINUTES"] == str(cfg.autostop_idle_minutes)
    assert env["ULTRASHAPE_MAX_RUNTIME_HOURS"] == str(cfg.max_runtime_hours)
    assert env["ULTRASHAPE_NETWORK_VOLUME_ID"] == "vol123"
    assert env["WANDB_API_KEY"] == FAKE_WANDB
    assert "HF_TOKEN" not in env  # not set: not sent
    # Secrets reach the engine wrapped as secrets (so state encrypts them), never as plain values.
    assert _secret_value(inputs["apiKey"]) == FAKE_KEY
    assert _secret_value(inputs["env"])["WANDB_API_KEY"] == FAKE_WANDB
    assert _secret_value(vol.inputs["apiKey"]) == FAKE_KEY
    plain = {k: v for k, v in inputs.items() if k not in ("apiKey", "env", "__provider")}
    assert FAKE_KEY not in json.dumps(plain) and FAKE_WANDB not in json.dumps(plain)


@pytest.mark.unit
@pytest.mark.parametrize("stack", ["a40", "h100"])
def test_outputs_and_secrets(stack, home_with_key):
    mocks, ns = run_program(stack)
    outs = {k: resolve(v) for k, v in ns["outputs"].items()}
    assert outs["podId"] == ("pod123", False)
    assert outs["podName"][0] == f"ultrashape-{stack}"
    assert outs["sshHost"][0] == "203.0.113.7" and outs["sshPort"][0] == 40022
    assert outs["sshCommand"][0].startswith("ssh root@203.0.113.7 -p 40022 -i ")
    assert outs["sshCommand"][0].endswith(str(home_with_key / ".ssh" / "id_ed25519"))
    assert outs["tensorboardUrl"][0] == "https://pod123-6006.proxy.runpod.net"
    assert outs["apiUrl"][0] == "https://pod123-8000.proxy.runpod.net"
    assert outs["costPerHr"][0] == 2.69
    assert outs["networkVolumeId"][0] == "vol123"
    # No output leaks a secret, and the secret-bearing properties are secret.
    for k, (v, secret) in outs.items():
        assert FAKE_KEY not in json.dumps(v, default=str) and FAKE_WANDB not in json.dumps(v, default=str), k
    assert resolve(ns["pod"].apiKey) == (FAKE_KEY, True)
    assert resolve(ns["pod"].env)[1] is True
    assert resolve(ns["volume"].apiKey) == (FAKE_KEY, True)


@pytest.mark.unit
def test_without_config_key_uses_environment_and_keeps_it_out_of_state(home_with_key, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_FROM_ENV")
    mocks, ns = run_program("a40", secrets={})
    pod = _resource(mocks, "runpod:Pod")
    assert not pod.inputs.get("apiKey")
    assert "rpa_FROM_ENV" not in json.dumps(pod.inputs, default=str)
    env, _ = resolve(ns["pod"].env)
    assert "WANDB_API_KEY" not in env


@pytest.mark.unit
def test_no_api_key_anywhere_fails_with_the_fix(home_with_key):
    with pytest.raises(Exception, match="pulumi config set --stack a40 --secret runpod:apiKey"):
        run_program("a40", secrets={})


@pytest.mark.unit
def test_host_local_volume_when_network_volume_is_off(home_with_key):
    mocks, ns = run_program("a40", extra={"ultrashape:networkVolumeGb": "0", "ultrashape:dataCenterIds": "[]"})
    assert not [r for r in mocks.resources if r.typ.endswith("runpod:NetworkVolume")]
    pod = _resource(mocks, "runpod:Pod")
    assert pod.inputs["volumeGb"] == 100  # Pulumi.yaml's default
    assert not pod.inputs.get("networkVolumeId")
    assert pod.inputs["dataCenterIds"] == []


@pytest.mark.unit
def test_misspelt_key_is_refused_with_a_suggestion(home_with_key):
    with pytest.raises(Exception, match=r"unknown key 'ultrashape:gpuType'.*did you mean 'ultrashape:gpuTypes'"):
        run_program("a40", extra={"ultrashape:gpuType": "[\"NVIDIA A40\"]"})


@pytest.mark.unit
def test_preview_declares_the_same_resources(home_with_key):
    mocks, ns = run_program("h100", preview=True)
    assert sorted(r.typ.rsplit(":", 1)[-1] for r in mocks.resources) == ["NetworkVolume", "Pod"]
    assert _resource(mocks, "runpod:Pod").inputs["gpuTypes"][0] == "NVIDIA H100 80GB HBM3"
