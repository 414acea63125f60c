"""The watchdog where it really runs: inside a pod (an emulated pod is a real sshd in its own PID and mount
namespaces, with /workspace and the pod's RUNPOD_* environment), started over SSH with --daemon as the
playbooks start it. The pod stops itself from the inside, after the job's last checkpoint is on the volume."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.runpod import PodRequest, RunPodClient

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# A job that ends while its checkpoint writer is still busy: the trainer's atomic write (temp file, then
# rename) of 2 MB takes ~2 s after exit_code appears. Stopping the pod at once would lose it.
JOB = r"""
set -e
mkdir -p /workspace/outputs/run1/checkpoints /workspace/jobs/train
ck=/workspace/outputs/run1/checkpoints
( for i in $(seq 1 20); do head -c 100000 /dev/urandom >> $ck/step_0000100.pt.tmp; sleep 0.1; done
  mv $ck/step_0000100.pt.tmp $ck/step_0000100.pt ) >/dev/null 2>&1 < /dev/null &
sleep 0.3
echo 0 > /workspace/jobs/train/exit_code.tmp && mv /workspace/jobs/train/exit_code.tmp /workspace/jobs/train/exit_code
"""


def ssh(emu, pod_id, command, timeout=60):
    return subprocess.run(emu.ssh_command(pod_id) + [command], capture_output=True, text=True, timeout=timeout)


def test_daemon_in_pod_stops_its_own_pod_after_the_checkpoint_lands(tmp_path):
    from tests.emulator import RunPodEmulator, ssh_supported

    ok, why = ssh_supported()
    if not ok:
        pytest.skip(why)
    with RunPodEmulator(tmp_path, ssh=True) as emu:
        client = RunPodClient(emu.api_key, emu.base_url)
        pod = client.create_pod(PodRequest(name="ultrashape-a40", image="runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                                           gpu_type_id="NVIDIA A40", volume_gb=20, ports=["22/tcp"],
                                           env={"PUBLIC_KEY": emu.public_key, "ULTRASHAPE_STACK": "a40",
                                                "ULTRASHAPE_AUTOSTOP_IDLE_MINUTES": "0",
                                                "ULTRASHAPE_MAX_RUNTIME_HOURS": "0", "ULTRASHAPE_BUDGET_USD": "0"}))
        client.wait_for_pod(pod.id, poll=0.1, timeout=30)
        # As `fab train` does: from the workspace root, the kit's python, everything else from the pod's env
        # (RUNPOD_POD_ID, RUNPOD_API_KEY, RUNPOD_API_BASE, ULTRASHAPE_*). nvidia-smi is replaced by `echo`.
        start = (f"mkdir -p /workspace/jobs/train && cd /workspace && PYTHONPATH={shlex.quote(str(ROOT))} "
                 f"{shlex.quote(sys.executable)} -m infra.watchdog --daemon --stack '' --poll-seconds 0.3 "
                 f"--gpu-probe-cmd 'echo 93' --flush-timeout-seconds 30")
        r = ssh(emu, pod.id, start)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().isdigit(), r.stdout  # the supervisor's pid, and the SSH command returned
        ws = emu.pod(pod.id).workspace
        deadline = time.monotonic() + 20
        while not (ws / "jobs" / "train" / "watchdog.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert emu.pod(pod.id).status == "RUNNING"
        r = ssh(emu, pod.id, JOB)
        assert r.returncode == 0, r.stderr
        exit_at = (ws / "jobs" / "train" / "exit_code").stat().st_mtime
        deadline = time.monotonic() + 30
        while emu.pod(pod.id).status != "EXITED" and time.monotonic() < deadline:
            time.sleep(0.1)
        p = emu.pod(pod.id)
        assert p.status == "EXITED", (ws / "jobs" / "train" / "watchdog.log").read_text()[-2000:]
        # within the window: the checkpoint write (~2 s) + one poll + the stop call
        assert p.status_since - exit_at < 6.0
        ck = ws / "outputs" / "run1" / "checkpoints"
        assert (ck / "step_0000100.pt").stat().st_size == 2_000_000
        assert not (ck / "step_0000100.pt.tmp").exists()
        log = (ws / "jobs" / "train" / "watchdog.log").read_text()
        assert '"flush-wait"' in log and '"reason": "job-ended"' in log
        # stop, not terminate: the volume and the pod are still there; starting it again works
        assert client.get_pod(pod.id).status == "EXITED"
        client.start_pod(pod.id)
        client.wait_for_pod(pod.id, poll=0.1, timeout=30)
        assert ssh(emu, pod.id, "cat /workspace/jobs/train/exit_code").stdout.strip() == "0"
