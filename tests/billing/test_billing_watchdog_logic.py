"""The watchdog's policy and probes, without an API: decide(), the idle clock, exit codes, in-flight writes."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from infra import watchdog as wd

pytestmark = pytest.mark.unit


def settings(tmp_path, **kw):
    base = dict(job_dir=tmp_path / "jobs" / "train", pod_id="pod1", idle_minutes=10, max_runtime_hours=2,
                budget_usd=0, poll_s=30)
    base.update(kw)
    return wd.Settings(**base)


def obs(now, exit_code=None, gpu=(90,), rate=2.69, uptime=0.0):
    return wd.Observation(now=now, exit_code=exit_code, gpu_util=list(gpu) if gpu is not None else None,
                          usd_per_hour=rate, uptime_s=uptime)


def test_job_end_stops_whatever_the_exit_code(tmp_path):
    s = settings(tmp_path)
    st = wd.State(pod_id="pod1", started_at=0)
    for code in (0, 1, 137, -1):
        d = wd.decide(s, st, obs(10, exit_code=code))
        assert d.stop and d.reason == "job-ended" and str(code) in d.detail


def test_linger_keeps_the_pod_a_while_after_the_job(tmp_path):
    s = settings(tmp_path, linger_s=300)
    st = wd.State(pod_id="pod1", started_at=0, job_ended_at=1000)
    d = wd.decide(s, st, obs(1100, exit_code=0))
    assert not d.stop and d.reason == "lingering" and "200 s" in d.detail
    assert wd.decide(s, st, obs(1300, exit_code=0)).reason == "job-ended"
    # lingering never overrides money or time
    s2 = settings(tmp_path, linger_s=300, max_runtime_hours=1)
    assert wd.decide(s2, st, obs(1100, exit_code=0, uptime=7200)).reason == "max-runtime"


def test_running_busy_job_is_left_alone(tmp_path):
    s = settings(tmp_path)
    st = wd.State(pod_id="pod1", started_at=0)
    o = obs(600, gpu=(97, 88))
    wd.update_idle(s, st, o)
    assert wd.decide(s, st, o) == wd.Decision(False, "ok", "")


def test_idle_clock_starts_resets_and_fires(tmp_path):
    s = settings(tmp_path, idle_minutes=10)
    st = wd.State(pod_id="pod1", started_at=0)
    seq = [(0, (0,)), (300, (2, 1)), (500, (60,)), (600, (0,)), (1150, None), (1199, (3,)), (1200, (0,))]
    decisions = []
    for t, g in seq:
        o = obs(t, gpu=g)
        wd.update_idle(s, st, o)
        decisions.append((t, wd.decide(s, st, o).reason))
    # busy at 500 resets the clock started at 0; the idle run from 600 reaches 10 min at 1200;
    # an unknown sample (None) at 1150 neither resets nor extends it
    assert st.idle_since == 600
    assert [r for _, r in decisions] == ["ok"] * 6 + ["idle"]


def test_one_busy_gpu_of_several_means_busy(tmp_path):
    s = settings(tmp_path, idle_minutes=1)
    st = wd.State(pod_id="pod1", started_at=0)
    for t in (0, 120):
        o = obs(t, gpu=(0, 0, 45, 0))
        wd.update_idle(s, st, o)
    assert st.idle_since is None and not wd.decide(s, st, o).stop


def test_no_gpu_reading_never_counts_as_idle(tmp_path):
    s = settings(tmp_path, idle_minutes=1)
    st = wd.State(pod_id="pod1", started_at=0)
    for t in range(0, 3600, 60):
        o = obs(t, gpu=None)
        wd.update_idle(s, st, o)
        assert not wd.decide(s, st, o).stop


def test_max_runtime_uses_the_longer_uptime(tmp_path):
    s = settings(tmp_path, max_runtime_hours=2, idle_minutes=0)
    st = wd.State(pod_id="pod1", started_at=0)
    assert not wd.decide(s, st, obs(3600, uptime=3600)).stop
    d = wd.decide(s, st, obs(3600, uptime=7200))
    assert d.stop and d.reason == "max-runtime"


def test_budget_counts_billed_plus_this_session_up_to_next_check(tmp_path):
    s = settings(tmp_path, budget_usd=10, idle_minutes=0, max_runtime_hours=0, poll_s=30)
    st = wd.State(pod_id="pod1", started_at=1000, billed_before_usd=7.0)
    rate = 2.69
    # crossing time: 7 + rate * (elapsed + 90 s) / 3600 = 10
    cross = (3.0 / rate) * 3600 - 90
    assert not wd.decide(s, st, obs(1000 + cross - 5, rate=rate)).stop
    d = wd.decide(s, st, obs(1000 + cross + 1, rate=rate))
    assert d.stop and d.reason == "budget" and "$10.00" in d.detail


def test_zero_turns_checks_off(tmp_path):
    s = settings(tmp_path, budget_usd=0, idle_minutes=0, max_runtime_hours=0)
    st = wd.State(pod_id="pod1", started_at=0, idle_since=0, billed_before_usd=1e6)
    assert not wd.decide(s, st, obs(10 ** 7, gpu=(0,), uptime=10 ** 7)).stop


def test_precedence_job_end_first(tmp_path):
    s = settings(tmp_path, budget_usd=1, max_runtime_hours=1, idle_minutes=1)
    st = wd.State(pod_id="pod1", started_at=0, idle_since=0, billed_before_usd=100)
    assert wd.decide(s, st, obs(10 ** 5, exit_code=0, gpu=(0,), uptime=10 ** 5)).reason == "job-ended"
    assert wd.decide(s, st, obs(10 ** 5, gpu=(0,), uptime=10 ** 5)).reason == "budget"


def test_settings_validation(tmp_path):
    with pytest.raises(ValueError, match="RUNPOD_POD_ID"):
        settings(tmp_path, pod_id="")
    with pytest.raises(ValueError, match="--budget-usd"):
        settings(tmp_path, budget_usd=-1)
    s = settings(tmp_path)
    assert s.flush_dirs == [tmp_path / "jobs" / "train", tmp_path / "outputs"]


def test_read_exit_code(tmp_path):
    assert wd.read_exit_code(tmp_path) is None
    (tmp_path / "exit_code").write_text("3\n")
    assert wd.read_exit_code(tmp_path) == 3
    (tmp_path / "exit_code").write_text("garbage")
    assert wd.read_exit_code(tmp_path) == -1


def test_in_flight_writes_sees_fresh_temp_files_only(tmp_path):
    out = tmp_path / "outputs" / "run1"
    out.mkdir(parents=True)
    (out / "step_0000100.pt").write_bytes(b"done")  # a finished checkpoint: never waited for
    fresh = out / "step_0000200.pt.tmp"
    fresh.write_bytes(b"half")
    stale = out / "old.partial"
    stale.write_bytes(b"abandoned")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    tmpdir = out / ".tmp-global_step300"
    tmpdir.mkdir()
    (tmpdir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    latest = out / ".latest.tmp4242"  # ml/training/checkpoint.py's pointer update
    latest.write_text("step_0000200")
    (tmp_path / "outputs" / ".watchdog.json.1.tmp").write_text("{}")  # our own state file: ignored
    found = wd.in_flight_writes([tmp_path / "outputs"], wd.DEFAULT_TEMP_GLOBS, time.time(), quiet_s=30)
    assert set(found) == {fresh, tmpdir, latest}


def test_nvidia_smi_probe_parses_and_fails_safe(tmp_path):
    script = tmp_path / "smi"
    script.write_text("#!/bin/sh\nprintf '12\\n 0 \\n97 %%\\n'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    assert wd.nvidia_smi_probe(str(script)) == [12, 0, 97]
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\necho '[N/A]'\n")
    bad.chmod(0o755)
    assert wd.nvidia_smi_probe(str(bad)) is None
    assert wd.nvidia_smi_probe(str(tmp_path / "missing")) is None
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    failing.chmod(0o755)
    assert wd.nvidia_smi_probe(str(failing)) is None


def test_health_from_state_text():
    now = 10_000.0
    live = wd.State(pod_id="p", started_at=0, last_check=now - 20, poll_s=30, projected_usd=4.5)
    h = wd.health(json.dumps(live.__dict__), now)
    assert h.running and "watching" in h.message and "$4.50" in h.message
    dead = wd.State(pod_id="p", started_at=0, last_check=now - 1000, poll_s=30)
    h = wd.health(json.dumps(dead.__dict__), now)
    assert not h.running and "NOT RUNNING" in h.message and "fab teardown" in h.message
    done = wd.State(pod_id="p", started_at=0, last_check=now - 1000, outcome="stopped", reason="idle")
    assert "stopped the pod (idle)" in wd.health(json.dumps(done.__dict__), now).message
    failing = wd.State(pod_id="p", started_at=0, last_check=now - 5, outcome="stop-failing", reason="budget")
    assert "FAILING" in wd.health(json.dumps(failing.__dict__), now).message
    assert "will NOT stop" in wd.health("", now).message
    # a long checkpoint flush: no check for minutes, but the heartbeat goes on
    flushing = wd.State(pod_id="p", started_at=0, last_check=now - 600, heartbeat=now - 2, outcome="stopping",
                        reason="budget")
    h = wd.health(json.dumps(flushing.__dict__), now)
    assert h.running and "stopping the pod (budget)" in h.message


def test_cli_defaults_come_from_the_pod_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNPOD_POD_ID", "envpod")
    monkeypatch.setenv("ULTRASHAPE_BUDGET_USD", "150")
    monkeypatch.setenv("ULTRASHAPE_AUTOSTOP_IDLE_MINUTES", "30")
    monkeypatch.setenv("ULTRASHAPE_MAX_RUNTIME_HOURS", "48")
    monkeypatch.delenv("ULTRASHAPE_STACK", raising=False)
    args = wd.build_parser().parse_args(["--job-dir", str(tmp_path / "j")])
    s = wd.settings_from_args(args)
    assert (s.pod_id, s.budget_usd, s.idle_minutes, s.max_runtime_hours) == ("envpod", 150, 30, 48)
    args = wd.build_parser().parse_args(["--job-dir", str(tmp_path / "j"), "--idle-minutes", "0",
                                         "--budget-usd", "5", "--pod-id", "p2"])
    s = wd.settings_from_args(args)
    assert (s.pod_id, s.budget_usd, s.idle_minutes) == ("p2", 5, 0)


def test_cli_precedence_flag_then_env_then_stack_file(tmp_path, monkeypatch):
    for k in ("ULTRASHAPE_BUDGET_USD", "ULTRASHAPE_AUTOSTOP_IDLE_MINUTES", "ULTRASHAPE_MAX_RUNTIME_HOURS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RUNPOD_POD_ID", "p")
    monkeypatch.setenv("ULTRASHAPE_BUDGET_USD", "99")
    args = wd.build_parser().parse_args(["--job-dir", str(tmp_path), "--stack", "a40", "--idle-minutes", "7"])
    s = wd.settings_from_args(args)
    # flag 7; env 99; Pulumi.a40.yaml's maxRuntimeHours (8) where neither flag nor env says
    assert (s.idle_minutes, s.budget_usd, s.max_runtime_hours) == (7, 99, 8)


def test_cli_refuses_without_pod_id(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
    with pytest.raises(SystemExit):
        wd.main(["--job-dir", str(tmp_path / "j"), "--no-supervisor"])
    assert "RUNPOD_POD_ID" in capsys.readouterr().err


def test_state_survives_a_round_trip(tmp_path):
    st = wd.State(pod_id="p", started_at=5.0, idle_since=7.0, billed_before_usd=1.5, restarts=2)
    st.save(tmp_path / "watchdog.json")
    back = wd.State.load(tmp_path / "watchdog.json")
    assert back == st
    (tmp_path / "bad.json").write_text("{not json")
    assert wd.State.load(tmp_path / "bad.json") is None


def test_lock_lives_in_container_temp_and_is_exclusive(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "podtmp"))
    p = wd.lock_path(tmp_path / "jobs" / "train")
    assert p.parent == tmp_path / "podtmp" and p.name.endswith(".supervisor.lock")
    assert wd.lock_path(tmp_path / "jobs" / "other") != p
    first = wd._try_lock(p)
    assert first not in (None, True)
    import subprocess
    import sys

    # another process cannot take it while we hold it
    code = f"import sys; sys.path.insert(0, {str(wd.Path(wd.__file__).parents[1])!r}); from infra import watchdog as w; " \
           f"print(w._try_lock(w.Path({str(p)!r})) is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "True"
    first.close()


# ---- several jobs on one pod: who holds it (decide with peers, pod_owner, scan_peers) --------------------------

P = wd.Peer


def test_job_end_stands_down_while_another_watched_job_runs(tmp_path):
    s = settings(tmp_path, idle_minutes=0, max_runtime_hours=0)
    st = wd.State(pod_id="pod1", started_at=0, job_ended_at=100)
    o = obs(200, exit_code=0)
    assert wd.decide(s, st, o).reason == "job-ended"  # nobody else: stop
    assert wd.decide(s, st, o, []).reason == "job-ended"
    d = wd.decide(s, st, o, [P("train", running=True, watchdog="live")])
    assert not d.stop and d.reason == "stood-down" and d.owner == "train"
    assert d.detail == "stood down (job-ended): job train now runs on this pod and its watchdog owns the pod"
    # a live watchdog still lingering after its own job holds the pod too (its linger is for a `fab fetch`)
    d = wd.decide(s, st, o, [P("infer", watchdog="live")])
    assert d.reason == "stood-down" and "its watchdog still holds this pod" in d.detail
    # ...so does a claim, and (against job-ended) a busy job running without a watchdog
    assert wd.decide(s, st, o, [P("train", claim=True)]).reason == "stood-down"
    d = wd.decide(s, st, o, [P("train", running=True)])
    assert d.reason == "stood-down" and "without a watchdog" in d.detail
    # the running, watched job is preferred as the owner named in the log
    peers = [P("train", claim=True), P("serve", running=True), P("process", running=True, watchdog="live")]
    assert wd.decide(s, st, o, peers).owner == "process"


def test_budget_and_max_runtime_never_stand_down(tmp_path):
    live = [P("train", running=True, watchdog="live"), P("train", claim=True)]
    st = wd.State(pod_id="pod1", started_at=0, job_ended_at=100, billed_before_usd=9.9)
    s = settings(tmp_path, idle_minutes=0, max_runtime_hours=0, budget_usd=10)
    assert wd.decide(s, st, obs(200, exit_code=0), live).reason == "budget"  # even with our job ended
    assert wd.decide(s, st, obs(200, exit_code=None), live).reason == "budget"
    s = settings(tmp_path, idle_minutes=0, max_runtime_hours=1)
    assert wd.decide(s, st, obs(200, exit_code=0, uptime=3600), live).reason == "max-runtime"
    for reason in ("budget", "max-runtime", "watchdog-crash-loop"):
        assert wd.pod_owner(live, reason) is None


def test_idle_stands_down_only_for_a_watched_holder(tmp_path):
    s = settings(tmp_path, idle_minutes=10, max_runtime_hours=0)
    st = wd.State(pod_id="pod1", started_at=0, idle_since=0)
    o = obs(700, gpu=(0,))  # our own job still runs, the GPU idles
    assert wd.decide(s, st, o).reason == "idle"
    # a CPU job (processing) with its own watchdog runs beside: the idle GPU is that job's business
    assert wd.decide(s, st, o, [P("process", running=True, watchdog="live")]).reason == "stood-down"
    # a job running with nobody watching it does not keep an idle pod up: idleness is what ends a hung job
    assert wd.decide(s, st, o, [P("train", running=True)]).reason == "idle"


def test_a_stood_down_watchdog_is_no_owner_so_two_never_wait_for_each_other(tmp_path):
    s = settings(tmp_path, idle_minutes=0, max_runtime_hours=0)
    st = wd.State(pod_id="pod1", started_at=0, job_ended_at=100)
    # both jobs ended; the other watchdog stood down for us: we stop
    assert wd.decide(s, st, obs(200, exit_code=0), [P("process", watchdog="stood-down")]).reason == "job-ended"
    # stale or dead watchdogs and ended jobs are simply not peers (scan_peers drops them): we stop
    assert wd.pod_owner([P("process")], "job-ended") is None


def test_rearming_waits_the_handover_grace_from_the_last_holder(tmp_path):
    s = settings(tmp_path, idle_minutes=0, max_runtime_hours=0, handover_grace_s=120)
    st = wd.State(pod_id="pod1", started_at=0, job_ended_at=100, stood_down_for="process", owner_seen_at=1000)
    d = wd.decide(s, st, obs(1030, exit_code=0), [])  # between two stages of a `fab train`
    assert not d.stop and d.reason == "re-arming" and d.owner == "process" and "stopping in 90 s" in d.detail
    assert wd.decide(s, st, obs(1120, exit_code=0), []).reason == "job-ended"
    # the grace never delays money or time
    s2 = settings(tmp_path, idle_minutes=0, max_runtime_hours=1, handover_grace_s=120)
    assert wd.decide(s2, st, obs(1030, exit_code=0, uptime=3600), []).reason == "max-runtime"
    # and a job of our own that runs again is just watched
    assert wd.decide(s, st, obs(1030, exit_code=None), []).reason == "ok"


def test_scan_peers_reads_the_jobs_folder(tmp_path):
    """Our own job never counts; another pod's, a stale or a killed watchdog, an expired claim do not either."""
    import subprocess
    import sys

    jobs_dir = tmp_path / "jobs"
    now = time.time()

    def state(job, **kw):
        (jobs_dir / job).mkdir(parents=True)
        base = dict(pod_id="pod1", started_at=now - 100, heartbeat=now - 5, poll_s=30, worker_pid=os.getpid())
        base.update(kw)
        wd.State(**base).save(jobs_dir / job / wd.STATE_FILE)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state("train")  # ours: live, its job "running" (no exit_code) - still never a peer
    state("serve", stood_down_for="train", stood_down_detail="stood down (idle): ...")
    state("process", pod_id="another-pod")
    state("weights", heartbeat=now - 3 * 30 - 61)
    state("infer", worker_pid=dead.pid)
    state("custom")  # a live watchdog on a job of any name
    wd.atomic_write(jobs_dir / ".claim.train.json", json.dumps({"task": "train", "pod_id": "pod1", "expires_at": now + 60}))
    wd.atomic_write(jobs_dir / ".claim.serve.json", json.dumps({"task": "serve", "pod_id": "pod1", "expires_at": now - 1}))
    # another stack's pod on the same network volume (the same jobs/ folder)
    wd.atomic_write(jobs_dir / ".claim.infer.json", json.dumps({"task": "infer", "pod_id": "pod2", "expires_at": now + 60}))
    (jobs_dir / ".claim.broken.json").write_text("{")
    (jobs_dir / "tmux.sock").write_text("")  # no tmux server behind it: nothing runs
    peers = wd.scan_peers(jobs_dir / "train", "pod1", now=now)
    assert peers == [P("train", claim=True), P("custom", watchdog="live"), P("serve", watchdog="stood-down")]
    assert wd.pod_owner(peers, "job-ended").name == "custom"
    # a live watchdog whose job has ended still holds the pod (it lingers for a fetch)
    (jobs_dir / "custom" / "exit_code").write_text("0\n")
    assert P("custom", watchdog="live") in wd.scan_peers(jobs_dir / "train", "pod1", now=now)
    # a busy job whose tmux session is gone without an exit_code (lost with a container) runs no more
    (jobs_dir / "process" / "job.json").write_text(json.dumps({"name": "process", "session": "us-process"}))
    assert "process" not in [p.name for p in wd.scan_peers(jobs_dir / "train", "pod1", now=now)]
    # no jobs folder at all: no peers, no error
    assert wd.scan_peers(tmp_path / "nowhere" / "train", "pod1") == []


def test_health_says_when_a_watchdog_stood_down():
    now = time.time()
    st = wd.State(pod_id="p", started_at=0, heartbeat=now, last_check=now, poll_s=30, stood_down_for="train",
                  stood_down_detail="stood down (job-ended): job train now runs on this pod and its watchdog owns the pod")
    h = wd.health(json.dumps(st.__dict__), now=now + 10)
    assert h.running and h.outcome == "stood-down"
    assert h.message == ("watchdog stood down (job-ended): job train now runs on this pod and its watchdog owns the "
                         "pod; it still stops the pod for budget or max runtime")
    h = wd.health(json.dumps(st.__dict__), now=now + 3 * 30 + 61)  # ...and when it died meanwhile
    assert not h.running and "NOT RUNNING" in h.message


def test_a_running_job_whose_watchdog_stood_down_still_holds_against_job_end(tmp_path):
    s = settings(tmp_path, idle_minutes=0, max_runtime_hours=0)
    st = wd.State(pod_id="pod1", started_at=0, job_ended_at=100)
    d = wd.decide(s, st, obs(200, exit_code=0), [P("serve", running=True, watchdog="stood-down")])
    assert d.reason == "stood-down" and "its watchdog stood down too" in d.detail
