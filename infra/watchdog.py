"""Autostop watchdog: runs on the pod beside a detached job and stops the pod when nobody needs it.

    python -m infra.watchdog --daemon --job-dir /workspace/jobs/train            # what `fab train` starts
    python -m infra.watchdog --job-dir /workspace/jobs/train --idle-minutes 30 \\
        --max-runtime-hours 48 --budget-usd 150 --pod-id $RUNPOD_POD_ID         # everything explicit

It stops the pod (stop, not terminate: the volume stays) when the first of these happens:

    job-ended    the job wrote <job-dir>/exit_code (success or failure)
    budget       projected spend (billed before this session + this session at the pod's $/h, up to the
                 next check) reaches the stack's budgetUsd
    max-runtime  the pod has run maxRuntimeHours (its own uptime, or ours if longer)
    idle         the GPUs stayed under --idle-util percent for autostopIdleMinutes (nvidia-smi)

Before the stop call it interrupts a job that is still running (Ctrl-C into its tmux session, so the
trainer can write its checkpoint), waits for in-flight atomic writes (temp files still growing under
outputs/), and calls sync(2): what is on the volume then is what the next start finds.

Several jobs, one pod. Every watchdog stops the whole pod, and jobs come and go: `fab infer` lingers 10 min
after its job, and a `fab train` started meanwhile (or in the seconds before the watchdog's next check) must
not lose its pod to the old job's watchdog. So a job-ended or idle stop stands down while another job holds
the pod (pod_owner): a job running with its own live watchdog, a live watchdog still lingering after its job,
an attended `fab` task that is about to start a job (a claim file, jobs/.claim.<task>.json, with an expiry),
or, for job-ended only, a busy job running without a watchdog. The decision is logged ("stood-down") and kept
in watchdog.json (`fab status` shows it); it is taken at each check and taken again right before the stop
call, after the flush. A stood-down watchdog goes on watching: budget and max-runtime stops never stand down
(they interrupt every running job so the trainer checkpoints, then stop the pod), and once no job holds the
pod for --handover-grace-seconds it re-arms and stops the pod itself. A watchdog that stood down is no owner,
so two watchdogs never wait for each other.

Robustness. API errors are retried with backoff, then retried forever at a capped interval with a loud
line in the log each time: the watchdog never exits leaving the pod running silently. It runs as two
processes: a supervisor that restarts the worker when it dies or hangs (no heartbeat; state is in
<job-dir>/watchdog.json, so the idle clock and the start time survive a restart) and, when the worker
keeps dying, stops the pod itself; and the worker, which carries on alone when the supervisor is killed.
RunPod's API has no server-side backstop for pods (no TTL, idle timeout or spend cap on a pod;
`idleTimeout` exists only for serverless workers), so when both processes are killed at once, or the
container hangs, nothing stops the pod: `fab status` reads the heartbeat in watchdog.json and says so.

Limits: the flags (`fab` fills them from the laptop's stack file), else the pod's environment, which
`pulumi up` sets (ULTRASHAPE_BUDGET_USD, ULTRASHAPE_AUTOSTOP_IDLE_MINUTES, ULTRASHAPE_MAX_RUNTIME_HOURS),
else the stack file shipped with the kit (--stack, default $ULTRASHAPE_STACK). The pod id and the API come
from RUNPOD_POD_ID, RUNPOD_API_KEY and RUNPOD_API_BASE. A value of 0 turns a check off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import fnmatch
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

STATE_FILE = "watchdog.json"
LOG_FILE = "watchdog.log"
EXIT_FILE = "exit_code"
# Temp names our writers use before the atomic rename: ml/training/checkpoint.py writes `.tmp-step_NNNNNNN/`
# and `.latest.tmp<pid>`, logs.py `.loss_curve.png.tmp.png`; others `x.tmp`, `x.partial`.
DEFAULT_TEMP_GLOBS = ("*.tmp", "*.tmp.*", "*.tmp[0-9]*", ".tmp*", "*.partial", "*.incomplete")
NVIDIA_SMI = "nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits"
EX_LOCKED = 75  # worker: another worker already watches this job (EX_TEMPFAIL)
CLAIM_PREFIX = ".claim."  # jobs/.claim.<task>.json: an attended `fab` task holds the pod until expires_at

REASONS = ("job-ended", "budget", "max-runtime", "idle")
# The stops that mean "nobody needs the pod": wrong while another job holds it, so they stand down. Budget and
# max-runtime protect the money whatever runs, and never do.
DEFERRABLE = ("job-ended", "idle")
# Jobs that keep a pod busy (remote/jobs.py names; playbooks/common.py starts them). Not tensorboard or setup:
# a TensorBoard left running must not keep a pod up.
BUSY_JOBS = ("train", "serve", "process", "weights", "infer")


# ------------------------------------------------------------------------------------------------
# Settings, observations, decisions
# ------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    job_dir: Path
    pod_id: str
    idle_minutes: float = 30.0  # 0: no idle stop
    max_runtime_hours: float = 24.0  # 0: no runtime cap
    budget_usd: float = 0.0  # 0: no budget cap
    stack: str = ""
    volume_ids: list[str] = field(default_factory=list)  # network volumes counted in the budget
    poll_s: float = 30.0
    idle_util_pct: float = 5.0  # a GPU under this utilisation counts as idle
    gpu_probe_cmd: str = NVIDIA_SMI
    flush_dirs: list[Path] = field(default_factory=list)
    temp_globs: tuple[str, ...] = DEFAULT_TEMP_GLOBS
    flush_timeout_s: float = 600.0  # longest wait for in-flight checkpoint writes
    flush_quiet_s: float = 30.0  # a temp file untouched this long is abandoned, not in flight
    interrupt_grace_s: float = 120.0  # after Ctrl-C, how long the job gets to checkpoint and exit
    stop_backoff_max_s: float = 300.0  # retry interval cap for a stop that keeps failing
    billing_timeout_s: float = 120.0  # give up on the billing baseline after this (budget then counts this session only)
    pod_refresh_s: float = 300.0  # re-read the pod ($/h, uptime, status) this often
    linger_s: float = 0.0  # keep the pod this long after the job ends (for a `fab fetch` right after); 0: stop at once
    start_grace_s: float = 120.0  # an exit_code already there at start is the previous run's for this long
    handover_grace_s: float = 120.0  # after standing down, stop only once no job has held the pod this long

    def __post_init__(self):
        self.job_dir = Path(self.job_dir)
        if not self.pod_id:
            raise ValueError("no pod id: pass --pod-id or run on the pod, where RUNPOD_POD_ID is set")
        for name in ("idle_minutes", "max_runtime_hours", "budget_usd"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 turns the check off)")
        if self.poll_s <= 0:
            raise ValueError("--poll-seconds must be > 0")
        if not self.flush_dirs:
            self.flush_dirs = default_flush_dirs(self.job_dir)


def default_flush_dirs(job_dir: Path) -> list[Path]:
    """The job's own dir, and the workspace's outputs/ when the job lives at <root>/jobs/<name>."""
    dirs = [Path(job_dir)]
    if Path(job_dir).parent.name == "jobs":
        dirs.append(Path(job_dir).parent.parent / "outputs")
    return dirs


@dataclass
class Observation:
    now: float
    exit_code: Optional[int]  # None while the job runs
    gpu_util: Optional[list[int]]  # None when unknown (no nvidia-smi: a CPU pod, or the probe failed)
    usd_per_hour: float
    uptime_s: float  # the longer of the pod's uptime and our own time since start


@dataclass
class Decision:
    stop: bool
    reason: str  # one of REASONS, or ok | lingering | stood-down | re-arming | already-stopped | watchdog-crash-loop
    detail: str
    owner: str = ""  # stood-down / re-arming: the job that holds the pod


@dataclass
class Peer:
    """Another holder of this pod, as the jobs folder shows it (Watchdog.peers reads it)."""

    name: str  # its job (jobs/<name>), or the task of a claim
    running: bool = False  # its job runs: no exit_code, tmux session alive
    watchdog: str = ""  # "live": its watchdog watches this pod | "stood-down": alive, but standing down too | ""
    claim: bool = False  # an attended `fab <name>` is about to start a job here (claim file not expired)

    def holds(self, reason: str) -> bool:
        """Does this peer make a `reason` stop wrong? A stood-down watchdog never holds the pod (else two
        watchdogs could wait for each other); an unwatched running job holds it against job-ended only: the
        idle stop is what still ends a job that hangs with nobody watching it."""
        if self.watchdog == "live" or self.claim:
            return True
        return reason == "job-ended" and self.running

    def describe(self) -> str:
        if self.claim:
            return f"`fab {self.name}` is starting a job on this pod (its claim); that job's watchdog takes over"
        if self.watchdog == "live" and self.running:
            return f"job {self.name} now runs on this pod and its watchdog owns the pod"
        if self.watchdog == "live":
            return f"job {self.name} has ended but its watchdog still holds this pod (it stops the pod itself)"
        whose = "its watchdog stood down too" if self.watchdog else "without a watchdog"
        return (f"job {self.name} runs on this pod {whose}; stopping the pod would kill it "
                f"(this watchdog stops the pod once no job runs)")


def pod_owner(peers: list[Peer], reason: str) -> Optional[Peer]:
    """The peer that now holds the pod against a `reason` stop, or None: then the stop goes ahead.
    Only job-ended and idle stops can be held; a running job with its own watchdog comes first."""
    if reason not in DEFERRABLE:
        return None
    holders = [p for p in peers if p.holds(reason)]
    rank = lambda p: (not (p.watchdog == "live" and p.running), p.watchdog != "live", not p.claim)  # noqa: E731
    return min(holders, key=rank, default=None)


@dataclass
class State:
    """What survives a worker restart (<job-dir>/watchdog.json, written atomically)."""

    pod_id: str
    started_at: float  # when the first worker started (our clock)
    session: str = ""  # the supervisor's run; only a worker of the same run resumes this state
    idle_since: Optional[float] = None
    billed_before_usd: Optional[float] = None  # stack spend billed when we started; None until known
    usd_per_hour: float = 0.0
    pod_uptime_s: float = 0.0
    pod_uptime_at: Optional[float] = None  # our clock when pod_uptime_s was read
    last_check: Optional[float] = None
    heartbeat: Optional[float] = None  # wall-clock time of the worker's last sign of life (the supervisor reads it)
    last_decision: str = ""
    projected_usd: Optional[float] = None
    worker_pid: Optional[int] = None
    supervisor_pid: Optional[int] = None
    restarts: int = 0
    job_ended_at: Optional[float] = None  # when we first saw the exit code
    stale_exit_mtime: Optional[float] = None  # mtime of an exit_code that predates us (a previous run's)
    outcome: str = "watching"  # watching | stopping | stopped | stop-failing
    reason: str = ""
    stood_down_for: str = ""  # the job (or claim) that holds the pod while this watchdog stands down; "" when armed
    stood_down_detail: str = ""
    owner_seen_at: Optional[float] = None  # when a holder was last seen (the hand-over grace counts from it)
    poll_s: float = 30.0
    settings: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Optional["State"]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=1, default=str))


def decide(s: Settings, st: State, obs: Observation, peers: Optional[list[Peer]] = None) -> Decision:
    """The whole policy, as a pure function of the settings, the persisted state, one observation and the other
    holders of the pod (`peers`; None: not looked at, as when no stop is due).
    Precedence: a finished job first (it explains everything after it), then money, then time, then idleness.
    A job-ended or idle stop stands down while a peer holds the pod (pod_owner), and for handover_grace_s after
    the last holder went (the next stage of a `fab train` may be seconds away); money and time never do."""
    ended = lingering = None
    if obs.exit_code is not None:
        waited = obs.now - (st.job_ended_at if st.job_ended_at is not None else obs.now)
        if waited >= s.linger_s:
            ended = Decision(True, "job-ended", f"job exit code {obs.exit_code}")
        else:
            lingering = Decision(False, "lingering", f"job ended (exit {obs.exit_code}); stopping in {s.linger_s - waited:.0f} s")
    cap = None
    if s.budget_usd > 0:
        projected = projected_usd(s, st, obs)
        if projected >= s.budget_usd:
            cap = Decision(True, "budget", f"projected ${projected:.2f} >= budget ${s.budget_usd:.2f} "
                           f"(billed ${st.billed_before_usd or 0:.2f} + ${obs.usd_per_hour:.2f}/h)")
    if cap is None and s.max_runtime_hours > 0 and obs.uptime_s >= s.max_runtime_hours * 3600:
        cap = Decision(True, "max-runtime", f"ran {obs.uptime_s / 3600:.2f} h >= {s.max_runtime_hours:g} h")
    idle = None
    if s.idle_minutes > 0 and st.idle_since is not None and obs.now - st.idle_since >= s.idle_minutes * 60:
        idle = Decision(True, "idle", f"GPU idle (< {s.idle_util_pct:g}%) for {(obs.now - st.idle_since) / 60:.1f} min "
                        f">= {s.idle_minutes:g} min")

    def held(d: Optional[Decision]) -> Optional[Decision]:
        """`d` stood down, when a peer holds the pod against it (or held it less than the grace ago)."""
        owner = pod_owner(peers or [], d.reason) if d is not None else None
        if owner is not None:
            return Decision(False, "stood-down", f"stood down ({d.reason}): {owner.describe()}", owner.name)
        if d is not None and st.stood_down_for and st.owner_seen_at is not None:
            left = s.handover_grace_s - (obs.now - st.owner_seen_at)
            if left > 0:
                return Decision(False, "re-arming", f"{d.reason}: {st.stood_down_for} no longer holds the pod; "
                                f"stopping in {left:.0f} s unless a job takes it", st.stood_down_for)
        return None

    if ended is not None and held(ended) is None:
        return ended
    if cap is not None:
        return cap
    if idle is not None and held(idle) is None:
        return idle
    return held(ended) or held(idle) or lingering or Decision(False, "ok", "")


def projected_usd(s: Settings, st: State, obs: Observation) -> float:
    """Billed spend before this session + this session at the pod's rate, up to the moment the next check could
    act (one poll, plus the flush and the stop call). Billing buckets lag the meter, so the live part comes from
    our clock; the session's first minutes may be counted twice, which errs toward stopping early."""
    elapsed = max(0.0, obs.now - st.started_at)
    lookahead = s.poll_s + 60.0
    return (st.billed_before_usd or 0.0) + obs.usd_per_hour * (elapsed + lookahead) / 3600.0


def update_idle(s: Settings, st: State, obs: Observation) -> None:
    """Idle clock: starts at the first idle sample, resets on any busy sample, untouched when unknown."""
    if obs.gpu_util is None:
        return
    idle = max(obs.gpu_util, default=0) < s.idle_util_pct
    if idle and st.idle_since is None:
        st.idle_since = obs.now
    elif not idle:
        st.idle_since = None


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------


def nvidia_smi_probe(cmd: str = NVIDIA_SMI, timeout: float = 20.0) -> Optional[list[int]]:
    """GPU utilisation in percent, one int per GPU; None when it cannot be read (no GPU, no driver, hung)."""
    try:
        out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    vals = []
    for line in out.stdout.splitlines():
        line = line.strip().rstrip("%").strip()
        if not line:
            continue
        try:
            vals.append(int(float(line)))
        except ValueError:
            return None  # "[N/A]" or an error text: unknown, not idle
    return vals or None


def read_exit_code(job_dir: Path) -> Optional[int]:
    """The job's exit status once it has ended (remote/jobs.py writes exit_code atomically)."""
    try:
        text = (Path(job_dir) / EXIT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return -1  # present but unreadable: the job has ended, how is unknown


def _mtime(p: Path) -> Optional[float]:
    try:
        return Path(p).stat().st_mtime
    except OSError:
        return None


def in_flight_writes(dirs: list[Path], globs: tuple[str, ...], now: float, quiet_s: float) -> list[Path]:
    """Temp files/dirs (the first half of an atomic write) modified within the last `quiet_s` seconds."""
    found = []
    for d in dirs:
        if not Path(d).is_dir():
            continue
        for root, dirnames, filenames in os.walk(d):
            for name in list(filenames) + list(dirnames):
                if name.startswith(".watchdog"):
                    continue  # our own state file's atomic write
                if any(fnmatch.fnmatch(name, g) for g in globs):
                    p = Path(root) / name
                    try:
                        mtime = _latest_mtime(p)
                    except OSError:
                        continue  # renamed away while we looked: that write finished
                    if now - mtime < quiet_s:
                        found.append(p)
    return found


def _latest_mtime(p: Path) -> float:
    if not p.is_dir():
        return p.stat().st_mtime
    latest = p.stat().st_mtime
    for root, _, files in os.walk(p):
        for f in files:
            try:
                latest = max(latest, (Path(root) / f).stat().st_mtime)
            except OSError:
                pass
    return latest


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------


class Watchdog:
    """One watchdog worker. Every collaborator with a side effect is injectable for tests: `client` (a
    RunPodClient), `clock` and `sleep` (an emulator's controllable clock), `gpu_probe`."""

    def __init__(
        self,
        settings: Settings,
        client,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        gpu_probe: Optional[Callable[[], Optional[list[int]]]] = None,
        fs_clock: Callable[[], float] = time.time,
        sync: Callable[[], None] = os.sync,
        interrupt_job: Optional[Callable[[Path], bool]] = None,
        echo: Optional[Callable[[str], None]] = None,
        session: str = "",
    ):
        self.s = settings
        self.client = client
        self.clock = clock
        self._sleep = sleep
        self.gpu_probe = gpu_probe or (lambda: nvidia_smi_probe(settings.gpu_probe_cmd))
        self.fs_clock = fs_clock  # file mtimes are real time whatever the test clock says
        self.sync = sync
        self.interrupt_job = interrupt_job or interrupt_tmux_job
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.s.job_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.s.job_dir / STATE_FILE
        self.log_path = self.s.job_dir / LOG_FILE
        prev = State.load(self.state_path)
        # Resume only our own supervisor's state: a watchdog killed with its container (`fab teardown`, a pod
        # stop) leaves "watching" behind, and its start time and billing baseline belong to that old session.
        if (prev is not None and session and prev.session == session and prev.pod_id == self.s.pod_id
                and prev.outcome in ("watching", "stopping", "stop-failing")):
            self.st = prev  # a restarted worker: keep the start time, the idle clock and the billing baseline
            self.st.restarts += 1
            self.log("resume", restarts=self.st.restarts, started_at=_iso(self.st.started_at),
                     idle_since=_iso(self.st.idle_since) if self.st.idle_since else None)
        else:
            self.st = State(pod_id=self.s.pod_id, started_at=self.clock(), session=session)
            # `fab train` may start us a moment before the job, whose start removes the previous run's
            # exit_code; until then that file says nothing about the job we watch.
            self.st.stale_exit_mtime = _mtime(self.s.job_dir / EXIT_FILE)
            self.log("start", settings=_settings_summary(self.s),
                     stale_exit_code=self.st.stale_exit_mtime is not None)
        self.st.worker_pid = os.getpid()
        self.st.heartbeat = time.time()  # alive from the start: another job's watchdog may look before our first wait
        self.st.poll_s = self.s.poll_s
        self.st.settings = _settings_summary(self.s)
        self._last_pod_read: Optional[float] = None
        self._probe_failed = False
        self.save()

    # ---- bookkeeping -----------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Every wait of every loop (watch, interrupt, flush, stop) beats the heart first: a worker whose
        heartbeat stops (a hung sync or filesystem) is killed and restarted by its supervisor."""
        self.st.heartbeat = time.time()
        self.save()
        self._sleep(seconds)

    def log(self, event: str, **fields) -> None:
        """Every decision goes to <job-dir>/watchdog.log (JSON lines) and to stderr (one readable line)."""
        now = self.clock()
        rec = {"time": _iso(now), "t": now, "event": event, "pid": os.getpid(), **fields}
        line = json.dumps(rec, default=str)
        try:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")
        except OSError as e:  # a full or vanished volume must not stop the watchdog from stopping the pod
            self.echo(f"[watchdog] cannot write {self.log_path}: {e}")
        extras = " ".join(f"{k}={v}" for k, v in fields.items() if k != "settings")
        self.echo(f"[watchdog {_iso(now)}] {event} {extras}".rstrip())

    def save(self) -> None:
        try:
            self.st.save(self.state_path)
        except OSError as e:
            self.echo(f"[watchdog] cannot write {self.state_path}: {e}")

    # ---- observing -------------------------------------------------------------------------

    def _refresh_pod(self, force: bool = False) -> Optional[str]:
        """Re-read the pod every pod_refresh_s: its $/h, its uptime, and whether someone else stopped it."""
        now = self.clock()
        if not force and self._last_pod_read is not None and now - self._last_pod_read < self.s.pod_refresh_s:
            return None
        try:
            pod = self.client.get_pod(self.s.pod_id)
        except Exception as e:  # keep the last known rate; the checks that need no API go on
            self.log("api-error", call="get_pod", error=str(e))
            return None
        self._last_pod_read = now
        if pod.cost_per_hr > 0:
            # `cost` is the compute rate; the container disk and a host-local volume bill on top while running
            # (the network volume bills on its own, counted only with --volume-id).
            from infra.cost import Prices

            p = Prices()
            disk_gb = (pod.disk_gb or 0) + (pod.volume_gb or 0)
            self.st.usd_per_hour = pod.cost_per_hr + disk_gb * p.pod_volume_running_usd_per_gb_month / p.hours_per_month
        if pod.uptime_seconds is not None:
            self.st.pod_uptime_s = float(pod.uptime_seconds)
            self.st.pod_uptime_at = now
        return pod.status

    def _billing_baseline(self) -> None:
        """Spend already billed to this stack's pod and volumes, once, at the first start."""
        if self.s.budget_usd <= 0 or self.st.billed_before_usd is not None:
            return
        from infra.cost import stack_spend

        deadline = self.clock() + self.s.billing_timeout_s
        delay = 2.0
        while True:
            try:
                spend = stack_spend(self.client, self.s.stack or "?", [self.s.pod_id], list(self.s.volume_ids),
                                    until=dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc))
                self.st.billed_before_usd = spend.total_usd
                self.log("billing-baseline", billed_usd=round(spend.total_usd, 4), pods=spend.pod_usd,
                         volumes=spend.volume_usd)
                return
            except Exception as e:
                if self.clock() >= deadline:
                    # Counting only this session still caps it; say so rather than wait forever to start.
                    self.st.billed_before_usd = 0.0
                    self.log("billing-unavailable", error=str(e),
                             note="budget counts this session's spend only")
                    return
                self.log("api-error", call="billing", error=str(e), retry_in_s=delay)
                self.sleep(delay)
                delay = min(delay * 2, 30.0)

    def observe(self) -> Observation:
        now = self.clock()
        gpu = None
        try:
            gpu = self.gpu_probe()
        except Exception as e:  # a broken probe means "unknown", never "idle"
            self.log("gpu-probe-error", error=str(e))
        if gpu is None and not self._probe_failed:
            self._probe_failed = True
            self.log("gpu-unknown", note="no GPU utilisation (no nvidia-smi, or it failed): idle stop is inactive "
                     "until it answers; job end, runtime and budget still apply")
        elif gpu is not None:
            self._probe_failed = False
        ours = now - self.st.started_at
        theirs = 0.0
        if self.st.pod_uptime_at is not None:
            theirs = self.st.pod_uptime_s + (now - self.st.pod_uptime_at)
        return Observation(now=now, exit_code=self.job_exit_code(now), gpu_util=gpu,
                           usd_per_hour=self.st.usd_per_hour, uptime_s=max(ours, theirs))

    def job_exit_code(self, now: float) -> Optional[int]:
        code = read_exit_code(self.s.job_dir)
        if code is None or self.st.stale_exit_mtime is None:
            return code
        if _mtime(self.s.job_dir / EXIT_FILE) != self.st.stale_exit_mtime:
            self.st.stale_exit_mtime = None  # a new run has ended
            return code
        if now - self.st.started_at < self.s.start_grace_s:
            return None  # the previous run's: the job we watch has not started yet
        return code  # no job came: the pod has nothing to do

    def peers(self) -> list[Peer]:
        """The other holders of this pod: jobs beside ours under jobs/, their watchdogs, and fab's claims."""
        return scan_peers(self.s.job_dir, self.s.pod_id)

    def check(self) -> Decision:
        """One round: observe, update the idle clock, decide, log, persist."""
        # Standing down, we look at the pod every round: the owner's watchdog stopping it ends our watch too.
        status = self._refresh_pod(force=bool(self.st.stood_down_for))
        if status in ("EXITED", "TERMINATED"):
            return Decision(True, "already-stopped", f"pod is {status} (stopped by someone else)")
        obs = self.observe()
        if obs.exit_code is None:
            self.st.job_ended_at = None  # a new run of the job removed the last exit_code
        elif self.st.job_ended_at is None:
            self.st.job_ended_at = obs.now
        update_idle(self.s, self.st, obs)
        d = decide(self.s, self.st, obs)
        if self.st.stood_down_for or (d.stop and d.reason in DEFERRABLE):
            d = decide(self.s, self.st, obs, self.peers())  # the jobs folder is read only when it matters
        self._note_stand_down(d, obs.now)
        self.st.last_check = obs.now
        self.st.last_decision = d.reason
        self.st.projected_usd = round(projected_usd(self.s, self.st, obs), 4) if self.s.budget_usd > 0 else None
        self.log("check", decision=d.reason, detail=d.detail or None, exit_code=obs.exit_code, gpu=obs.gpu_util,
                 idle_s=round(obs.now - self.st.idle_since, 1) if self.st.idle_since is not None else 0,
                 uptime_h=round(obs.uptime_s / 3600, 3), usd_per_hour=obs.usd_per_hour,
                 projected_usd=self.st.projected_usd)
        self.save()
        return d

    def _note_stand_down(self, d: Decision, now: float) -> None:
        """Log the stand-down when it starts or changes hands, and the re-arming when it ends."""
        if d.reason == "stood-down":
            self.st.owner_seen_at = now
            if (self.st.stood_down_for, self.st.stood_down_detail) != (d.owner, d.detail):  # new, or changed hands
                self.log("stood-down", owner=d.owner, detail=d.detail,
                         note="budget and max-runtime still stop the pod from here")
            self.st.stood_down_for, self.st.stood_down_detail = d.owner, d.detail
        elif d.reason == "re-arming":
            if not self.st.stood_down_detail.startswith(d.reason):
                self.log("re-arming", was=self.st.stood_down_for, grace_s=self.s.handover_grace_s)
            self.st.stood_down_detail = f"{d.reason}: {d.detail}"
        elif self.st.stood_down_for:
            self.log("re-armed", was=self.st.stood_down_for, decision=d.reason, detail=d.detail or None)
            self.st.stood_down_for, self.st.stood_down_detail, self.st.owner_seen_at = "", "", None

    # ---- acting ----------------------------------------------------------------------------

    def run(self) -> str:
        """Watch until a stop condition, then flush and stop the pod. Returns the reason."""
        self._refresh_pod(force=True)
        self._billing_baseline()
        self.save()
        while True:
            d = self.check()
            if d.stop:
                if d.reason == "already-stopped":
                    self.st.outcome, self.st.reason = "stopped", d.reason
                    self.log("done", reason=d.reason, detail=d.detail)
                    self.save()
                    return d.reason
                if self.shutdown(d):
                    return d.reason
                # another job took the pod while we flushed: watch on (stood down)
            self.sleep(self.s.poll_s)

    def shutdown(self, d: Decision) -> bool:
        """Interrupt, flush, stop. False when the stop stood down at the last moment (see stop_pod)."""
        self.st.outcome, self.st.reason = "stopping", d.reason
        self.log("decision", action="stop", reason=d.reason, detail=d.detail)
        self.save()
        running = [self.s.job_dir] if read_exit_code(self.s.job_dir) is None else []  # let it checkpoint first
        if d.reason not in DEFERRABLE:
            # Money or time: the pod stops under every job on it, so every one gets its Ctrl-C (a training that
            # our job's end left running checkpoints too). A job-ended or idle stop found none running.
            running += [self.s.job_dir.parent / p.name for p in self.peers() if p.running and not p.claim]
        if running:
            self._interrupt(running)
        self.flush()
        return self.stop_pod()

    def _interrupt(self, job_dirs: list[Path]) -> None:
        """Jobs still running get Ctrl-C (the trainer checkpoints on it) and interrupt_grace_s to exit."""
        sent_to = []
        for job_dir in job_dirs:
            try:
                sent = self.interrupt_job(job_dir)
            except Exception as e:
                sent = False
                self.log("interrupt-error", job=job_dir.name, error=str(e))
            self.log("interrupt", job=job_dir.name, sent=sent, grace_s=self.s.interrupt_grace_s)
            if sent:
                sent_to.append(job_dir)
        deadline = self.clock() + self.s.interrupt_grace_s
        while sent_to:
            for job_dir in [j for j in sent_to if read_exit_code(j) is not None]:
                self.log("job-exited", job=job_dir.name, exit_code=read_exit_code(job_dir))
                sent_to.remove(job_dir)
            if not sent_to:
                return
            if self.clock() >= deadline:
                break
            self.sleep(min(2.0, self.s.poll_s))
        if sent_to:
            self.log("job-still-running", jobs=[j.name for j in sent_to],
                     note="stopping anyway; checkpoints already renamed into place are safe")

    def _stand_down_before_stop(self) -> bool:
        """Right before the stop call, after the flush: has another job taken the pod meanwhile (a `fab train`
        started while we lingered or flushed)? Then stand down and watch on. Only job-ended and idle stops ask."""
        if self.st.reason not in DEFERRABLE:
            return False
        d = self.check()
        if d.stop:
            return False
        self.st.outcome, self.st.reason = "watching", ""
        self.log("stop-cancelled", decision=d.reason, detail=d.detail, note="the stop call was not made")
        self.save()
        return True

    def flush(self) -> None:
        """Wait for in-flight atomic writes (temp files still changing), then sync(2)."""
        self.sync()
        deadline = self.clock() + self.s.flush_timeout_s
        waited = False
        while True:
            busy = in_flight_writes(self.s.flush_dirs, self.s.temp_globs, self.fs_clock(), self.s.flush_quiet_s)
            if not busy:
                break
            if self.clock() >= deadline:
                self.log("flush-timeout", in_flight=[str(p) for p in busy[:10]],
                         note="stopping anyway; a half-written temp file is never renamed into place")
                break
            if not waited:
                self.log("flush-wait", in_flight=[str(p) for p in busy[:10]])
                waited = True
            self.sleep(2.0)
        self.sync()
        self.log("flushed", dirs=[str(p) for p in self.s.flush_dirs])

    def stop_pod(self) -> bool:
        """POST stop until the pod is EXITED. Never gives up: a pod left running is a bill. False when a job-ended
        or idle stop stood down instead, because another job took the pod before the call."""
        attempt = 0
        while True:
            try:
                pod = self.client.get_pod(self.s.pod_id)
                if pod.status in ("EXITED", "TERMINATED"):
                    self._stopped(pod.status)
                    return True
                if pod.raw.get("locked"):
                    self.log("pod-locked", note="the pod is locked, which prevents stopping; unlock it in the "
                             "RunPod console or `fab teardown` will fail too")
                if self._stand_down_before_stop():
                    return False
                self.log("stop-request", attempt=attempt + 1)
                pod = self.client.stop_pod(self.s.pod_id)
                if pod is None or pod.status in ("EXITED", "TERMINATED"):
                    self._stopped(pod.status if pod else "TERMINATED")
                    return True
                self.log("stop-pending", status=pod.status)
            except Exception as e:
                code = getattr(e, "status_code", None)
                if code == 404:
                    self._stopped("TERMINATED")
                    return True
                self.st.outcome = "stop-failing"
                self.save()
                # Loud every time: `fab status` shows the last lines of this log.
                self.log("stop-failed", attempt=attempt + 1, status_code=code, error=str(e),
                         note="the pod is STILL RUNNING and billed; retrying")
            attempt += 1
            self.sleep(min(self.s.stop_backoff_max_s, 2.0 * (2 ** min(attempt, 10))))

    def _stopped(self, status: str) -> None:
        self.st.outcome = "stopped"
        self.log("stopped", status=status, reason=self.st.reason)
        self.save()


def scan_peers(job_dir: Path, pod_id: str, now: Optional[float] = None) -> list[Peer]:
    """The other holders of the pod, from the jobs folder (<root>/jobs, remote/jobs.py's layout) beside `job_dir`.

    A watchdog counts as live when its watchdog.json names this pod, is still watching (or stopping), beat its
    heart within 3 polls + a minute (wall clock, as health() judges it) and its worker's pid exists here. A job
    runs when it has no exit_code and its tmux session lives. Unreadable means absent: when in doubt, stop."""
    job_dir = Path(job_dir)
    root = job_dir.parent
    now = time.time() if now is None else now
    peers: list[Peer] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return peers
    for d in entries:
        if d.name == job_dir.name:
            continue  # our own job: never a reason to stand down
        if d.name.startswith(CLAIM_PREFIX) and d.name.endswith(".json"):
            claim = _read_claim(d, pod_id, now)
            if claim:
                peers.append(Peer(claim, claim=True))
            continue
        if not d.is_dir():
            continue
        watchdog = ""
        st = State.load(d / STATE_FILE)
        if (st is not None and st.pod_id == pod_id and st.outcome in ("watching", "stopping", "stop-failing")
                and _alive(st, now)):
            watchdog = "stood-down" if st.stood_down_for else "live"
        running = False
        if (watchdog or d.name in BUSY_JOBS) and read_exit_code(d) is None:
            running = tmux_job_alive(d)
        if watchdog or running:
            peers.append(Peer(d.name, running=running, watchdog=watchdog))
    return peers


def _alive(st: State, now: float) -> bool:
    if st.heartbeat is None or now - st.heartbeat > 3 * (st.poll_s or 30.0) + 60:
        return False
    if st.worker_pid:
        try:
            os.kill(st.worker_pid, 0)
        except ProcessLookupError:
            return False  # killed: its heartbeat is a ghost
        except OSError:
            pass  # exists, not ours to signal
    return True


def _read_claim(path: Path, pod_id: str, now: float) -> str:
    """The task of an unexpired claim on this pod (playbooks/common.py claim_pod writes it), else "". The pod id
    matters: a network volume, and its jobs/ folder, may be mounted by another stack's pod at the same time."""
    try:
        data = json.loads(path.read_text())
        if float(data["expires_at"]) > now and data.get("pod_id") == pod_id:
            return str(data.get("task") or path.name[len(CLAIM_PREFIX):-len(".json")])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ""


def tmux_job_alive(job_dir: Path) -> bool:
    """Does the job's tmux session (remote/jobs.py: socket <root>/jobs/tmux.sock, session in job.json) live?"""
    job_dir = Path(job_dir)
    try:
        session = json.loads((job_dir / "job.json").read_text()).get("session")
    except (OSError, ValueError, AttributeError):
        return False
    sock = job_dir.parent / "tmux.sock"
    if not session or not sock.exists():
        return False
    try:
        r = subprocess.run(["tmux", "-S", str(sock), "has-session", "-t", f"={session}"], capture_output=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def interrupt_tmux_job(job_dir: Path) -> bool:
    """Ctrl-C into the job's tmux session (remote/jobs.py: socket <root>/jobs/tmux.sock, session in job.json)."""
    job_dir = Path(job_dir)
    try:
        session = json.loads((job_dir / "job.json").read_text()).get("session")
    except (OSError, ValueError):
        return False
    sock = job_dir.parent / "tmux.sock"
    if not session or not sock.exists():
        return False
    # "=name:" — exact session match, its current window; a bare "=name" is not a pane target for send-keys.
    r = subprocess.run(["tmux", "-S", str(sock), "send-keys", "-t", f"={session}:", "C-c"],
                       capture_output=True, timeout=20)
    return r.returncode == 0


# ------------------------------------------------------------------------------------------------
# Supervisor: restarts the worker; stops the pod itself when the worker keeps dying
# ------------------------------------------------------------------------------------------------


def hang_limit(s: Settings, outcome: str, hang_s: Optional[float] = None) -> float:
    """How long a worker may go without a heartbeat before it counts as hung. Stopping includes the job's
    interrupt grace and the checkpoint flush, which beat only every few seconds but may legitimately be long."""
    base = hang_s if hang_s is not None else max(10 * s.poll_s, 600.0)
    if outcome == "stopping":
        return base + s.interrupt_grace_s + s.flush_timeout_s
    return base


def supervise(argv: list[str], s: Settings, *, max_restarts: int = 5, restart_window_s: float = 600.0,
              client_factory=None, hang_s: Optional[float] = None) -> int:
    """Run the worker (`--worker` + the same arguments) and restart it when it dies unexpectedly."""
    lock = _try_lock(lock_path(s.job_dir))
    if lock is None:
        print(f"[watchdog] {s.job_dir} is already watched by another supervisor; nothing to do", file=sys.stderr)
        return 0
    deaths: list[float] = []
    me = os.getpid()
    session = f"{me}-{time.time_ns()}"
    _write_supervisor_pid(s.job_dir, me)
    log = _LogOnly(s.job_dir)
    while True:
        cmd = [sys.executable, "-m", "infra.watchdog", "--worker", "--session", session, *argv]
        # Own session: a kill aimed at the job's process group or tmux session does not reach the worker.
        proc = subprocess.Popen(cmd, start_new_session=True)
        started = time.time()
        log("worker-started", worker_pid=proc.pid, supervisor_pid=me)
        while True:
            try:
                rc = proc.wait(timeout=min(s.poll_s, 30.0))
                break
            except subprocess.TimeoutExpired:
                pass
            st = State.load(s.job_dir / STATE_FILE)
            if st is None or st.session != session or st.worker_pid != proc.pid:
                beat, outcome = started, "watching"  # not written yet: count from its start
            else:
                beat, outcome = (st.heartbeat or started), st.outcome
            if time.time() - beat > hang_limit(s, outcome, hang_s):
                log("worker-hung", worker_pid=proc.pid, silent_s=round(time.time() - beat, 1), outcome=outcome)
                proc.kill()
                rc = proc.wait()
                break
        st = State.load(s.job_dir / STATE_FILE)
        if rc == 0 and st is not None and st.outcome == "stopped":
            log("worker-done", reason=st.reason)
            return 0
        if rc == EX_LOCKED:
            # An orphaned worker (its supervisor was killed) still watches: wait, then take over if it dies.
            time.sleep(s.poll_s)
            continue
        now = time.time()
        deaths = [t for t in deaths if now - t < restart_window_s] + [now]
        log("worker-died", returncode=rc, deaths_in_window=len(deaths))
        if len(deaths) > max_restarts:
            log("crash-loop", note=f"worker died {len(deaths)} times in {restart_window_s:.0f} s; "
                "stopping the pod from the supervisor: a pod nobody watches must not run")
            client = (client_factory or _make_client)()
            wd = Watchdog(s, client, session=session)
            wd.st.outcome = "stopping"
            wd.shutdown(Decision(True, "watchdog-crash-loop", f"worker died {len(deaths)} times"))
            return 0
        time.sleep(min(30.0, 2.0 * len(deaths)))


class _LogOnly:
    """The supervisor's log lines, in the same file as the worker's."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / LOG_FILE

    def __call__(self, event: str, **fields):
        now = time.time()
        line = json.dumps({"time": _iso(now), "t": round(now, 3), "event": event, "pid": os.getpid(), **fields})
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass
        print(f"[watchdog-supervisor {_iso(now)}] {event} " + " ".join(f"{k}={v}" for k, v in fields.items()),
              file=sys.stderr, flush=True)


def _write_supervisor_pid(job_dir: Path, pid: int) -> None:
    atomic_write(Path(job_dir) / "watchdog.supervisor.pid", f"{pid}\n")


def lock_path(job_dir: Path, role: str = "supervisor") -> Path:
    """Where the one-watchdog-per-job lock lives: container-local temp, not the volume. A network volume may
    not support flock, or may keep a dead container's lock for a while, and a watchdog that refuses to start
    because of a ghost would leave the pod unwatched. The container's temp dies with the container."""
    key = hashlib.sha1(str(Path(job_dir).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ultrashape-watchdog-{key}.{role}.lock"


def _try_lock(path: Path):
    """The lock's open file (keep it referenced), None when another process holds it, or True when this
    filesystem has no flock (then we run unlocked: a second watchdog is harmless, a missing one is not)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        print(f"[watchdog] cannot lock {path} ({e}); running without the single-instance lock", file=sys.stderr)
        return True
    return f  # keep the file object alive: the lock lives as long as it does


# ------------------------------------------------------------------------------------------------
# Health, for `fab status` (reads the files a remote `cat` returns)
# ------------------------------------------------------------------------------------------------


@dataclass
class Health:
    running: bool
    outcome: str
    reason: str
    last_check_age_s: Optional[float]
    projected_usd: Optional[float]
    message: str


def health(state_json: str, now: Optional[float] = None) -> Health:
    """Is the watchdog alive? From watchdog.json's text. Stale = no check for 3 polls + a minute."""
    now = time.time() if now is None else now
    try:
        st = State(**{k: v for k, v in json.loads(state_json).items() if k in State.__dataclass_fields__})
    except (ValueError, TypeError):
        return Health(False, "absent", "", None, None,
                      "no watchdog state: this pod will NOT stop by itself; `fab teardown` when done")
    seen = max([t for t in (st.last_check, st.heartbeat) if t is not None], default=None)
    age = None if seen is None else now - seen
    stale = age is None or age > 3 * st.poll_s + 60
    if st.outcome == "stopping" and not stale:
        return Health(True, st.outcome, st.reason, age, st.projected_usd,
                      f"watchdog is stopping the pod ({st.reason}): flushing checkpoints, then the stop call")
    if st.outcome == "stopped":
        return Health(False, st.outcome, st.reason, age, st.projected_usd, f"watchdog stopped the pod ({st.reason})")
    if st.stood_down_for and not stale and st.outcome == "watching":
        return Health(True, "stood-down", st.reason, age, st.projected_usd,
                      f"watchdog {st.stood_down_detail or 'stood down for ' + st.stood_down_for}; "
                      f"it still stops the pod for budget or max runtime")
    if st.outcome == "stop-failing":
        return Health(not stale, st.outcome, st.reason, age, st.projected_usd,
                      f"watchdog is FAILING to stop the pod ({st.reason}); see watchdog.log, then `fab teardown`")
    if stale:
        ago = "never" if age is None else f"{age / 60:.0f} min ago"
        return Health(False, st.outcome, st.reason, age, st.projected_usd,
                      f"watchdog NOT RUNNING (last check {ago}): this pod will not stop by itself; `fab teardown` when done")
    proj = f", projected ${st.projected_usd:.2f}" if st.projected_usd is not None else ""
    return Health(True, st.outcome, st.reason, age, st.projected_usd,
                  f"watchdog watching (last check {age:.0f} s ago{proj})")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ".watchdog*": in_flight_writes skips our own
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _iso(t: Optional[float]) -> Optional[str]:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _settings_summary(s: Settings) -> dict:
    return {"job_dir": str(s.job_dir), "pod_id": s.pod_id, "stack": s.stack, "idle_minutes": s.idle_minutes,
            "max_runtime_hours": s.max_runtime_hours, "budget_usd": s.budget_usd, "poll_s": s.poll_s,
            "linger_s": s.linger_s, "handover_grace_s": s.handover_grace_s,
            "volume_ids": list(s.volume_ids)}


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        return float(v)
    except ValueError:
        raise SystemExit(f"watchdog: environment variable {name}={v!r} is not a number")


def _make_client():
    from infra.runpod import RunPodClient

    return RunPodClient()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m infra.watchdog",
        description="Stop this pod when its job ends, its GPU idles, its runtime or its budget runs out.",
    )
    ap.add_argument("--job-dir", type=Path, default=Path("jobs/train"),
                    help="the detached job's directory, holding its exit_code (default: jobs/train under the "
                         "current directory, which is the workspace root for jobs remote/jobs.py starts)")
    ap.add_argument("--pod-id", default=os.environ.get("RUNPOD_POD_ID", ""), help="default: $RUNPOD_POD_ID")
    ap.add_argument("--stack", default=os.environ.get("ULTRASHAPE_STACK", ""),
                    help="stack name; with a Pulumi.<stack>.yaml at hand its settings are the defaults")
    ap.add_argument("--idle-minutes", type=float, default=None,
                    help="GPU idle minutes before stopping (default: the stack's autostopIdleMinutes; 0: off)")
    ap.add_argument("--max-runtime-hours", type=float, default=None,
                    help="stop after this many hours of pod uptime (default: maxRuntimeHours; 0: off)")
    ap.add_argument("--budget-usd", type=float, default=None, help="stack spend cap (default: budgetUsd; 0: off)")
    ap.add_argument("--volume-id", action="append", default=[], help="network volume billed to the budget (repeat)")
    ap.add_argument("--poll-seconds", type=float, default=30.0)
    ap.add_argument("--idle-util", type=float, default=5.0, help="GPU utilisation %% under which the GPU is idle")
    ap.add_argument("--gpu-probe-cmd", default=NVIDIA_SMI, help="prints one utilisation %% per GPU per line")
    ap.add_argument("--flush-dir", action="append", type=Path, default=[],
                    help="where checkpoints are written (default: <workspace>/outputs and the job dir)")
    ap.add_argument("--linger-minutes", type=float, default=0.0,
                    help="keep the pod up this long after the job ends, e.g. for `fab fetch` (default 0: stop at once)")
    ap.add_argument("--handover-grace-seconds", type=float, default=120.0,
                    help="after standing down for another job, stop the pod only once no job has held it this long")
    ap.add_argument("--flush-timeout-seconds", type=float, default=600.0)
    ap.add_argument("--interrupt-grace-seconds", type=float, default=120.0)
    ap.add_argument("--daemon", action="store_true", help="detach (setsid), print the supervisor pid and return")
    ap.add_argument("--no-supervisor", action="store_true", help="run the worker alone (no restart on a crash)")
    ap.add_argument("--max-restarts", type=int, default=5, help="worker deaths in 10 min before the supervisor stops the pod")
    ap.add_argument("--hang-seconds", type=float, default=None,
                    help="a worker silent this long is hung: killed and restarted (default: max(10 polls, 600 s))")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--session", default="", help=argparse.SUPPRESS)
    return ap


def settings_from_args(args) -> Settings:
    # Precedence: the command line (playbooks/cost.watchdog_args fills it from the laptop's stack file, the
    # freshest copy), then the pod's environment (set from the stack at `pulumi up`), then the stack file the
    # kit shipped with (the committed revision), then the defaults.
    stack = _stack_defaults(args.stack) if args.stack else {}

    def pick(flag, env, key, default):
        if flag is not None:
            return flag
        return _env_float(env, stack.get(key, default))

    idle = pick(args.idle_minutes, "ULTRASHAPE_AUTOSTOP_IDLE_MINUTES", "idle", 30.0)
    runtime = pick(args.max_runtime_hours, "ULTRASHAPE_MAX_RUNTIME_HOURS", "runtime", 24.0)
    budget = pick(args.budget_usd, "ULTRASHAPE_BUDGET_USD", "budget", 0.0)
    volume_ids = list(args.volume_id)
    env_vol = os.environ.get("ULTRASHAPE_NETWORK_VOLUME_ID", "").strip()
    if env_vol and env_vol not in volume_ids:
        volume_ids.append(env_vol)
    return Settings(
        job_dir=args.job_dir.absolute(), pod_id=args.pod_id, idle_minutes=idle, max_runtime_hours=runtime, budget_usd=budget,
        stack=args.stack, volume_ids=volume_ids, poll_s=args.poll_seconds, idle_util_pct=args.idle_util,
        gpu_probe_cmd=args.gpu_probe_cmd, flush_dirs=list(args.flush_dir),
        flush_timeout_s=args.flush_timeout_seconds, interrupt_grace_s=args.interrupt_grace_seconds,
        linger_s=args.linger_minutes * 60.0, handover_grace_s=args.handover_grace_seconds,
    )


def _stack_defaults(stack: str) -> dict:
    """The stack file's values when it is at hand (on a pod, `fab setup` ships the kit with the stack files)."""
    try:
        from infra.stack_config import load_stack_config

        c = load_stack_config(stack)
    except Exception:
        return {}  # the environment variables the stack sets on the pod carry the same values
    return {"idle": float(c.autostop_idle_minutes), "runtime": float(c.max_runtime_hours), "budget": float(c.budget_usd)}


def _daemonize(log_path: Path) -> None:
    """Double fork: the supervisor survives the SSH session (and the tmux job) that started it."""
    first = os.fork()
    if first > 0:
        os.waitpid(first, 0)  # the middle process prints the supervisor's pid before we return
        os._exit(0)
    os.setsid()
    pid = os.fork()
    if pid > 0:
        print(pid, flush=True)
        os._exit(0)
    fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        s = settings_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    s.job_dir.mkdir(parents=True, exist_ok=True)
    passthrough = [a for a in argv if a not in ("--daemon", "--worker")]
    if "--session" in passthrough:  # only the supervisor hands out sessions
        i = passthrough.index("--session")
        del passthrough[i:i + 2]
    if args.worker or args.no_supervisor:
        lock = _try_lock(lock_path(s.job_dir, "worker"))
        if lock is None:
            return EX_LOCKED
        wd = Watchdog(s, _make_client(), session=args.session)
        wd.run()
        return 0
    if args.daemon:
        sys.stdout.flush()
        _daemonize(s.job_dir / "watchdog.out")
    return supervise(passthrough, s, max_restarts=args.max_restarts, hang_s=args.hang_seconds)


if __name__ == "__main__":
    raise SystemExit(main())
