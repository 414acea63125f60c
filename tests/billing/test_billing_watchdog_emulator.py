"""The watchdog against the RunPod emulator with a controllable clock: every stop condition ends with the
pod EXITED (stopped, volume kept), and API failures delay the stop but never abandon it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infra import watchdog as wd

pytestmark = pytest.mark.integration


class ScriptedJob:
    """A job seen from the watchdog's side: GPU utilisation over (emulator) time, then an exit_code.

    It is the watchdog's GPU probe, so it runs once per poll, when the watchdog looks."""

    def __init__(self, emu, job_dir, *, busy_until=None, exit_at=None, exit_code=0, util=95):
        self.emu, self.job_dir = emu, job_dir
        self.t0 = emu.clock.now()
        self.busy_until, self.exit_at, self.code, self.util = busy_until, exit_at, exit_code, util
        self.exit_written_at = None

    def __call__(self):
        t = self.emu.clock.now() - self.t0
        if self.exit_at is not None and t >= self.exit_at and self.exit_written_at is None:
            wd.atomic_write(self.job_dir / "exit_code", f"{self.code}\n")
            self.exit_written_at = self.emu.clock.now()
        busy = self.busy_until is None or t < self.busy_until
        return [self.util if busy else 0]


def events(job_dir):
    return [json.loads(x) for x in (job_dir / wd.LOG_FILE).read_text().splitlines()]


def test_job_end_stops_pod_within_one_poll(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "workspace" / "jobs" / "train"
    job_dir.mkdir(parents=True)
    job = ScriptedJob(emu, job_dir, exit_at=45 * 60, exit_code=1)  # a failed job stops the pod too
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=30, max_runtime_hours=0, poll_s=30)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=job, echo=lambda _: None)
    assert w.run() == "job-ended"
    p = emu.pod(pod.id)
    assert p.status == "EXITED"
    ev = events(job_dir)
    stopped = [e for e in ev if e["event"] == "stopped"][0]
    # The exit appeared during one poll; the stop followed at the next one.
    assert -0.01 <= stopped["t"] - job.exit_written_at <= s.poll_s + 1
    decision = [e for e in ev if e["event"] == "decision"][0]
    assert decision["reason"] == "job-ended" and "exit code 1" in decision["detail"]
    assert [e["event"] for e in ev].count("check") >= 90  # it logged every check, not just the last
    st = wd.State.load(job_dir / wd.STATE_FILE)
    assert st.outcome == "stopped" and st.reason == "job-ended"
    # stop, not terminate: the pod is still listed and can be started again
    assert client.get_pod(pod.id).status == "EXITED" and "start" in client.get_pod(pod.id).actions


def test_stale_exit_code_of_previous_run_is_not_this_jobs_end(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "workspace" / "jobs" / "train"
    job_dir.mkdir(parents=True)
    (job_dir / "exit_code").write_text("0\n")  # yesterday's run
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, poll_s=10)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [90], echo=lambda _: None)
    assert not w.check().stop  # the new job is about to start (remote/jobs.py removes the old exit_code)
    (job_dir / "exit_code").unlink()
    emu.advance(300)
    assert not w.check().stop
    wd.atomic_write(job_dir / "exit_code", "0\n")  # the new run ends
    assert w.check().reason == "job-ended"


def test_stale_exit_code_and_no_new_job_stops_after_grace(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "workspace" / "jobs" / "train"
    job_dir.mkdir(parents=True)
    (job_dir / "exit_code").write_text("0\n")
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, poll_s=30,
                    start_grace_s=120)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [0], echo=lambda _: None)
    assert w.run() == "job-ended"
    assert emu.pod(pod.id).status == "EXITED"
    stop_t = [e for e in events(job_dir) if e["event"] == "stopped"][0]["t"]
    assert 120 <= stop_t - w.st.started_at <= 120 + 30 + 1


def test_idle_gpu_stops_pod_after_idle_minutes(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "workspace" / "jobs" / "train"
    job_dir.mkdir(parents=True)
    job = ScriptedJob(emu, job_dir, busy_until=20 * 60)  # hangs after 20 min: GPU at 0 %, no exit
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=10, max_runtime_hours=0, poll_s=30,
                    interrupt_grace_s=0)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=job, echo=lambda _: None)
    assert w.run() == "idle"
    assert emu.pod(pod.id).status == "EXITED"
    ev = events(job_dir)
    stopped_t = [e for e in ev if e["event"] == "stopped"][0]["t"]
    idle_from = job.t0 + 20 * 60
    assert 10 * 60 <= stopped_t - idle_from <= 10 * 60 + 2 * s.poll_s
    # while busy, every check said ok
    assert all(e["decision"] == "ok" for e in ev if e["event"] == "check" and e["t"] < idle_from)


def test_busy_gpu_is_never_stopped_for_idleness(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "j"
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=5, max_runtime_hours=0, poll_s=60)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [0, 71],
                    echo=lambda _: None)
    for _ in range(120):  # two hours of checks
        assert not w.check().stop
        emu.advance(60)
    assert emu.pod(pod.id).status == "RUNNING"


def test_budget_crossed_stops_pod_before_spend_passes_it(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    emu.advance(2 * 3600)  # an earlier session of this stack: about $5.40 billed
    billed_before = emu.spend_usd()
    assert 5.3 < billed_before < 5.5
    job_dir = tmp_path / "workspace" / "jobs" / "train"
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, budget_usd=8, poll_s=30,
                    interrupt_grace_s=0)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    assert w.run() == "budget"
    assert emu.pod(pod.id).status == "EXITED"
    spent = emu.spend_usd()
    assert spent <= 8.0, spent  # stopped before the cap, not after
    assert spent > 8.0 - 2.69 * (2 * s.poll_s + 60) / 3600 - 0.05, spent  # and not much earlier
    ev = events(job_dir)
    base = [e for e in ev if e["event"] == "billing-baseline"][0]
    assert base["billed_usd"] == pytest.approx(billed_before, abs=0.01)  # from /v2/billing/pods
    # the pod stays stopped: no billing for GPU time after the stop
    emu.advance(5 * 3600)
    assert emu.spend_usd() - spent < 0.01


def test_budget_already_spent_stops_at_once(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    emu.advance(4 * 3600)  # ~$10.8 billed
    s = wd.Settings(job_dir=tmp_path / "j", pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, budget_usd=10,
                    poll_s=30, interrupt_grace_s=0)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    t0 = emu.clock.now()
    assert w.run() == "budget"
    assert emu.clock.now() - t0 < 60


def test_max_runtime_stops_a_busy_pod(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    s = wd.Settings(job_dir=tmp_path / "j", pod_id=pod.id, idle_minutes=0, max_runtime_hours=1, poll_s=30,
                    interrupt_grace_s=0)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    t0 = emu.clock.now()
    assert w.run() == "max-runtime"
    assert emu.pod(pod.id).status == "EXITED"
    assert 3600 <= emu.clock.now() - t0 <= 3600 + 60


def test_max_runtime_counts_pod_uptime_before_the_watchdog(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    emu.advance(50 * 60)  # the pod has been up 50 minutes when this job starts
    s = wd.Settings(job_dir=tmp_path / "j", pod_id=pod.id, idle_minutes=0, max_runtime_hours=1, poll_s=30,
                    interrupt_grace_s=0)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    t0 = emu.clock.now()
    assert w.run() == "max-runtime"
    assert 10 * 60 - 1 <= emu.clock.now() - t0 <= 10 * 60 + 60


def test_api_errors_delay_the_stop_but_never_abandon_it(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "j"
    job_dir.mkdir()
    (job_dir / "exit_code.new").write_text("0\n")
    # Every pod call fails for a while: 500s on the action, 503s and a 429 on reads.
    emu.inject(500, method="POST", path=f"/v2/pods/{pod.id}/action", times=12)
    emu.inject(503, method="GET", path=f"/v2/pods/{pod.id}", times=20)
    emu.inject(429, method="*", path="/v2/pods/*", times=3, retry_after=7)
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, poll_s=30)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    os.replace(job_dir / "exit_code.new", job_dir / "exit_code")
    w.st.stale_exit_mtime = None  # written after start, as a job would
    assert w.run() == "job-ended"
    assert emu.pod(pod.id).status == "EXITED"
    ev = events(job_dir)
    failed = [e for e in ev if e["event"] == "stop-failed"]
    assert failed and all("STILL RUNNING" in e["note"] for e in failed)
    assert any(e["event"] == "stopped" for e in ev)


def test_auth_failure_keeps_retrying_loudly(frozen_pod, tmp_path, bounded_sleep):
    """A revoked key: the watchdog cannot stop the pod. It must not exit as if it had; it keeps trying, with a
    'STILL RUNNING' line per attempt, and succeeds as soon as the API lets it."""
    emu, client, pod = frozen_pod
    emu.inject(401, method="*", path=f"/v2/pods/{pod.id}*", times=40)
    s = wd.Settings(job_dir=tmp_path / "j", pod_id=pod.id, idle_minutes=0, max_runtime_hours=0.01, poll_s=5,
                    interrupt_grace_s=0, stop_backoff_max_s=120)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    assert w.run() == "max-runtime"
    assert emu.pod(pod.id).status == "EXITED"
    failed = [e for e in events(tmp_path / "j") if e["event"] == "stop-failed"]
    assert len(failed) >= 10 and all(e["status_code"] == 401 for e in failed)
    st = wd.State.load(tmp_path / "j" / wd.STATE_FILE)
    assert st.outcome == "stopped"


def test_pod_stopped_by_someone_else_ends_the_watch(frozen_pod, tmp_path, bounded_sleep):
    emu, client, pod = frozen_pod
    s = wd.Settings(job_dir=tmp_path / "j", pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, poll_s=30,
                    pod_refresh_s=60)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99], echo=lambda _: None)
    client.stop_pod(pod.id)  # `fab teardown` from the laptop
    assert w.run() == "already-stopped"


def test_checkpoint_write_in_flight_is_waited_for(frozen_pod, tmp_path):
    """The stop waits for a temp file still growing (an atomic checkpoint write) to be renamed into place."""
    emu, client, pod = frozen_pod
    ws = tmp_path / "workspace"
    job_dir = ws / "jobs" / "train"
    out = ws / "outputs" / "run1" / "checkpoints"
    out.mkdir(parents=True)
    job_dir.mkdir(parents=True)
    tmp = out / "step_0001000.pt.tmp"
    tmp.write_bytes(b"x" * 1000)
    renames = []

    def sleep(seconds):  # the trainer finishes its write while the watchdog waits
        emu.advance(seconds)
        if tmp.exists() and len([e for e in events(job_dir) if e["event"] == "flush-wait"]) == 1:
            os.replace(tmp, out / "step_0001000.pt")
            renames.append(emu.clock.now())

    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, poll_s=30)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=sleep, gpu_probe=lambda: [99], echo=lambda _: None)
    wd.atomic_write(job_dir / "exit_code", "0\n")
    w.st.stale_exit_mtime = None
    assert w.run() == "job-ended"
    ev = [e["event"] for e in events(job_dir)]
    assert ev.index("flush-wait") < ev.index("flushed") < ev.index("stopped")
    assert renames and (out / "step_0001000.pt").stat().st_size == 1000


def test_cpu_pod_without_nvidia_smi_still_stops_on_job_end(frozen_emu, make_pod, tmp_path, bounded_sleep):
    from infra.runpod import RunPodClient

    client = RunPodClient(frozen_emu.api_key, frozen_emu.base_url, sleep=frozen_emu.advance)
    pod = make_pod(frozen_emu, client, gpu="NVIDIA A40", name="ultrashape-a40")
    job_dir = tmp_path / "j"
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=1, max_runtime_hours=0, poll_s=30,
                    gpu_probe_cmd=str(tmp_path / "no-such-nvidia-smi"))
    w = wd.Watchdog(s, client, clock=frozen_emu.clock.now, sleep=bounded_sleep(frozen_emu), echo=lambda _: None)
    for _ in range(10):  # 5 minutes with no GPU reading: never "idle"
        assert not w.check().stop
        frozen_emu.advance(30)
    assert any(e["event"] == "gpu-unknown" for e in events(job_dir))
    wd.atomic_write(job_dir / "exit_code", "0\n")
    assert w.check().reason == "job-ended"


def test_state_left_by_a_killed_session_is_not_resumed(frozen_pod, tmp_path, bounded_sleep):
    """`fab teardown` kills the watchdog with the container, leaving outcome 'watching' in its state. The next
    session's watchdog must start afresh: an old start time would mean an instant max-runtime stop."""
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "j"
    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=2, poll_s=30)
    old = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99],
                      echo=lambda _: None, session="monday")
    assert not old.check().stop
    client.stop_pod(pod.id)  # teardown: the old watchdog dies with the container, mid-watch
    emu.advance(3 * 3600)
    client.start_pod(pod.id)
    emu.wait_running(pod.id)
    new = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99],
                      echo=lambda _: None, session="tuesday")
    assert new.st.started_at == emu.clock.now() and new.st.restarts == 0
    assert not new.check().stop
    # ...while a worker restarted by the same supervisor does resume
    again = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=lambda: [99],
                        echo=lambda _: None, session="tuesday")
    assert again.st.started_at == new.st.started_at and again.st.restarts == 1


def test_budget_stop_interrupts_a_running_tmux_job_which_checkpoints_first(frozen_pod, tmp_path):
    """A stop for money or time interrupts a job still running (Ctrl-C into its tmux session, as remote/jobs.py
    started it); the job's last checkpoint is on disk before the pod stops."""
    import shutil
    import time

    from remote import jobs
    from remote.target import LocalTarget

    if not shutil.which("tmux"):
        pytest.skip("tmux not installed (make sysdeps)")
    emu, client, pod = frozen_pod
    t = LocalTarget(root=tmp_path / "ws")
    trainer = (
        "mkdir -p outputs/run1; "
        "trap 'echo interrupted > outputs/run1/step_final.pt.tmp; mv outputs/run1/step_final.pt.tmp "
        "outputs/run1/step_final.pt; exit 130' INT; "
        "while true; do sleep 0.1; done"
    )
    jobs.start(t, "train", trainer)
    try:
        job_dir = Path(jobs.job_dir(t, "train"))
        deadline = time.monotonic() + 10
        while jobs.state(t, "train").state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)

        def sleep(seconds):  # emulated time for the watchdog, a little real time for the job to react
            emu.advance(seconds)
            time.sleep(min(seconds, 0.05))

        s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0.5, poll_s=60,
                        interrupt_grace_s=120)
        w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=sleep, gpu_probe=lambda: [99], echo=lambda _: None)
        assert w.run() == "max-runtime"
        assert emu.pod(pod.id).status == "EXITED"
        ev = [e["event"] for e in events(job_dir)]
        assert ev.index("interrupt") < ev.index("job-exited") < ev.index("stopped"), [e for e in events(job_dir) if e["event"] != "check"]
        assert (tmp_path / "ws" / "outputs" / "run1" / "step_final.pt").read_text().strip() == "interrupted"
        assert wd.read_exit_code(job_dir) == 130
    finally:
        jobs.stop(t, "train")


def test_linger_then_a_new_run_gets_its_own_linger(frozen_pod, tmp_path, bounded_sleep):
    """`fab train` following: the pod lingers 10 min after the job for a fetch; a second run started inside the
    linger (its start removes exit_code) is watched as a new run and lingers again after its own end."""
    emu, client, pod = frozen_pod
    job_dir = tmp_path / "j"
    job_dir.mkdir()
    t0 = emu.clock.now()
    timeline = {5 * 60: "end", 10 * 60: "restart", 60 * 60: "end"}
    done = set()

    def probe():
        t = emu.clock.now() - t0
        for at, what in timeline.items():
            if t >= at and at not in done:
                done.add(at)
                if what == "end":
                    wd.atomic_write(job_dir / "exit_code", "0\n")
                else:
                    (job_dir / "exit_code").unlink()
        return [90]

    s = wd.Settings(job_dir=job_dir, pod_id=pod.id, idle_minutes=0, max_runtime_hours=0, poll_s=30, linger_s=600)
    w = wd.Watchdog(s, client, clock=emu.clock.now, sleep=bounded_sleep(emu), gpu_probe=probe, echo=lambda _: None)
    assert w.run() == "job-ended"
    stopped = [e for e in events(job_dir) if e["event"] == "stopped"][0]["t"] - t0
    assert 70 * 60 <= stopped <= 70 * 60 + 31
    assert any(e.get("decision") == "lingering" for e in events(job_dir) if e["event"] == "check")
