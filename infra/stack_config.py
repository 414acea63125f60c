"""Read a stack's settings (Pulumi.yaml + Pulumi.<stack>.yaml) into a typed object, without Pulumi.

    from infra.stack_config import load_stack_config
    cfg = load_stack_config("h100")          # looks for Pulumi.yaml in the repo root
    cfg.gpu_types, cfg.pod_name, cfg.budget_usd

The Pulumi program (`infra/__main__.py`) and the laptop-side playbooks both go through this module,
so a stack means the same thing to `pulumi up` and to `fab`. Pulumi itself is not imported: the
playbooks run where only the stack files are.

Every key is declared, typed, described and (when optional) defaulted in `Pulumi.yaml`'s `config:`
block, and nowhere else: the dataclass below has no defaults of its own. A key in a stack file that
`Pulumi.yaml` does not declare is an error naming the file, the key and the nearest known key.
Pulumi's own CLI writes values as strings (`pulumi config set ultrashape:gpuCount 2` stores "2"),
so numeric and boolean strings are accepted where the declared type says so.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PROJECT = "ultrashape"  # Pulumi.yaml `name:`; the config namespace of every key below
ROOT = Path(__file__).resolve().parents[1]
# Deterministic names make state recoverable: a pod or volume whose create reply was lost is found
# again by listing under these names (see infra/runpod.py).
POD_NAME_PREFIX = "ultrashape-"
NETWORK_VOLUME_NAME = "ultrashape-data"
WORKSPACE = "/workspace"  # where the pod's volume is mounted; every remote path lives under it
# Secret keys: read by the Pulumi program with get_secret/require_secret, never into the dataclass.
SECRET_KEYS = {"runpod:apiKey", f"{PROJECT}:wandbApiKey", f"{PROJECT}:hfToken"}
# Keys of other namespaces that a stack file may hold (Pulumi's own settings).
FOREIGN_OK = {"runpod:apiKey", "runpod:apiBase"}


class StackConfigError(ValueError):
    """A stack file that does not match the declarations in Pulumi.yaml."""


@dataclass(frozen=True)
class NetworkVolumeConfig:
    name: str  # always NETWORK_VOLUME_NAME: both stacks share it
    size_gb: int
    data_center_id: str  # volumes live in one data center; the pod must be placed there too
    type: Optional[str]  # STANDARD | HIGH_PERFORMANCE | None (the data center's default)


@dataclass(frozen=True)
class StackConfig:
    """One stack's settings. Field docs are the key descriptions in Pulumi.yaml."""

    stack: str
    gpu_types: list[str]
    gpu_count: int
    cloud_type: str
    image: str
    container_disk_gb: int
    volume_gb: int
    network_volume: Optional[NetworkVolumeConfig]
    data_center_ids: list[str]
    min_cuda_version: Optional[str]
    ports: list[str]
    env: dict[str, str]
    ssh_public_key_file: Path
    budget_usd: float
    autostop_idle_minutes: int
    max_runtime_hours: int
    create_timeout_minutes: int
    secrets_set: frozenset[str] = field(default_factory=frozenset)  # secret keys with a value
    source: str = "<values>"

    @property
    def pod_name(self) -> str:
        return POD_NAME_PREFIX + self.stack

    @property
    def workspace(self) -> str:
        return WORKSPACE

    @property
    def ssh_private_key_file(self) -> Path:
        """The private half of ssh_public_key_file (the same path without .pub)."""
        p = self.ssh_public_key_file
        return p.with_suffix("") if p.suffix == ".pub" else p

    @property
    def http_ports(self) -> list[int]:
        return [int(p.split("/")[0]) for p in self.ports if p.endswith("/http")]

    def public_key(self) -> str:
        """The user's SSH public key, which the pod's image installs as authorized_keys."""
        p = self.ssh_public_key_file
        if not p.is_file():
            raise StackConfigError(
                f"{self.source}: ultrashape:sshPublicKeyFile = {str(p)!r} does not exist. Create a key with "
                f"`ssh-keygen -t ed25519` or point the key elsewhere: "
                f"`pulumi config set --stack {self.stack} ultrashape:sshPublicKeyFile ~/.ssh/other.pub`"
            )
        key = p.read_text().strip()
        if not key.startswith(("ssh-", "ecdsa-", "sk-")):
            raise StackConfigError(f"{p}: not an OpenSSH public key (expected 'ssh-ed25519 AAAA...')")
        return key

    def pod_env(self, public_key: str) -> dict[str, str]:
        """The pod's environment, secrets excepted (the program adds those as Pulumi secrets).

        The ULTRASHAPE_* variables let the in-pod watchdog (infra/watchdog.py) enforce this stack's
        budget and autostop even when the laptop is closed."""
        env = dict(self.env)
        env.update(
            {
                "PUBLIC_KEY": public_key,
                "ULTRASHAPE_STACK": self.stack,
                "ULTRASHAPE_BUDGET_USD": f"{self.budget_usd:g}",
                "ULTRASHAPE_AUTOSTOP_IDLE_MINUTES": str(self.autostop_idle_minutes),
                "ULTRASHAPE_MAX_RUNTIME_HOURS": str(self.max_runtime_hours),
            }
        )
        return env


# ------------------------------------------------------------------------------------------------


def project_file(root: Optional[Path] = None) -> Path:
    return Path(root or ROOT) / "Pulumi.yaml"


def stack_file(stack: str, root: Optional[Path] = None) -> Path:
    return Path(root or ROOT) / f"Pulumi.{stack}.yaml"


def list_stacks(root: Optional[Path] = None) -> list[str]:
    """Stacks that have a settings file next to Pulumi.yaml."""
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in Path(root or ROOT).glob("Pulumi.*.yaml"))


def declarations(root: Optional[Path] = None) -> dict[str, dict]:
    """Pulumi.yaml's `config:` block: short key -> {type, description, default?, items?}."""
    path = project_file(root)
    if not path.is_file():
        raise StackConfigError(f"{path}: not found; run from the repository root (where Pulumi.yaml is)")
    data = yaml.safe_load(path.read_text()) or {}
    if data.get("name") != PROJECT:
        raise StackConfigError(f"{path}: project name must be '{PROJECT}', got {data.get('name')!r}")
    decls = data.get("config") or {}
    out = {}
    for key, d in decls.items():
        if not isinstance(d, dict) or "type" not in d or "description" not in d:
            raise StackConfigError(f"{path}: config key '{key}' needs a `type` and a `description`")
        out[key] = d
    return out


def load_stack_config(stack: str, root: Optional[Path] = None) -> StackConfig:
    """Pulumi.<stack>.yaml merged over Pulumi.yaml's defaults, validated."""
    path = stack_file(stack, root)
    if not path.is_file():
        known = ", ".join(list_stacks(root)) or "none"
        raise StackConfigError(f"{path}: no such stack file (stacks here: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StackConfigError(f"{path}: not valid YAML: {e}") from e
    raw = data.get("config") or {}
    if not isinstance(raw, dict):
        raise StackConfigError(f"{path}: `config:` must be a mapping")
    values: dict[str, Any] = {}
    secrets: set[str] = set()
    decls = declarations(root)
    for full_key, value in raw.items():
        ns, _, key = str(full_key).partition(":")
        if full_key in SECRET_KEYS:
            if not (isinstance(value, dict) and set(value) == {"secure"}):
                raise StackConfigError(
                    f"{path}: '{full_key}' must be a secret; set it with `pulumi config set --secret {full_key} ...` "
                    "and never write it in plain text"
                )
            secrets.add(full_key)
            continue
        if ns != PROJECT:
            if full_key in FOREIGN_OK:
                continue
            raise StackConfigError(f"{path}: unexpected key '{full_key}' (this project's keys are '{PROJECT}:<key>')")
        values[key] = value
    return stack_config_from_values(stack, values, decls=decls, secrets=secrets, source=str(path))


def stack_config_from_values(
    stack: str,
    values: dict[str, Any],
    *,
    decls: Optional[dict[str, dict]] = None,
    secrets: Optional[set[str]] = None,
    source: str = "<values>",
    root: Optional[Path] = None,
) -> StackConfig:
    """Build a StackConfig from short-key values (strings as Pulumi's runtime gives them, or typed)."""
    decls = decls if decls is not None else declarations(root)
    for key in values:
        if f"{PROJECT}:{key}" in SECRET_KEYS:
            raise StackConfigError(f"{source}: '{PROJECT}:{key}' is a secret and cannot be read as a plain value")
        if key not in decls:
            near = difflib.get_close_matches(key, list(decls), n=1)
            hint = f" (did you mean '{PROJECT}:{near[0]}'?)" if near else ""
            raise StackConfigError(
                f"{source}: unknown key '{PROJECT}:{key}'{hint}. Keys are declared in Pulumi.yaml: {', '.join(sorted(decls))}"
            )
    v: dict[str, Any] = {}
    for key, d in decls.items():
        if f"{PROJECT}:{key}" in SECRET_KEYS:
            continue  # read as a Pulumi secret by the program, never into this object
        if key in values and values[key] is not None:
            v[key] = _coerce(values[key], d, key, source)
        elif "default" in d:
            v[key] = _coerce(d["default"], d, key, "Pulumi.yaml")
        else:
            raise StackConfigError(
                f"{source}: missing required key '{PROJECT}:{key}' ({d['description'].strip().splitlines()[0]}); "
                f"set it with `pulumi config set --stack {stack} {PROJECT}:{key} <value>`"
            )

    def fail(key: str, msg: str) -> StackConfigError:
        return StackConfigError(f"{source}: '{PROJECT}:{key}' {msg}")

    if not v["gpuTypes"]:
        raise fail("gpuTypes", "must list at least one GPU type id, e.g. [\"NVIDIA A40\"]")
    if v["gpuCount"] < 1:
        raise fail("gpuCount", f"must be >= 1, got {v['gpuCount']}")
    if v["cloudType"] not in ("SECURE", "COMMUNITY"):
        raise fail("cloudType", f"must be SECURE or COMMUNITY, got {v['cloudType']!r}")
    if ":" not in v["image"] or v["image"].endswith(":latest"):
        raise fail("image", f"must be pinned to a tag (e.g. runpod/pytorch:<tag>), got {v['image']!r}")
    for p in v["ports"]:
        num, _, proto = p.partition("/")
        if not num.isdigit() or proto not in ("tcp", "http"):
            raise fail("ports", f"entries look like '22/tcp' or '8000/http', got {p!r}")
    if "22/tcp" not in v["ports"]:
        raise fail("ports", "must include '22/tcp': everything the kit does on a pod goes over direct SSH")
    env: dict[str, str] = {}
    for item in v["env"]:
        name, eq, val = item.partition("=")
        if not eq or not name:
            raise fail("env", f"entries look like 'NAME=value', got {item!r}")
        if name in ("PUBLIC_KEY", "WANDB_API_KEY", "HF_TOKEN", "RUNPOD_API_KEY"):
            raise fail("env", f"must not set {name}: it comes from sshPublicKeyFile or from a secret")
        env[name] = val
    nv = None
    if v["networkVolumeGb"] > 0:
        if not v["dataCenterIds"]:
            raise fail(
                "dataCenterIds",
                "must name a data center when networkVolumeGb > 0: a network volume lives in one data center "
                "and the pod has to be placed there (the first entry is used)",
            )
        if not 10 <= v["networkVolumeGb"] <= 4096:
            raise fail("networkVolumeGb", f"must be 0 (none) or 10..4096 GB, got {v['networkVolumeGb']}")
        nv = NetworkVolumeConfig(
            NETWORK_VOLUME_NAME, v["networkVolumeGb"], v["dataCenterIds"][0], v["networkVolumeType"] or None
        )
    elif v["volumeGb"] and v["volumeGb"] < 10:
        raise fail("volumeGb", f"must be 0 or >= 10 GB (RunPod's floor), got {v['volumeGb']}")
    if v["containerDiskGb"] < 1:
        raise fail("containerDiskGb", "must be >= 1 GB")
    for key in ("budgetUsd", "autostopIdleMinutes", "maxRuntimeHours", "createTimeoutMinutes"):
        if v[key] < 0:
            raise fail(key, f"must be >= 0 (0 turns it off), got {v[key]}")
    return StackConfig(
        stack=stack,
        gpu_types=list(v["gpuTypes"]),
        gpu_count=v["gpuCount"],
        cloud_type=v["cloudType"],
        image=v["image"],
        container_disk_gb=v["containerDiskGb"],
        volume_gb=0 if nv else v["volumeGb"],
        network_volume=nv,
        data_center_ids=list(v["dataCenterIds"]),
        min_cuda_version=v["minCudaVersion"] or None,
        ports=list(v["ports"]),
        env=env,
        ssh_public_key_file=Path(os.path.expanduser(v["sshPublicKeyFile"])),
        budget_usd=float(v["budgetUsd"]),
        autostop_idle_minutes=v["autostopIdleMinutes"],
        max_runtime_hours=v["maxRuntimeHours"],
        create_timeout_minutes=v["createTimeoutMinutes"],
        secrets_set=frozenset(secrets or ()),
        source=source,
    )


def _coerce(value: Any, decl: dict, key: str, source: str) -> Any:
    t = decl["type"]
    where = f"{source}: '{PROJECT}:{key}'"
    if t == "array":
        if isinstance(value, str):  # Pulumi's runtime hands arrays over as JSON text
            try:
                value = json.loads(value)
            except ValueError as e:
                raise StackConfigError(f"{where} must be a list, got {value!r}") from e
        if not isinstance(value, list):
            raise StackConfigError(f"{where} must be a list, got {value!r}")
        item_t = (decl.get("items") or {}).get("type", "string")
        return [_coerce(x, {"type": item_t}, f"{key}[{i}]", source) for i, x in enumerate(value)]
    if t == "integer":
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise StackConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if t == "boolean":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise StackConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if t == "string":
        if isinstance(value, (dict, list)) or value is None:
            raise StackConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise StackConfigError(f"Pulumi.yaml: '{key}' has unsupported type {t!r} (string, integer, boolean, array)")
