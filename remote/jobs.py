"""Detached jobs: a command that outlives the SSH connection that started it.

    job = start(target, "train", "python -m ml.training --config ...")
    follow(target, "train")          # streams the log; Ctrl-C detaches, the job goes on
    state(target, "train").exit_code

Each job runs in its own tmux session (the tmux server lives on the target, with its socket in
the workspace, so two pods or two tests never share one) and leaves, in <root>/jobs/<name>/:

    run.sh      the script, exactly as it ran
    job.json    command, start time, the tmux session
    log         stdout + stderr of the whole run
    exit_code   written (atomically) when the command ends - the one thing `status` trusts

A job whose tmux session is gone without an exit_code was killed with its machine (pod stopped,
container restarted): its state is `lost`, never silently `done`.

The script travels base64-encoded inside the command line: whatever quotes or `$` the command
holds, the remote shell only ever sees [A-Za-z0-9+/=].
"""

from __future__ import annotations

import base64
import json
import os
import select
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from remote.target import Target, TargetError

SESSION_PREFIX = "us-"


@dataclass
class JobState:
    name: str
    state: str  # running | done | failed | lost | absent
    exit_code: int | None = None
    log: str = ""
    started_at: float | None = None
    command: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


def job_dir(target: Target, name: str) -> str:
    return target.path("jobs", name)


def _tmux(target: Target) -> str:
    return f"tmux -S {shlex.quote(target.path('jobs', 'tmux.sock'))}"


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"job name must be letters, digits, '-' or '_', got {name!r}")


def start(target: Target, name: str, command: str, env: dict[str, str] | None = None) -> JobState:
    """Start `command` (bash) detached on `target`, under the workspace layout's environment.

    Refuses to start a second copy of a running job: the caller should follow it instead.
    The previous run's log is kept as log.prev.
    """
    _check_name(name)
    cur = state(target, name)
    if cur.state == "running":
        raise TargetError(
            f"{target}: job '{name}' is already running (since {_ago(cur.started_at)}). "
            f"Follow it with `fab logs --follow --job {name}`, or stop it first."
        )
    d = job_dir(target, name)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    script = (
        "#!/usr/bin/env bash\n"
        f"# job '{name}', written by remote/jobs.py\n"
        f"{target.env_prefix()} true\n"
        f"{exports}"
        "export PYTHONUNBUFFERED=1\n"
        # A handler (not an ignore, which children would inherit): Ctrl-C, TERM or HUP still reach the
        # command, and this script lives on to record how it ended instead of dying with it.
        "trap 'echo \"[job: signal received]\" >&2' INT TERM HUP\n"
        # The command runs in a subshell so that an `exit` inside it still reaches the exit_code line.
        f"( {command}\n) >> {shlex.quote(d + '/log')} 2>&1 < /dev/null\n"
        "rc=$?\n"
        f"echo $rc > {shlex.quote(d + '/exit_code.tmp')} && mv {shlex.quote(d + '/exit_code.tmp')} {shlex.quote(d + '/exit_code')}\n"
    )
    meta = json.dumps({"name": name, "command": command, "started_at": time.time(), "session": SESSION_PREFIX + name})
    b64 = base64.b64encode(script.encode()).decode()
    mb64 = base64.b64encode(meta.encode()).decode()
    q = shlex.quote(d)
    target.run(
        f"mkdir -p {q} && cd {q} && rm -f exit_code exit_code.tmp && "
        f"{{ [ ! -f log ] || mv log log.prev; }} && "
        f"echo {b64} | base64 -d > run.sh && echo {mb64} | base64 -d > job.json && "
        f"{_tmux(target)} new-session -d -s {SESSION_PREFIX}{name} -x 200 -y 50 'bash {q}/run.sh'"
    )
    return state(target, name)


def state(target: Target, name: str) -> JobState:
    """One round trip: job.json, exit_code and whether the tmux session lives."""
    _check_name(name)
    q = shlex.quote(job_dir(target, name))
    r = target.run(
        f"cd {q} 2>/dev/null || {{ echo absent; exit 0; }}; "
        f"cat job.json 2>/dev/null || echo '{{}}'; echo; "
        f"if [ -f exit_code ]; then echo exit=$(cat exit_code); "
        f"elif {_tmux(target)} has-session -t ={SESSION_PREFIX}{name} 2>/dev/null; then echo running; "
        f"else echo lost; fi",
        check=True,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if not lines or lines[0] == "absent":
        return JobState(name, "absent")
    try:
        meta = json.loads(lines[0])
    except json.JSONDecodeError:
        meta = {}
    last = lines[-1]
    js = JobState(
        name,
        "lost",
        log=job_dir(target, name) + "/log",
        started_at=meta.get("started_at"),
        command=meta.get("command", ""),
    )
    if last.startswith("exit="):
        try:
            js.exit_code = int(last[5:])
        except ValueError:
            js.exit_code = -1
        js.state = "done" if js.exit_code == 0 else "failed"
    elif last == "running":
        js.state = "running"
    if not meta and js.state == "lost":
        return JobState(name, "absent")
    return js


def stop(target: Target, name: str, grace: float = 30.0) -> JobState:
    """Interrupt a running job: Ctrl-C first (training writes its checkpoint, servers shut down cleanly),
    SIGTERM to its process group after `grace` seconds, SIGKILL 10 s later. The job script survives
    the first two (it traps them) and records the exit code; only SIGKILL leaves it `lost`."""
    s = state(target, name)
    if s.state != "running":
        return s
    sess = f"={SESSION_PREFIX}{name}"
    tmux = _tmux(target)
    # send-keys takes a *pane*: "=name" alone is "can't find pane"; "=name:" is its current window's pane.
    target.run(f"{tmux} send-keys -t {sess}: C-c", check=False)
    signal_group = (
        f"pg=$({tmux} display-message -p -t {sess}: '#{{pane_pid}}' 2>/dev/null) && [ -n \"$pg\" ] && kill -@SIG@ -- -$pg"
    )
    for sig, wait in (("TERM", grace), ("KILL", 10.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(0.5)
            s = state(target, name)
            if s.state != "running":
                return s
        target.run(signal_group.replace("@SIG@", sig), check=False)
    time.sleep(0.5)
    target.run(f"{tmux} kill-session -t {sess} 2>/dev/null; true", check=False)
    return state(target, name)


def tail(target: Target, name: str, lines: int = 50) -> str:
    q = shlex.quote(job_dir(target, name) + "/log")
    return target.run(f"tail -n {int(lines)} {q} 2>/dev/null; true").stdout


# Streams the log from byte `off` until the job ends. Reads `done` BEFORE the log, so the bytes
# written just before exit_code appeared are always flushed. Exit 3: the job vanished (lost).
_FOLLOW = r"""
cd {dir} || exit 4
off={off}
while :; do
  if [ -f exit_code ]; then fin=1; else fin=0; fi
  if [ -f log ]; then
    size=$(stat -c %s log)
    if [ "$size" -gt "$off" ]; then tail -c +$((off+1)) log | head -c $((size-off)); off=$size; fi
  fi
  [ $fin = 1 ] && exit 0
  if ! {tmux} has-session -t ={session} 2>/dev/null && [ ! -f exit_code ]; then exit 3; fi
  sleep {interval}
done
"""


def follow(
    target: Target,
    name: str,
    out: IO[bytes] | None = None,
    *,
    offset: int = 0,
    reattach: int = 5,
    interval: float = 0.5,
) -> JobState:
    """Stream the job's log until it ends; reattach if the connection drops.

    Returns the job's final state, or its current state with `detached` in the message when the
    user pressed Ctrl-C (the job goes on). Bytes already shown are never shown twice: after a
    drop, streaming resumes at the byte offset reached.
    """
    out = out or sys.stdout.buffer
    drops = 0
    proc: subprocess.Popen | None = None
    try:
        while True:
            cmd = _FOLLOW.format(
                dir=shlex.quote(job_dir(target, name)),
                off=int(offset),
                tmux=_tmux(target),
                session=SESSION_PREFIX + name,
                interval=interval,
            )
            # Its own session: Ctrl-C reaches only us, so it reads as "detach", never as a dropped connection.
            proc = target.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while True:
                # Wait at most 0.5 s at a time, never in one blocking read: a process-directed Ctrl-C may be taken
                # by another (native) thread, and a main thread asleep in read() on a quiet log would then not see
                # it until the next byte came. Here it is seen within 0.5 s. (A precaution: the CI hang of
                # 2026-11-25 blamed on this turned out to be SIGINT inherited as ignored; see the e2e test.)
                if not select.select([fd], [], [], 0.5)[0]:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                offset += len(chunk)
                out.write(chunk)
                out.flush()
            rc = proc.wait()
            proc = None
            if rc in (0, 3):  # the job ended (0) or vanished with its machine (3)
                return state(target, name)
            # rc 255 (ssh lost the connection) or a signal: the job itself is untouched on the target.
            drops += 1
            if drops > reattach:
                raise TargetError(
                    f"{target}: lost the connection {drops} times while following '{name}'. "
                    f"The job keeps running; `fab logs --follow` reattaches when the network is back."
                )
            print(f"\n[connection to {target} lost; reattaching ({drops}/{reattach})]", file=sys.stderr, flush=True)
            time.sleep(min(2.0 * drops, 10.0))
            try:
                reconnect = getattr(target, "reconnect", None)
                if reconnect:
                    reconnect()
            except TargetError as e:
                print(f"[reattach failed: {e}]", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        # Ctrl-C anywhere in here (streaming, sleeping, reconnecting) means: stop watching, leave the job.
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        print(
            f"\ndetached from '{name}' on {target}: it goes on. "
            f"`fab logs --follow` reattaches, `fab status` shows progress.",
            file=sys.stderr,
            flush=True,
        )
        try:
            s = state(target, name)
        except TargetError:
            return JobState(name, "detached")
        s.state = "detached" if s.state == "running" else s.state
        return s


def _ago(t: float | None) -> str:
    if not t:
        return "an unknown time"
    s = int(time.time() - t)
    return f"{s // 3600}h{s % 3600 // 60:02d}m ago" if s >= 3600 else f"{s // 60}m{s % 60:02d}s ago"
