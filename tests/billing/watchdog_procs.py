"""Helpers for the tests that run the real watchdog CLI (supervisor + worker processes) against the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from infra import watchdog as wd
from infra.runpod import RunPodClient

ROOT = Path(__file__).resolve().parents[2]


def running_pod(emu, make_pod):
    client = RunPodClient(emu.api_key, emu.base_url)
    return make_pod(emu, client), client


def spawn(emu, pod_id, job_dir: Path, *extra: str) -> subprocess.Popen:
    """`python -m infra.watchdog` on `job_dir` with fast polls and every limit off (extra flags override: the
    last one wins); nvidia-smi is `cat <jobs>/gpu_util` (90 %)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    util = job_dir.parent / "gpu_util"
    if not util.exists():
        util.write_text("90\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ULTRASHAPE_", "RUNPOD_"))}
    env.update(emu.client_env(), RUNPOD_POD_ID=pod_id, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "infra.watchdog", "--job-dir", str(job_dir), "--poll-seconds", "0.2",
           "--idle-minutes", "0", "--max-runtime-hours", "0", "--budget-usd", "0",
           "--gpu-probe-cmd", f"cat {util}", "--flush-timeout-seconds", "5", "--interrupt-grace-seconds", "0", *extra]
    out = open(job_dir.parent / "watchdog.stderr", "ab")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_pid(job_dir: Path, other_than=None):
    """The worker's pid once it has made its first check (None before)."""
    st = wd.State.load(job_dir / wd.STATE_FILE)
    if st and st.worker_pid and st.worker_pid != other_than and st.last_check:
        return st.worker_pid
    return None


def end_job(job_dir: Path, code: int = 0) -> float:
    wd.atomic_write(job_dir / "exit_code", f"{code}\n")
    return time.time()


def log_events(job_dir: Path) -> list[dict]:
    path = job_dir / wd.LOG_FILE
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines()]
