"""infra/stack_config.py: Pulumi.yaml + Pulumi.<stack>.yaml into a typed StackConfig, without Pulumi.

    .venv/bin/python -m pytest tests/infra/test_infra_stack_config.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.stack_config import (
    NETWORK_VOLUME_NAME,
    StackConfigError,
    declarations,
    list_stacks,
    load_stack_config,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


@pytest.fixture
def project(tmp_path):
    """A copy of the real Pulumi.yaml and stack files, to edit."""
    for f in ROOT.glob("Pulumi*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def write_stack(root: Path, stack: str, config: dict) -> None:
    (root / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump({"config": config}))


def test_real_stacks_load():
    assert {"a40", "h100"} <= set(list_stacks())
    a40, h100 = load_stack_config("a40"), load_stack_config("h100")
    assert a40.pod_name == "ultrashape-a40" and h100.pod_name == "ultrashape-h100"
    assert a40.gpu_types[0] == "NVIDIA A40"
    assert h100.gpu_types[:2] == ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"]
    # One image for both, pinned; the shared volume has one name and one data center.
    assert a40.image == h100.image and not a40.image.endswith(":latest")
    assert a40.network_volume == h100.network_volume and a40.network_volume.name == NETWORK_VOLUME_NAME
    assert a40.ports == ["22/tcp", "6006/http", "8000/http"] and a40.http_ports == [6006, 8000]
    assert a40.workspace == "/workspace"
    assert a40.budget_usd < h100.budget_usd


def test_defaults_come_from_pulumi_yaml_only(project):
    write_stack(project, "min", {"ultrashape:gpuTypes": ["NVIDIA A40"], "ultrashape:image": "runpod/pytorch:1"})
    cfg = load_stack_config("min", project)
    d = declarations(project)
    assert cfg.gpu_count == d["gpuCount"]["default"]
    assert cfg.volume_gb == d["volumeGb"]["default"] and cfg.network_volume is None
    assert cfg.ports == d["ports"]["default"]
    assert cfg.autostop_idle_minutes == d["autostopIdleMinutes"]["default"]
    # Changing the default in Pulumi.yaml changes the result: there is no second copy in Python.
    text = (project / "Pulumi.yaml").read_text().replace("default: 30\n", "default: 45\n", 1)
    (project / "Pulumi.yaml").write_text(text)
    assert load_stack_config("min", project).autostop_idle_minutes == 45


def test_every_declared_key_is_described():
    for key, d in declarations().items():
        assert d["type"] in ("string", "integer", "boolean", "array") and len(d["description"]) > 20, key


def test_pulumi_cli_string_values_are_accepted(project):
    write_stack(project, "s", {"ultrashape:gpuTypes": '["NVIDIA A40"]', "ultrashape:gpuCount": "2",
                               "ultrashape:image": "runpod/pytorch:1", "ultrashape:budgetUsd": "30"})
    cfg = load_stack_config("s", project)
    assert (cfg.gpu_types, cfg.gpu_count, cfg.budget_usd) == (["NVIDIA A40"], 2, 30.0)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"ultrashape:gpuType": ["x"]}, r"unknown key 'ultrashape:gpuType' \(did you mean 'ultrashape:gpuTypes'\?\)"),
        ({"ultrashape:gpuCount": "two"}, r"'ultrashape:gpuCount' must be an integer"),
        ({"ultrashape:image": "runpod/pytorch:latest"}, r"must be pinned"),
        ({"ultrashape:ports": ["8000/http"]}, r"must include '22/tcp'"),
        ({"ultrashape:cloudType": "SECURED"}, r"SECURE or COMMUNITY"),
        ({"ultrashape:env": ["WANDB_API_KEY=abc"]}, r"must not set WANDB_API_KEY"),
        ({"ultrashape:env": ["NOEQUALS"]}, r"NAME=value"),
        ({"ultrashape:networkVolumeGb": 50, "ultrashape:dataCenterIds": []}, r"must name a data center"),
        ({"ultrashape:wandbApiKey": "plain-text"}, r"must be a secret.*--secret"),
        ({"aws:region": "us-east-1"}, r"unexpected key 'aws:region'"),
        ({"ultrashape:gpuTypes": []}, r"at least one GPU type"),
    ],
)
def test_bad_values_name_the_file_and_the_fix(project, config, match):
    base = {"ultrashape:gpuTypes": ["NVIDIA A40"], "ultrashape:image": "runpod/pytorch:1"}
    write_stack(project, "bad", {**base, **config})
    with pytest.raises(StackConfigError, match=match) as ei:
        load_stack_config("bad", project)
    assert "Pulumi.bad.yaml" in str(ei.value)


def test_missing_required_key_and_missing_stack(project):
    write_stack(project, "noimg", {"ultrashape:gpuTypes": ["NVIDIA A40"]})
    with pytest.raises(StackConfigError, match=r"missing required key 'ultrashape:image'.*pulumi config set --stack noimg"):
        load_stack_config("noimg", project)
    with pytest.raises(StackConfigError, match=r"no such stack file \(stacks here: .*a40"):
        load_stack_config("nope", project)


def test_secrets_are_noted_not_read(project):
    write_stack(project, "sec", {"ultrashape:gpuTypes": ["NVIDIA A40"], "ultrashape:image": "runpod/pytorch:1",
                                 "runpod:apiKey": {"secure": "v1:abc"}, "ultrashape:wandbApiKey": {"secure": "v1:x"}})
    cfg = load_stack_config("sec", project)
    assert cfg.secrets_set == {"runpod:apiKey", "ultrashape:wandbApiKey"}
    assert "v1:" not in repr(cfg)


def test_public_key_and_pod_env(project, tmp_path):
    write_stack(project, "k", {"ultrashape:gpuTypes": ["NVIDIA A40"], "ultrashape:image": "runpod/pytorch:1",
                               "ultrashape:sshPublicKeyFile": str(tmp_path / "k.pub"),
                               "ultrashape:env": ["HF_HOME=/workspace/hf"]})
    cfg = load_stack_config("k", project)
    with pytest.raises(StackConfigError, match="ssh-keygen -t ed25519"):
        cfg.public_key()
    (tmp_path / "k.pub").write_text("ssh-ed25519 AAAAC3Nz me@studio\n")
    assert cfg.ssh_private_key_file == tmp_path / "k"
    env = cfg.pod_env(cfg.public_key())
    assert env["PUBLIC_KEY"] == "ssh-ed25519 AAAAC3Nz me@studio" and env["HF_HOME"] == "/workspace/hf"
    assert env["ULTRASHAPE_STACK"] == "k" and env["ULTRASHAPE_BUDGET_USD"] == "50"


def test_reading_a_stack_does_not_import_pulumi():
    code = "import sys, infra.stack_config as s; s.load_stack_config('h100'); assert 'pulumi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
