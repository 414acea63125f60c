"""The Pulumi program: one stack = one RunPod GPU pod (+ the shared network volume, if configured).

    pulumi config set --stack a40 --secret runpod:apiKey <key>   # or: export RUNPOD_API_KEY=<key>
    pulumi up --stack a40                                        # or h100
    pulumi stack output --stack a40 sshCommand
    pulumi destroy --stack a40                                   # the pod goes; the network volume stays

Every setting comes from Pulumi.yaml (declarations and defaults) and Pulumi.<stack>.yaml, read
through infra/stack_config.py, the same reader the `fab` playbooks use.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Pulumi runs this file with infra/ as the program directory; the package lives one level up.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pulumi  # noqa: E402

from infra.resources import NetworkVolume, NetworkVolumeArgs, Pod, PodArgs  # noqa: E402
from infra.stack_config import (  # noqa: E402
    PROJECT,
    SECRET_KEYS,
    StackConfigError,
    declarations,
    stack_config_from_values,
)

stack = pulumi.get_stack()
project_cfg = pulumi.Config(PROJECT)
runpod_cfg = pulumi.Config("runpod")

# Plain keys: whatever Pulumi.yaml declares, as the runtime hands them over (strings; arrays as JSON).
decls = declarations(_ROOT)
values = {}
for key in decls:
    if f"{PROJECT}:{key}" in SECRET_KEYS:
        continue
    raw = project_cfg.get(key)
    if raw is not None:
        values[key] = raw
# Keys Pulumi.yaml does not declare (a typo such as `ultrashape:gpuType`) are errors, not ignored:
# hand them to the reader, which names the nearest known key.
for full_key in set(pulumi.runtime.config.CONFIG.get()) | set(pulumi.runtime.config.get_config_env()):
    ns, _, key = full_key.partition(":")
    if ns == PROJECT and key not in decls and full_key not in SECRET_KEYS:
        values[key] = project_cfg.get(key)
try:
    cfg = stack_config_from_values(stack, values, decls=decls, source=f"Pulumi.{stack}.yaml")
    public_key = cfg.public_key()
except StackConfigError as e:
    raise pulumi.RunError(str(e)) from e

# The API key: the `runpod:apiKey` secret, else RUNPOD_API_KEY in the provider's environment. The
# environment variable is never copied into state.
api_key = runpod_cfg.get_secret("apiKey")
if api_key is None and not os.environ.get("RUNPOD_API_KEY"):
    raise pulumi.RunError(
        "no RunPod API key: `pulumi config set --stack "
        f"{stack} --secret runpod:apiKey <key>` (or export RUNPOD_API_KEY); create a key at "
        "https://www.runpod.io/console/user/settings"
    )
api_base = runpod_cfg.get("apiBase") or os.environ.get("RUNPOD_API_BASE") or None

volume = None
if cfg.network_volume is not None:
    nv = cfg.network_volume
    volume = NetworkVolume(
        "data",
        NetworkVolumeArgs(name=nv.name, size_gb=nv.size_gb, data_center_id=nv.data_center_id, type=nv.type,
                          api_key=api_key, api_base=api_base),
        # Shared by every stack, and it holds the processed data: `pulumi destroy` leaves it alone.
        opts=pulumi.ResourceOptions(retain_on_delete=True),
    )

# The pod's environment. It is a secret as a whole because it may carry the W&B / HF tokens.
secret_env = {"WANDB_API_KEY": project_cfg.get_secret("wandbApiKey"), "HF_TOKEN": project_cfg.get_secret("hfToken")}
base_env = cfg.pod_env(public_key)


def _env(args: list) -> dict:
    volume_id, *secrets = args
    env = dict(base_env)
    if volume_id:
        env["ULTRASHAPE_NETWORK_VOLUME_ID"] = volume_id  # the watchdog bills the volume too
    for name, value in zip(secret_env, secrets):
        if value:
            env[name] = value
    return env


env = pulumi.Output.secret(
    pulumi.Output.all(volume.volume_id if volume else None, *secret_env.values()).apply(_env)
)

pod = Pod(
    "pod",
    PodArgs(
        name=cfg.pod_name,
        gpu_types=cfg.gpu_types,
        gpu_count=cfg.gpu_count,
        cloud_type=cfg.cloud_type,
        image=cfg.image,
        container_disk_gb=cfg.container_disk_gb,
        volume_gb=cfg.volume_gb,
        network_volume_id=volume.volume_id if volume else None,
        ports=cfg.ports,
        env=env,
        data_center_ids=[cfg.network_volume.data_center_id] if cfg.network_volume else cfg.data_center_ids,
        min_cuda_version=cfg.min_cuda_version,
        volume_mount_path=cfg.workspace,
        create_timeout_seconds=cfg.create_timeout_minutes * 60,
        api_key=api_key,
        api_base=api_base,
    ),
    opts=pulumi.ResourceOptions(
        # Pulumi's own deadline sits above the provider's wait, so the provider can clean up first.
        custom_timeouts=pulumi.CustomTimeouts(create=f"{cfg.create_timeout_minutes + 10}m"),
    ),
)

outputs = {
    "podId": pod.pod_id,
    "podName": cfg.pod_name,
    "gpuType": pod.gpu_type_id,
    "gpuCount": cfg.gpu_count,
    "dataCenterId": pod.data_center_id,
    "publicIp": pod.public_ip,
    "sshHost": pod.ssh_host,
    "sshPort": pod.ssh_port,
    "sshCommand": pod.ssh_command.apply(lambda c: f"{c} -i {cfg.ssh_private_key_file}" if c else c),
    "tensorboardUrl": pod.tensorboard_url,
    "apiUrl": pod.api_url,
    "costPerHr": pod.cost_per_hr,
    "networkVolumeId": volume.volume_id if volume else None,
    "budgetUsd": cfg.budget_usd,
    "autostopIdleMinutes": cfg.autostop_idle_minutes,
    "maxRuntimeHours": cfg.max_runtime_hours,
    "config": json.dumps({"gpuTypes": cfg.gpu_types, "image": cfg.image, "cloudType": cfg.cloud_type}),
}
for _k, _v in outputs.items():
    pulumi.export(_k, _v)
