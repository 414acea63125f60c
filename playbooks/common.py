"""What every task shares: picking the target, the config names, the remote folder names, output."""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from infra.watchdog import BUSY_JOBS, CLAIM_PREFIX
from remote import TargetError, jobs
from remote.stack import default_stack, target_for
from remote.target import REPO, Target

# Remote folders, relative to the workspace root (the same names as in this checkout).
INPUT = "data/input"
OUTPUT = "data/output"
OUTPUTS = "outputs"
WEIGHTS = "ckpt"  # the released checkpoint; configs/train_dit_refine.yaml: model.weights: ckpt/ultrashape_v1.pt

CONFIGS = {  # (full, tiny); `--tiny` picks the CPU-sized variants
    "processing": ("configs/processing.yaml", "configs/processing-tiny.yaml"),
    "train": ("configs/train_dit_refine.yaml", "configs/train_dit_refine-tiny.yaml"),
    "infer": ("configs/infer_dit_refine.yaml", "configs/infer_dit_refine-tiny.yaml"),
    "serve": ("configs/serve.yaml", "configs/serve-tiny.yaml"),
}

STACK_HELP = "stack name: local, a40, h100 ... (default: the Pulumi-selected stack, else local)"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_path(kind: str, given: str | None, tiny: bool) -> str:
    """The config a task uses, as a path relative to the kit root (checked here, before any remote work)."""
    path = given or CONFIGS[kind][1 if tiny else 0]
    if not (REPO / path).is_file():
        raise SystemExit(f"error: {path}: no such config in {REPO} (configs/ holds the shipped ones)")
    return path


KEEP_RUNNING_HELP = "leave the pod running afterwards even if this command had to start it (default: stop it again)"


@contextmanager
def target(stack: str | None, keep_running: bool = False):
    """`with target(stack) as t:` - the stack's Target, closed afterwards; errors become one clear line.

    A pod that was stopped before the command and that this command had to start is stopped again when the
    task ends (also on an error or Ctrl-C), unless `keep_running` or the task left a job running there that
    is watched (start_watchdog) or deliberately unwatched (`t.left_running`). Only the watchdog may end
    a job's pod; a read-only task (logs, fetch, sync ...) must not leave a GPU billing with nothing to stop it.
    """
    name = stack or default_stack()
    try:
        t = target_for(name, log=say)
    except TargetError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        with t:
            yield t
    except TargetError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if getattr(t, "started_pod", False) and not keep_running and not getattr(t, "left_running", None):
            stop_again(t)


def stop_again(t: Target) -> None:
    """Stop the pod this command started (it was EXITED before), and wait until it is; never raises."""
    say(f"[{t.name}] stopping the pod again: it was stopped before this command (--keep-running keeps it running)")
    try:
        t.client.stop_pod(t.pod.id)
        t.client.wait_for_pod(t.pod.id, "EXITED", timeout=300, poll=2, require_ssh=False)
        say(f"[{t.name}] pod {t.pod.id} stopped: GPU billing stopped, the volume stays")
    except BaseException as e:  # noqa: BLE001 - a second Ctrl-C or an API error: say what to do, never hide it
        say(f"[{t.name}] WARNING: could not confirm pod {t.pod.id} stopped ({e!r}); it may still bill: "
            f"`fab teardown --stack {t.name}`")


def start_watchdog(t: Target, job: str, linger_minutes: float = 0.0, idle: bool = True) -> None:
    """Start the pod's autostop watchdog (infra/watchdog.py, args from playbooks/cost.py) for a GPU job.

    It stops the pod when the job ends (after `linger_minutes`, time for a `fab fetch`), the GPU idles
    (unless `idle` is False: a CPU job such as processing or a download leaves the GPU idle by design),
    or the runtime or budget runs out. Never on this machine. The pod's own environment carries its id
    and API key on RunPod (/etc/rp_environment for SSH sessions); the laptop's key is only a fallback,
    and it travels on stdin, never in a file or on a command line.
    """
    if t.kind != "pod" or t.pod is None:
        return
    from playbooks.cost import watchdog_args

    args = watchdog_args(t, job) + ["--pod-id", t.pod.id]
    if linger_minutes:
        args += ["--linger-minutes", f"{linger_minutes:g}"]
    if not idle:
        args += ["--idle-minutes", "0"]  # the last one wins (argparse)
    key = os.environ.get("RUNPOD_API_KEY", "")
    base = os.environ.get("RUNPOD_API_BASE", "")
    cmd = (
        f"{t.env_prefix()} {{ [ ! -f /etc/rp_environment ] || . /etc/rp_environment; }}; "
        f"IFS= read -r k; [ -n \"${{RUNPOD_API_KEY:-}}\" ] || export RUNPOD_API_KEY=\"$k\"; "
        + (f"[ -n \"${{RUNPOD_API_BASE:-}}\" ] || export RUNPOD_API_BASE={shlex.quote(base)}; " if base else "")
        + py(t, "infra.watchdog", *args)
    )
    r = t.run(cmd, input=key + "\n", check=False)
    # The job and its pod are the watchdog's now (or, if it failed, the user's, as the warning says):
    # target() must not stop the pod under the job when the task returns.
    t.left_running = job
    release_claim(t)  # the hand-over is done: the job runs, and its watchdog (or the warning below) has it
    if r.ok:
        linger = f" (+{linger_minutes:g} min for a fetch)" if linger_minutes else ""
        idles = f"idles {t.config.autostop_idle_minutes} min or " if idle else ""
        say(f"[{t.name}] watchdog on '{job}' (pid {r.stdout.strip()}): the pod stops itself when the job ends{linger}, "
            f"{idles}reaches ${t.config.budget_usd:g}")
    else:
        say(f"[{t.name}] WARNING: the watchdog did not start ({(r.stderr or r.stdout).strip()[-300:]}); "
            f"this pod will not stop by itself: `fab teardown --stack {t.name}` when done")


POD_JOBS = BUSY_JOBS  # jobs that keep a pod busy (not tensorboard, setup); the watchdog uses the same list


def watch_job(t: Target, job: str, linger_minutes: float = 0.0, idle: bool = True) -> None:
    """The watchdog for a job a standalone task (process, weights, infer) started.

    Also beside another running job: a watchdog whose job ends while another job holds the pod stands down
    instead of stopping the pod (infra/watchdog.py pod_owner), so whichever job ends last stops it, and each
    job's own settings apply to it (processing: no GPU-idle stop)."""
    if t.kind != "pod" or t.pod is None:
        return
    busy = [j for j in POD_JOBS if j != job and jobs.state(t, j).state == "running"]
    if busy:
        say(f"[{t.name}] {', '.join(busy)} also runs on this pod: the pod stops when the last of them ends")
    start_watchdog(t, job, linger_minutes, idle)


CLAIM_TTL_S = 600  # a laptop that dies mid-task holds the pod against job-end and idle stops this long at most
CLAIM_REFRESH_S = 120  # while the task runs, its claim is written again this often


@contextmanager
def claim_pod(t: Target, task: str):
    """`with claim_pod(t, "train"):` - tell the pod's watchdogs that an attended task is about to start a job.

    A watchdog whose job ended (`fab infer` lingers 10 min; any watchdog takes up to one poll to act) would
    otherwise stop the pod under this task's setup, sync or processing, before the new job and its watchdog
    exist. The claim makes them stand down (infra/watchdog.py); start_watchdog releases it once the new job's
    watchdog runs, and so does the end of the task. Budget and max-runtime stops ignore it."""
    if t.kind != "pod" or t.pod is None:
        yield  # no watchdog runs on this machine
        return
    with Claim(t, task):
        yield


class Claim:
    """jobs/.claim.<task>.json on `t`, renewed every `refresh_s` by a thread until released: each write sets the
    expiry `ttl_s` ahead by the target's own clock, so a laptop that goes away stops holding the pod then."""

    def __init__(self, t: Target, task: str, ttl_s: float = CLAIM_TTL_S, refresh_s: float = CLAIM_REFRESH_S):
        self.t, self.task, self.ttl_s, self.refresh_s = t, task, ttl_s, refresh_s
        self.path: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> "Claim":
        self.path = write_claim(self.t, self.task, self.ttl_s)
        self.t.claim = self
        threading.Thread(target=self._renew, name=f"claim-{self.task}", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _renew(self) -> None:
        # From this thread, only a plain command: t.run() may open the SSH master, which is the main thread's
        # business (a reconnect there must not race one here). Without a master, ssh connects on its own.
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                if self.path is None:
                    return
                try:
                    subprocess.run(self.t.argv(claim_command(self.t, self.task, self.ttl_s)), stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    pass  # a dropped connection: the task's own calls report it; the claim expires by itself

    def release(self) -> None:
        """Remove the claim; never raises (it expires anyway)."""
        with self._lock:  # a renewal in flight finishes first, and none follows
            path, self.path = self.path, None
            self._stop.set()
        if path is None:
            return
        try:
            self.t.run(f"rm -f {shlex.quote(path)}", check=False)
        except Exception as e:  # noqa: BLE001 - a lost connection: the claim expires by itself
            say(f"[{self.t.name}] could not remove {path} ({e}); it expires within {self.ttl_s / 60:g} min")


def write_claim(t: Target, task: str, ttl_s: float = CLAIM_TTL_S) -> str:
    """Write jobs/.claim.<task>.json on `t`; returns its path."""
    t.run(claim_command(t, task, ttl_s))
    return t.path("jobs", f"{CLAIM_PREFIX}{task}.json")


def claim_command(t: Target, task: str, ttl_s: float) -> str:
    """The shell command that writes a claim: temp file, then rename; the expiry by the target's own clock."""
    path = t.path("jobs", f"{CLAIM_PREFIX}{task}.json")
    who = re.sub(r"[^A-Za-z0-9@._-]", "_", f"{getpass.getuser()}@{socket.gethostname()}")
    # The pod's id: on a network volume that several stacks' pods mount, jobs/ is shared; a claim holds one pod.
    pod_id = getattr(getattr(t, "pod", None), "id", None) or ""
    head = json.dumps({"task": task, "pod_id": pod_id, "by": f"fab {task} from {who}"})[:-1] + ', "expires_at": '
    tmp = f"{path}.{os.getpid()}.tmp"
    return (f"mkdir -p {shlex.quote(t.path('jobs'))} && e=$(( $(date +%s) + {int(ttl_s)} )) && "
            f"printf '%s%s}}\n' {shlex.quote(head)} \"$e\" > {shlex.quote(tmp)} && mv {shlex.quote(tmp)} {shlex.quote(path)}")


def release_claim(t: Target) -> None:
    """Release the task's claim on `t` (claim_pod), if it holds one."""
    claim = getattr(t, "claim", None)
    if claim is not None:
        claim.release()


def run_job(t: Target, name: str, command: str, *, follow: bool = True, env: dict | None = None,
            hint: bool = True, watch: bool = False, linger_minutes: float = 0.0, idle: bool = True) -> jobs.JobState:
    """Start `command` as detached job `name` on `t` (in the workspace, kit on PYTHONPATH) and follow it.

    `watch`: also start the pod's watchdog on it (watch_job), before following, so that the pod stops when the
    job ends even if this laptop goes away."""
    say(f"[{t.name}] {name}: {command}")
    jobs.start(t, name, command, env=env)
    if watch:
        watch_job(t, name, linger_minutes, idle)
    if not follow:
        if hint:
            say(f"[{t.name}] {name} runs detached; `fab logs --job {name} --follow --stack {t.name}` follows it")
        return jobs.state(t, name)
    return follow_job(t, name)


def follow_job(t: Target, name: str) -> jobs.JobState:
    st = jobs.follow(t, name)
    if st.state == "detached":
        return st
    if st.exit_code == 0:
        say(f"[{t.name}] {name}: done")
    elif st.state == "lost":
        raise SystemExit(
            f"error: [{t.name}] job '{name}' vanished without an exit code (the pod was stopped or restarted); "
            f"its log is {st.log}. Run the task again: every stage resumes."
        )
    else:
        raise SystemExit(f"error: [{t.name}] {name} failed with exit {st.exit_code}; the log is {st.log} (`fab logs --job {name}`)")
    return st


def py(t: Target, module: str, *args: str) -> str:
    return t.module_cmd(module, *args)


def latest_run(t: Target) -> str | None:
    """outputs/<run_id> with the newest metrics.jsonl (or config.json) on the target, or None."""
    q = shlex.quote(t.path(OUTPUTS))
    r = t.run(f"cd {q} 2>/dev/null && ls -1t */metrics.jsonl */config.json 2>/dev/null | head -1", check=False)
    line = r.stdout.strip()
    return line.split("/")[0] if line else None


def disk_lines(t: Target, run: str | None) -> list[str]:
    """Free space where the runs are written, and the run's last checkpoint: whether the next one fits (when it does
    not, ml.training drops older checkpoints early, or stops with the last one intact)."""
    cmd = f"df -Pk {shlex.quote(t.root)} 2>/dev/null | tail -n 1"
    if run:
        ck = shlex.quote(t.path(OUTPUTS, run, "checkpoints"))
        cmd += f'; cd {ck} 2>/dev/null && d=$(head -n 1 latest 2>/dev/null) && [ -d "$d" ] && du -sk "$d"'
    return disk_report(t.run(cmd, check=False).stdout, t.root)


def disk_report(text: str, where: str) -> list[str]:
    """disk_lines' reading of `df -Pk` (its last line) and, if any, `du -sk <last checkpoint>`."""
    lines = text.strip().splitlines()
    try:
        fields = lines[0].split()
        total, free = int(fields[1]) * 1024, int(fields[3]) * 1024
    except (IndexError, ValueError):
        return ["  disk: unknown (df failed)"]
    out = f"  disk: {free / 1e9:.1f} GB free of {total / 1e9:.0f} GB ({where})"
    if len(lines) > 1:
        kb, name = lines[1].split(None, 1)
        size = int(kb) * 1024
        out += f"; last checkpoint {name} {size / 1e9:.1f} GB"
        if free < size * 1.02:
            return [out, "  disk: less than one checkpoint free: the next one deletes older checkpoints early, or "
                         "stops the run (the last one stays); free space or raise networkVolumeGb / volumeGb"]
    return [out]


def last_metrics(t: Target, run: str) -> tuple[dict | None, dict | None]:
    """(last train line, last val line) of outputs/<run>/metrics.jsonl."""
    q = shlex.quote(t.path(OUTPUTS, run, "metrics.jsonl"))
    r = t.run(f"tail -n 200 {q} 2>/dev/null", check=False)
    train = val = None
    for line in r.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("kind", "train") == "train" and "loss" in d:
            train = d
        elif d.get("kind") == "val":
            val = d
    return train, val


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(max(s, 0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def since(t0: float) -> str:
    return f"{time.monotonic() - t0:.1f} s"
