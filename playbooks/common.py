"""What every task shares: picking the target, the config names, the remote folder names, output."""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import contextmanager

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


@contextmanager
def target(stack: str | None):
    """`with target(stack) as t:` - the stack's Target, closed afterwards; errors become one clear line."""
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


def run_job(t: Target, name: str, command: str, *, follow: bool = True, env: dict | None = None,
            hint: bool = True) -> jobs.JobState:
    """Start `command` as detached job `name` on `t` (in the workspace, kit on PYTHONPATH) and follow it."""
    say(f"[{t.name}] {name}: {command}")
    jobs.start(t, name, command, env=env)
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
