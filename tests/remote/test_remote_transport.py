"""Transport over a real sshd on loopback: commands, pinned host keys, rsync, detached jobs."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from remote import LocalTarget, TargetError
from remote import jobs, sync
from sshd_loopback import LoopbackSSHD

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    srv = LoopbackSSHD(tmp_path_factory.mktemp("sshd"))
    with srv:
        yield srv


@pytest.fixture
def target(sshd, tmp_path):
    t = sshd.target(root=tmp_path / "ws")
    with t:
        yield t


def test_remote_run_quoting_and_exit_codes(target):
    r = target.run("""printf '%s|' "a b" '$HOME' "it's"; echo""")
    assert r.stdout.strip() == "a b|$HOME|it's|"
    assert target.run("exit 7", check=False).returncode == 7
    with pytest.raises(TargetError, match="exit 3"):
        target.run("echo boom >&2; exit 3")
    assert target.is_connected  # multiplexed master stays up between commands


def test_remote_host_key_pinned_then_enforced(sshd, tmp_path):
    t = sshd.target(root=tmp_path / "ws", name="pin")
    kh = sshd.base / "known_hosts"
    with t:
        t.run("true")
    assert "ultrashape-pin" in kh.read_text()  # pinned under the alias, not the address
    # The same alias now answering with a different key must be refused, with the fix in the message.
    other = LoopbackSSHD(tmp_path / "other")
    with other:
        other.client_key = sshd.client_key
        (other.base / "authorized_keys").write_text(Path(str(sshd.client_key) + ".pub").read_text())
        t2 = other.target(root=tmp_path / "ws", name="pin", known_hosts=kh)
        t2.identity = str(sshd.client_key)
        with pytest.raises(TargetError, match="ssh-keygen -R ultrashape-pin"):
            t2.run("true")


def test_remote_rsync_incremental_limit_and_resume(target, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / f"m{i:02d}.obj").write_text(f"v {i} 0 0\n")
    (src / "sub" / "big.stl").write_bytes(os.urandom(300_000))
    dest = target.path("data/input")
    r = sync.push(target, src, dest, limit=5, progress=False)
    assert r.transferred == 5
    assert sorted(os.listdir(dest)) == [f"m{i:02d}.obj" for i in range(5)]
    r = sync.push(target, src, dest, progress=False)
    assert r.transferred == 16  # only what was missing
    r = sync.push(target, src, dest, progress=False)
    assert r.transferred == 0  # no change, nothing sent
    # A partial file left by an interrupted transfer is continued, then cleaned up.
    (src / "huge.glb").write_bytes(os.urandom(2_000_000))
    part = Path(dest) / sync.PARTIAL_DIR
    part.mkdir()
    (part / "huge.glb").write_bytes((src / "huge.glb").read_bytes()[:1_000_000])
    r = sync.push(target, src, dest, progress=False)
    assert (Path(dest) / "huge.glb").read_bytes() == (src / "huge.glb").read_bytes()
    assert r.bytes_sent < 1_500_000  # the first half was not sent again
    # And back: pull never deletes local files.
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("mine")
    sync.pull(target, dest, home, progress=False)
    assert (home / "keep.txt").exists() and (home / "sub" / "big.stl").stat().st_size == 300_000


def test_remote_detached_job_survives_dropped_connection(target, tmp_path):
    cmd = "for i in $(seq 1 12); do echo \"line $i 'q' \\$x\"; sleep 0.25; done; exit 5"
    js = jobs.start(target, "demo", cmd)
    assert js.state == "running"
    with pytest.raises(TargetError, match="already running"):
        jobs.start(target, "demo", "true")
    buf = io.BytesIO()
    # Kill the SSH master (the network drop) while follow streams through it.
    def drop():
        time.sleep(1.0)
        pid = target.master_pid()
        assert pid
        os.kill(pid, signal.SIGKILL)

    th = threading.Thread(target=drop)
    th.start()
    final = jobs.follow(target, "demo", out=buf, interval=0.1)
    th.join()
    text = buf.getvalue().decode()
    assert final.state == "failed" and final.exit_code == 5
    lines = [ln for ln in text.splitlines() if ln.startswith("line")]
    assert lines == [f"line {i} 'q' $x" for i in range(1, 13)]  # none lost, none twice
    # A restart keeps the previous log aside.
    jobs.start(target, "demo", "echo again")
    assert jobs.follow(target, "demo", out=io.BytesIO()).state == "done"
    assert Path(target.path("jobs/demo/log.prev")).exists()
    # The killed master left its socket behind; the new one must still be reachable (and so closable).
    target.close()
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"])
            if f"ControlPath={target.control_path}" in (p.info["cmdline"] or []) and "ControlMaster=yes" in p.info["cmdline"]]
    assert not left, "an SSH master outlived close()"


def test_remote_job_lost_when_its_session_dies(target):
    jobs.start(target, "victim", "sleep 30")
    tmux = f"tmux -S {target.path('jobs/tmux.sock')}"
    pane = int(target.run(f"{tmux} display-message -p -t =us-victim: '#{{pane_pid}}'").stdout)
    target.run(f"{tmux} kill-server")
    try:
        assert jobs.state(target, "victim").state == "lost"
        assert jobs.state(target, "nope").state == "absent"
    finally:
        # The job script traps HUP, so it and its `sleep` outlive the server (which is what `lost` means on a pod
        # whose tmux died); here they would linger 30 s past the test. The pane leads its own process group.
        target.run(f"kill -KILL -- -{pane} 2>/dev/null; true", check=False)
        gone = f"for i in $(seq 50); do grep -qs '^State:[[:space:]]*[^Z]' /proc/{pane}/status || exit 0; sleep 0.1; done; exit 1"
        assert target.run(gone, check=False).ok, "the victim job outlived its test"  # (a zombie counts as gone)


def test_remote_local_target_same_commands(tmp_path):
    t = LocalTarget(root=tmp_path / "lw")
    with t:
        jobs.start(t, "hello", "echo hi from $(pwd)")
        assert jobs.follow(t, "hello", out=io.BytesIO()).exit_code == 0
        assert "hi from " + str((tmp_path / "lw").resolve()) in t.read_text(t.path("jobs/hello/log"))
        src = tmp_path / "s"
        src.mkdir()
        (src / "a.obj").write_text("v 0 0 0\n")
        assert sync.push(t, src, t.path("data/input"), progress=False).transferred == 1


def test_remote_stop_escalates_and_keeps_the_exit_code(target):
    # Ctrl-C is enough for most jobs...
    jobs.start(target, "polite", "python3 -c 'import time\ntry:\n  time.sleep(60)\nexcept KeyboardInterrupt:\n  print(\"bye\")'")
    time.sleep(0.5)
    st = jobs.stop(target, "polite", grace=5)
    assert st.state == "done" and "bye" in jobs.tail(target, "polite")
    # ...one that ignores it gets SIGTERM after the grace period, and its exit status is still recorded.
    jobs.start(target, "stubborn", "trap '' INT; sleep 60")
    time.sleep(0.5)
    t0 = time.monotonic()
    st = jobs.stop(target, "stubborn", grace=1)
    assert st.state == "failed" and st.exit_code == 143, st  # 128 + SIGTERM
    assert time.monotonic() - t0 < 10
