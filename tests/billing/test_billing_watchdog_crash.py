"""A crashed watchdog must not leave the pod running forever.

RunPod's API offers no server-side backstop for pods (no TTL, idle timeout or spend cap on a pod), so the
second line of defence is ours: a supervisor that restarts a dead worker and, when the worker keeps dying,
stops the pod itself; a worker that carries on when its supervisor is killed. These tests kill them with
SIGKILL, as the OOM killer would, and watch the emulator's pod. What remains (both killed at once) is tested
too: the pod keeps running and the heartbeat says so.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from infra import watchdog as wd
from tests.billing.watchdog_procs import end_job, log_events, running_pod, spawn, wait_for, worker_pid

pytestmark = pytest.mark.integration


def events(job_dir):
    return [e["event"] for e in log_events(job_dir)]


def test_killed_worker_is_restarted_and_still_stops_the_pod(live_emu, make_pod, tmp_path, procs):
    pod, client = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "train"
    sup = spawn(live_emu, pod.id, job_dir)
    procs.append(sup.pid)
    first = wait_for(lambda: worker_pid(job_dir), what="the first worker")
    procs.append(first)
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: worker_pid(job_dir, other_than=first), what="a restarted worker")
    procs.append(second)
    assert client.get_pod(pod.id).status == "RUNNING"
    t_end = end_job(job_dir)
    wait_for(lambda: live_emu.pod(pod.id).status == "EXITED", what="the pod to stop")
    assert live_emu.pod(pod.id).status_since - t_end < 5.0
    assert sup.wait(timeout=20) == 0
    ev = events(job_dir)
    assert "worker-died" in ev and "resume" in ev and "stopped" in ev
    st = wd.State.load(job_dir / wd.STATE_FILE)
    assert st.restarts == 1 and st.reason == "job-ended"


def test_killed_supervisor_leaves_a_worker_that_still_stops_the_pod(live_emu, make_pod, tmp_path, procs):
    pod, _ = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "train"
    sup = spawn(live_emu, pod.id, job_dir)
    procs.append(sup.pid)
    worker = wait_for(lambda: worker_pid(job_dir), what="the worker")
    procs.append(worker)
    sup.kill()  # SIGKILL: no cleanup, no goodbye
    sup.wait(timeout=10)
    t_end = end_job(job_dir, code=3)
    wait_for(lambda: live_emu.pod(pod.id).status == "EXITED", what="the pod to stop")
    assert live_emu.pod(pod.id).status_since - t_end < 5.0


def test_worker_crash_loop_makes_the_supervisor_stop_the_pod(live_emu, make_pod, tmp_path, procs):
    pod, _ = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "train"
    sup = spawn(live_emu, pod.id, job_dir, "--max-restarts", "1")
    procs.append(sup.pid)
    first = wait_for(lambda: worker_pid(job_dir), what="the first worker")
    procs.append(first)
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: worker_pid(job_dir, other_than=first), what="a restarted worker")
    procs.append(second)
    os.kill(second, signal.SIGKILL)
    # The job is still running and busy, but nobody can watch it: the supervisor stops the pod.
    wait_for(lambda: live_emu.pod(pod.id).status == "EXITED", timeout=30, what="the supervisor's stop")
    assert sup.wait(timeout=20) == 0
    assert "crash-loop" in events(job_dir)
    assert wd.State.load(job_dir / wd.STATE_FILE).reason == "watchdog-crash-loop"


def test_hung_worker_is_killed_and_replaced(live_emu, make_pod, tmp_path, procs):
    """SIGSTOP freezes the worker as a hung sync(2) on a dead network filesystem would: its heartbeat stops,
    the supervisor kills it and starts another, which stops the pod when the job ends."""
    pod, _ = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "train"
    sup = spawn(live_emu, pod.id, job_dir, "--hang-seconds", "2")
    procs.append(sup.pid)
    first = wait_for(lambda: worker_pid(job_dir), what="the worker")
    procs.append(first)
    os.kill(first, signal.SIGSTOP)
    second = wait_for(lambda: worker_pid(job_dir, other_than=first), timeout=30, what="a replacement worker")
    procs.append(second)
    end_job(job_dir)
    wait_for(lambda: live_emu.pod(pod.id).status == "EXITED", what="the pod to stop")
    assert "worker-hung" in events(job_dir)


def test_a_second_start_does_not_double_watch(live_emu, make_pod, tmp_path, procs):
    pod, _ = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "train"
    sup = spawn(live_emu, pod.id, job_dir)
    procs.append(sup.pid)
    procs.append(wait_for(lambda: worker_pid(job_dir), what="the worker"))
    again = spawn(live_emu, pod.id, job_dir)  # `fab train` run twice
    assert again.wait(timeout=20) == 0
    assert sup.poll() is None  # the first one still watches
    end_job(job_dir)
    wait_for(lambda: live_emu.pod(pod.id).status == "EXITED", what="the pod to stop")


def test_what_remains_both_killed_pod_keeps_running_and_heartbeat_says_so(live_emu, make_pod, tmp_path, procs):
    """No server-side backstop exists: with supervisor and worker both killed, only the heartbeat tells."""
    pod, client = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "train"
    sup = spawn(live_emu, pod.id, job_dir)
    procs.append(sup.pid)
    worker = wait_for(lambda: worker_pid(job_dir), what="the worker")
    procs.append(worker)
    text = (job_dir / wd.STATE_FILE).read_text()
    assert wd.health(text).running
    sup.kill()
    os.kill(worker, signal.SIGKILL)
    sup.wait(timeout=10)
    end_job(job_dir)
    time.sleep(1.0)
    assert client.get_pod(pod.id).status == "RUNNING"  # the gap: nothing on RunPod's side stops it
    h = wd.health((job_dir / wd.STATE_FILE).read_text(), now=time.time() + 120)
    assert not h.running and "NOT RUNNING" in h.message and "fab teardown" in h.message


def test_cli_idle_gpu_stops_the_pod(live_emu, make_pod, tmp_path, procs):
    """The command line end to end: --gpu-probe-cmd stands in for nvidia-smi, reporting an idle GPU."""
    pod, _ = running_pod(live_emu, make_pod)
    job_dir = tmp_path / "ws" / "jobs" / "serve"
    sup = spawn(live_emu, pod.id, job_dir, "--idle-minutes", "0.02")  # 1.2 s
    procs.append(sup.pid)
    (job_dir.parent / "gpu_util").write_text("0\n3\n")  # two idle GPUs
    wait_for(lambda: live_emu.pod(pod.id).status == "EXITED", what="the idle stop")
    assert sup.wait(timeout=20) == 0
    assert wd.State.load(job_dir / wd.STATE_FILE).reason == "idle"
