"""One pod, several jobs: a watchdog whose job has ended must not stop the pod under a job started after it.

The race (found in review): `fab infer` leaves its watchdog lingering 10 min, `fab process` / `fab weights` leave
theirs up to one poll (30 s) plus the flush; a `fab train` started in that window got its pod stopped under the
training by the old job's watchdog. Here the jobs are real tmux jobs (remote/jobs.py, on a LocalTarget whose
workspace plays the pod's /workspace) and the watchdogs are the real CLI (supervisor + worker) or the real
Watchdog class, against the RunPod emulator.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from infra import watchdog as wd
from remote import jobs
from remote.target import LocalTarget
from tests.billing.watchdog_procs import log_events, running_pod, spawn, wait_for, worker_pid

pytestmark = pytest.mark.integration


@pytest.fixture
def ws(tmp_path):
    """(LocalTarget, jobs dir) of a workspace laid out as a pod's; its tmux server is killed at the end."""
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed (make sysdeps)")
    t = LocalTarget(root=tmp_path / "ws")
    yield t, Path(t.path("jobs"))
    subprocess.run(["tmux", "-S", t.path("jobs", "tmux.sock"), "kill-server"], capture_output=True)


def start_job(t: LocalTarget, name: str) -> Path:
    """A job that runs until <jobs>/<name>.go exists, then exits 0 (on Ctrl-C: writes a checkpoint, exits 130)."""
    go = Path(t.path("jobs", f"{name}.go"))
    ck = Path(t.path("outputs", name, "step_final.pt"))
    jobs.start(t, name, f"mkdir -p {ck.parent}; trap 'echo interrupted > {ck}.tmp; mv {ck}.tmp {ck}; exit 130' INT; "
                        f"while [ ! -f {go} ]; do sleep 0.05; done")
    wait_for(lambda: jobs.state(t, name).state == "running", 10, f"job {name} to run")
    return go


def finish(t: LocalTarget, name: str) -> None:
    Path(t.path("jobs", f"{name}.go")).touch()
    wait_for(lambda: wd.read_exit_code(Path(t.path("jobs", name))) is not None, 10, f"job {name} to end")


def named(job_dir: Path, event: str) -> list[dict]:
    return [e for e in log_events(job_dir) if e["event"] == event]


def pod_running_while(emu, pod_id, pred, what, timeout=20.0):
    """wait_for(pred), failing at once if the pod stops meanwhile: that is the race this file is about."""

    def check():
        assert emu.pod(pod_id).status == "RUNNING", f"the pod was stopped while waiting for {what}"
        return pred()

    return wait_for(check, timeout, what)


def test_lingering_watchdog_stands_down_for_a_train_started_meanwhile(live_emu, make_pod, ws, procs):
    """`fab infer` (its watchdog lingers), then `fab train` inside the linger: the infer watchdog stands down when
    its linger ends; the training's watchdog stops the pod when training ends; the old one then exits."""
    emu = live_emu
    pod, _ = running_pod(emu, make_pod)
    t, jobs_dir = ws
    start_job(t, "infer")
    infer = spawn(emu, pod.id, jobs_dir / "infer", "--linger-minutes", "0.04")  # 2.4 s
    procs.append(infer.pid)
    procs.append(wait_for(lambda: worker_pid(jobs_dir / "infer"), what="the infer watchdog"))
    finish(t, "infer")
    pod_running_while(emu, pod.id, lambda: any(e.get("decision") == "lingering" for e in named(jobs_dir / "infer", "check")),
                      "the infer watchdog to linger")

    start_job(t, "train")  # `fab train`: the job, then its watchdog
    train = spawn(emu, pod.id, jobs_dir / "train")
    procs.append(train.pid)
    procs.append(pod_running_while(emu, pod.id, lambda: worker_pid(jobs_dir / "train"), "the train watchdog"))

    # (If the linger ended before the training's watchdog was up, it stood down for the training job alone first.)
    text = "stood down (job-ended): job train now runs on this pod and its watchdog owns the pod"
    stood = pod_running_while(emu, pod.id, lambda: [e for e in named(jobs_dir / "infer", "stood-down")
                                                    if text in e["detail"]], "the infer watchdog to stand down")
    assert stood[0]["owner"] == "train"
    time.sleep(1.0)  # five more polls of both watchdogs
    assert emu.pod(pod.id).status == "RUNNING"
    assert not named(jobs_dir / "infer", "stop-request")
    h = wd.health((jobs_dir / "infer" / wd.STATE_FILE).read_text())
    assert h.running and h.outcome == "stood-down" and "job train now runs" in h.message, h.message

    finish(t, "train")
    wait_for(lambda: emu.pod(pod.id).status == "EXITED", 20, "the train watchdog to stop the pod")
    assert wd.State.load(jobs_dir / "train" / wd.STATE_FILE).reason == "job-ended"
    assert named(jobs_dir / "train", "stop-request")
    # The stood-down watchdog sees the pod stopped and ends (its supervisor too), without a stop call of its own.
    assert infer.wait(timeout=20) == 0 and train.wait(timeout=20) == 0
    assert wd.State.load(jobs_dir / "infer" / wd.STATE_FILE).reason == "already-stopped"
    assert not named(jobs_dir / "infer", "stop-request")


def test_watchdog_in_its_stop_path_stands_down_before_the_stop_call(live_emu, make_pod, ws, procs):
    """`fab process` ended and its watchdog is already shutting down (waiting for a checkpoint write in flight)
    when `fab train` starts: the re-check right before the stop call stands down; the pod stays up for the
    training, whose watchdog stops it when training ends."""
    emu = live_emu
    pod, _ = running_pod(emu, make_pod)
    t, jobs_dir = ws
    start_job(t, "process")
    proc = spawn(emu, pod.id, jobs_dir / "process", "--flush-timeout-seconds", "60")
    procs.append(proc.pid)
    procs.append(wait_for(lambda: worker_pid(jobs_dir / "process"), what="the process watchdog"))
    tmp = Path(t.path("outputs", "run1", "checkpoints", ".tmp-step_0000100"))
    tmp.mkdir(parents=True)
    (tmp / "model.pt").write_bytes(b"x" * 1000)  # an atomic write in flight: the flush waits for it
    finish(t, "process")
    pod_running_while(emu, pod.id, lambda: named(jobs_dir / "process", "flush-wait"), "the process watchdog's flush")
    assert named(jobs_dir / "process", "decision")[0]["reason"] == "job-ended"

    start_job(t, "train")
    train = spawn(emu, pod.id, jobs_dir / "train")
    procs.append(train.pid)
    procs.append(pod_running_while(emu, pod.id, lambda: worker_pid(jobs_dir / "train"), "the train watchdog"))
    os.replace(tmp, tmp.parent / "step_0000100")  # the write lands: the process watchdog's flush ends

    pod_running_while(emu, pod.id, lambda: named(jobs_dir / "process", "stop-cancelled"), "the stand-down")
    ev = [e["event"] for e in log_events(jobs_dir / "process")]
    assert ev.index("flushed") < ev.index("stood-down") < ev.index("stop-cancelled") and "stop-request" not in ev
    time.sleep(1.0)
    assert emu.pod(pod.id).status == "RUNNING"
    st = wd.State.load(jobs_dir / "process" / wd.STATE_FILE)
    assert st.outcome == "watching" and st.stood_down_for == "train"

    finish(t, "train")
    wait_for(lambda: emu.pod(pod.id).status == "EXITED", 20, "the train watchdog to stop the pod")
    assert wd.State.load(jobs_dir / "train" / wd.STATE_FILE).reason == "job-ended"
    assert proc.wait(timeout=20) == 0
    assert "stop-request" not in [e["event"] for e in log_events(jobs_dir / "process")]


# ---- the same, in-process on the emulator's controllable clock -----------------------------------------------


def watchdog(emu, client, pod_id, job_dir, sleep, **kw):
    base = dict(job_dir=job_dir, pod_id=pod_id, idle_minutes=0, max_runtime_hours=0, poll_s=30,
                interrupt_grace_s=60, flush_timeout_s=5)
    base.update(kw)
    w = wd.Watchdog(wd.Settings(**base), client, clock=emu.clock.now, sleep=sleep, gpu_probe=lambda: [95],
                    echo=lambda _: None)
    w.st.stale_exit_mtime = None  # its job ended after it started, as in life
    return w


def test_budget_is_never_stood_down_and_interrupts_the_new_training(frozen_pod, ws):
    """The stood-down watchdog still enforces its budget, though the training's watchdog has none: the pod stops
    for money, and the training (not its job) gets its Ctrl-C and checkpoints first."""
    emu, client, pod = frozen_pod
    t, jobs_dir = ws
    emu.advance(2 * 3600)  # ~$5.40 billed before
    start_job(t, "process")
    finish(t, "process")
    start_job(t, "train")

    def sleep(seconds):  # emulated time; a little real time for the trainer to react to its Ctrl-C
        emu.advance(seconds)
        trainer.sleep(0)  # the training's watchdog beats its heart as a live one does
        time.sleep(min(seconds, 0.02))

    trainer = watchdog(emu, client, pod.id, jobs_dir / "train", lambda s: None, budget_usd=0)
    old = watchdog(emu, client, pod.id, jobs_dir / "process", sleep, budget_usd=6)
    first = old.check()
    assert first.reason == "stood-down" and first.owner == "train" and not first.stop
    assert old.run() == "budget"
    assert emu.pod(pod.id).status == "EXITED" and emu.spend_usd() <= 6.0
    ev = log_events(jobs_dir / "process")
    names = [e["event"] for e in ev]
    assert names.index("stood-down") < names.index("decision") < names.index("interrupt") < names.index("stopped")
    assert [e["job"] for e in ev if e["event"] == "interrupt"] == ["train"]
    assert [e["job"] for e in ev if e["event"] == "job-exited"] == ["train"]
    assert Path(t.path("outputs", "train", "step_final.pt")).read_text().strip() == "interrupted"
    assert wd.read_exit_code(jobs_dir / "train") == 130


def test_stand_down_for_an_unwatched_job_rearms_after_it_ends(frozen_pod, ws, bounded_sleep):
    """`fab train --no-autostop` after a standalone job: the old watchdog does not stop the pod under the training,
    but it keeps watching, and once no job has held the pod for the hand-over grace it stops the pod itself."""
    emu, client, pod = frozen_pod
    t, jobs_dir = ws
    start_job(t, "weights")
    finish(t, "weights")
    start_job(t, "train")  # no watchdog of its own
    t0 = emu.clock.now()
    bounded = bounded_sleep(emu, hours=2)
    ended = {}

    def sleep(seconds):
        bounded(seconds)
        if emu.clock.now() - t0 >= 600 and not ended:
            finish(t, "train")  # ten minutes of training
            ended["at"] = emu.clock.now()

    old = watchdog(emu, client, pod.id, jobs_dir / "weights", sleep, handover_grace_s=120)
    assert old.run() == "job-ended"
    assert emu.pod(pod.id).status == "EXITED"
    ev = log_events(jobs_dir / "weights")
    stood = [e for e in ev if e["event"] == "stood-down"]
    assert stood and stood[0]["owner"] == "train" and "without a watchdog" in stood[0]["detail"]
    assert stood[0]["t"] - t0 < 1  # at once: the training was already running
    last_seen = max(e["t"] for e in ev if e["event"] == "check" and e["decision"] == "stood-down")
    assert last_seen < ended["at"] + 30
    stopped = [e for e in ev if e["event"] == "stopped"][0]["t"]
    assert 120 <= stopped - last_seen <= 120 + 30 + 1  # the grace from the last sighting, then the next poll
    names = [e["event"] for e in ev]
    assert names.index("re-arming") < names.index("re-armed") < names.index("decision") < names.index("stopped")


def test_a_claim_from_fab_holds_the_pod_until_released(frozen_pod, ws):
    """`fab train` claims the pod while it sets up, syncs and processes (playbooks/common.py Claim, renewed while
    the task runs): the old watchdog stands down for it, and stops the pod once the claim is released and the
    hand-over grace has passed."""
    from playbooks.common import Claim, write_claim

    emu, client, pod = frozen_pod
    t, jobs_dir = ws
    t.pod = pod  # this workspace is that pod's /workspace: claims name the pod they hold
    start_job(t, "process")
    finish(t, "process")
    polls = []
    claim = Claim(t, "train", ttl_s=2, refresh_s=0.3)  # each write holds the pod 2 s; the task holds it ~3 s

    def sleep(seconds):
        emu.advance(seconds)
        time.sleep(0.3)  # real time, for the claim's expiry and its renewals
        polls.append(emu.clock.now())
        if len(polls) == 10:
            claim.release()  # the task ended (or handed over) without leaving a job

    with claim:
        old = watchdog(emu, client, pod.id, jobs_dir / "process", sleep, handover_grace_s=60)
        assert old.run() == "job-ended"
    ev = log_events(jobs_dir / "process")
    stood = [e for e in ev if e["event"] == "stood-down"]
    assert len(stood) == 1 and stood[0]["owner"] == "train" and "`fab train` is starting a job" in stood[0]["detail"]
    held = [e for e in ev if e["event"] == "check" and e["t"] <= polls[9] - 30]
    assert len(held) >= 9 and all(e["decision"] == "stood-down" for e in held)  # renewed: it never lapsed
    stopped = [e for e in ev if e["event"] == "stopped"][0]["t"]
    assert 60 <= stopped - polls[8] <= 60 + 31
    assert not list(jobs_dir.glob(".claim.*"))
    # An expired claim (a laptop that went away mid-task) holds nothing; a live one holds only its own pod.
    write_claim(t, "train", ttl_s=-1)
    assert wd.scan_peers(jobs_dir / "process", pod.id) == []
    write_claim(t, "train")
    assert wd.scan_peers(jobs_dir / "process", pod.id) == [wd.Peer("train", claim=True)]
    assert wd.scan_peers(jobs_dir / "process", "another-pod") == []
