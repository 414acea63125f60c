"""Training and watching it: train, status, logs, tensorboard, fetch."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from fabric import task

from playbooks.common import (
    INPUT,
    KEEP_RUNNING_HELP,
    OUTPUTS,
    STACK_HELP,
    config_path,
    disk_lines,
    fmt_duration,
    follow_job,
    last_metrics,
    latest_run,
    claim_pod,
    py,
    release_claim,
    run_job,
    say,
    start_watchdog,
    target,
    watch_job,
)
from playbooks.prepare import do_process, do_setup, do_sync, do_weights, processing_done
from remote import jobs, sync as rsync
from remote.target import REPO, Target

TRAIN_HELP = {
    "stack": STACK_HELP,
    "config": "training config (default configs/train_dit_refine.yaml)",
    "tiny": "the CPU-sized configs for processing and training (configs/*-tiny.yaml)",
    "process_config": "processing config when processing is needed (default configs/processing.yaml)",
    "src": "local meshes to sync first (default data/input; skipped if absent)",
    "limit": "sync only the first N meshes",
    "fresh": "start a new run even if an earlier one can be resumed",
    "follow": "stream the log (Ctrl-C detaches; training goes on)",
    "autostop": "start the pod's watchdog (stops it when training ends, idles or hits the budget); "
                "--no-autostop if you will stop it yourself",
    "dry_run": "print the cost estimate (GPU $/h, hours, storage) and start nothing",
    "overrides": "training config overrides, e.g. \"train.max_steps=2000 optim.lr=5e-6\"",
}


def needs_weights(config: str) -> str | None:
    """The `model.weights` path the training config names, if any (relative to the workspace)."""
    try:
        data = yaml.safe_load((REPO / config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    w = (data.get("model") or {}).get("weights")
    return str(w) if w else None


def can_resume(t: Target) -> bool:
    q = shlex.quote(t.path(OUTPUTS))
    return t.run(f"ls {q}/*/checkpoints/latest >/dev/null 2>&1", check=False).ok


@task(help=TRAIN_HELP)
def train(c, stack=None, config=None, tiny=False, src=INPUT, limit=None, fresh=False, follow=True, overrides="",
          autostop=True, dry_run=False, process_config=None):
    """Do whatever is missing (setup, sync, process, weights), then train detached and follow it."""
    train_cfg = config_path("train", config, tiny)
    tiny = tiny or train_cfg.endswith("-tiny.yaml")
    from remote.stack import default_stack

    name = stack or default_stack()
    if name != "local":
        from playbooks.cost import budget_problem, estimate_lines

        if dry_run:
            meshes = int(limit) if limit else None
            for line in estimate_lines(name, train_cfg, meshes=meshes, data_dir=src):
                print(line)
            return
        try:
            problem = budget_problem(name)
        except Exception as e:  # noqa: BLE001 - an unreachable billing API must not block the user's run
            problem = None
            say(f"[{name}] could not check the budget ({e}); the pod's watchdog still enforces it")
        if problem:
            raise SystemExit(f"error: {problem}")
    elif dry_run:
        print("local: nothing is billed")
        return
    stack = name
    # The claim: a watchdog whose job just ended (or lingers) stands down while this command sets up, syncs and
    # processes, instead of stopping the pod under it; the training's watchdog takes over (start_watchdog).
    with target(stack) as t, claim_pod(t, "train"):
        st = jobs.state(t, "train")
        if st.state == "running":
            say(f"[{t.name}] training is already running; following it (Ctrl-C detaches)")
            if follow:
                follow_job(t, "train")
            return
        do_setup(t)
        synced = None
        if Path(src).is_dir():
            synced = do_sync(t, src, limit)
        elif not t.exists(t.path(INPUT)):
            raise SystemExit(f"error: {src}: no meshes here and none on {t.name}; put meshes in {src} or pass --src DIR")
        # Watchdog rule: inside `fab train` the prerequisites (process, weights) are followed here and get no
        # watchdog of their own: one would stop the pod when its job ends, i.e. between stages or under the
        # training. The training's watchdog, started with the training job, covers the pod from then on. Until
        # then this command is attended: an error stops a pod it started (target()), and a Ctrl-C that detaches
        # from a prerequisite ends `fab train` there, leaving that job running with its own watchdog, as if it
        # had been started by `fab process` / `fab weights`.
        if (synced is not None and synced.transferred > 0) or not processing_done(t):
            st = do_process(t, config_path("processing", process_config, tiny))
            if not prerequisite_done(t, st, stack, autostop):
                return
        else:
            say(f"[{t.name}] process: data/output is up to date with data/input")
        w = needs_weights(train_cfg)
        if w and not t.exists(t.path(w)):
            st = do_weights(t, filename=Path(w).name, out=w)
            if not prerequisite_done(t, st, stack, autostop):
                return
        args = ["--config", train_cfg]
        if not fresh and can_resume(t):
            args += ["--resume", "latest"]
            say(f"[{t.name}] resuming the latest run (--fresh starts a new one)")
        args += shlex.split(overrides or "")
        gpus = t.pod.gpu_count if t.kind == "pod" and t.pod is not None else 1
        if gpus > 1:
            # One process per GPU on the pod's one host; DeepSpeed's launcher sets the ranks.
            # (`python -m deepspeed.launcher.runner` is the `deepspeed` command, found whether the package sits in
            # the venv or in the image's system site-packages.)
            cmd = py(t, "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--module", "ml.training", *args)
        else:
            cmd = py(t, "ml.training", *args)
        run_job(t, "train", cmd, follow=False, hint=not follow)
        if autostop:
            # Someone following the run will want `fab fetch` right after it: give them ten minutes.
            start_watchdog(t, "train", linger_minutes=10 if follow else 0)
        elif t.kind == "pod":
            t.left_running = "train"  # the user's call: target() must not stop the pod under the training
            release_claim(t)  # other watchdogs see the training running and leave the pod to it
            say(f"[{t.name}] no watchdog (--no-autostop): this pod bills until `fab teardown --stack {t.name}`")
        if follow:
            follow_job(t, "train")
            status_lines(t)


def prerequisite_done(t: Target, st: jobs.JobState, stack: str, autostop: bool) -> bool:
    """True when a prerequisite job of `fab train` finished; else (Ctrl-C detached from it) say how to go on.

    Training must not start on data still being written (or weights still downloading)."""
    if st.state == "done" and st.exit_code == 0:
        return True
    if st.state in ("detached", "running") and t.kind == "pod":
        if autostop:
            watch_job(t, st.name, idle=False)  # a CPU job / download: the GPU idles by design
        else:
            t.left_running = st.name
            say(f"[{t.name}] no watchdog (--no-autostop): this pod bills until `fab teardown --stack {t.name}`")
    say(f"[{t.name}] {st.name} is not finished ({st.state}); training was NOT started. Once "
        f"`fab logs --job {st.name} --follow --stack {stack}` shows it finished, run `fab train --stack {stack}` "
        f"again (it resumes from there)")
    return False


def status_lines(t: Target) -> None:
    run = latest_run(t)
    if not run:
        print("training: no run yet")
        print("\n".join(disk_lines(t, None)))
        return
    tr, val = last_metrics(t, run)
    st = jobs.state(t, "train")
    if tr:
        step, total = tr.get("step"), tr.get("max_steps")
        pct = f" ({100 * step / total:.0f}%)" if step is not None and total else ""
        eta = tr.get("eta_s")
        eta_txt = f", ETA {fmt_duration(eta)}" if st.state == "running" and eta is not None else ""
        v = f", val {val['val_loss']:.4f}" if val and "val_loss" in val else ""
        print(f"training: {run}: step {step}/{total}{pct}, loss {tr['loss']:.4f}{v}, lr {tr.get('lr', 0):.2e}{eta_txt}")
    else:
        print(f"training: {run}: no step logged yet")
    print(f"  job: {st.state}" + (f" (exit {st.exit_code})" if st.exit_code is not None else ""))
    print("\n".join(disk_lines(t, run)))


def gpu_lines(t: Target) -> list[str]:
    r = t.run(
        "command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total "
        "--format=csv,noheader,nounits",
        check=False,
    )
    out = []
    for line in r.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5:
            i, name, util, used, tot = parts
            out.append(f"  gpu {i} {name}: {util}% busy, {float(used) / 1024:.1f}/{float(tot) / 1024:.0f} GB")
    if not out and t.kind == "pod" and t.pod is not None:
        # No nvidia-smi in the container: RunPod's own view of the pod (runtime.gpus) is the next best.
        for i, g in enumerate(((t.pod.raw.get("runtime") or {}).get("gpus")) or []):
            out.append(f"  gpu {i} {t.pod.gpu_type_id}: {g.get('util', '?')}% busy, "
                       f"{g.get('memoryUtil', '?')}% memory (RunPod API)")
    if not out:
        out.append("  gpu: none visible (nvidia-smi not found)")
    return out


def spend_lines(stack: str, client=None) -> list[str]:
    """$ billed so far for the stack (playbooks/cost.py over the billing API); never fails the caller."""
    try:
        from playbooks.cost import spend_lines as billed

        return billed(stack, client)
    except Exception as e:  # noqa: BLE001 - status and teardown must finish even when billing is unreachable
        return [f"{stack}: spend unavailable ({e})"]


@task(help={"stack": STACK_HELP})
def status(c, stack=None):
    """Pod state, GPU use, training step, loss, ETA, and $ spent so far."""
    from remote.stack import default_stack

    name = stack or default_stack()
    if name != "local":
        from remote.stack import PodTarget

        pt = PodTarget(name, start=False, log=say)
        try:
            pod = pt.find_pod()
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"error: {e}") from None
        if pod is None:
            print(f"{name}: no pod (create it with `pulumi up --stack {name}`)")
            return
        gpu = f"{pod.gpu_count}x {pod.gpu_type_id}" if pod.gpu_type_id else "no GPU"
        print(f"{name}: pod {pod.id} {pod.status}, {gpu}, ${pod.cost_per_hr:.2f}/h now")
        for line in spend_lines(name, pt.client):
            print(f"  {line.strip()}")
        if pod.status != "RUNNING":
            print(f"  (stopped: nothing runs and the GPU is not billed; `fab train --stack {name}` starts it)")
            return
    with target(name) as t:
        for line in gpu_lines(t):
            print(line)
        for job in ("process", "weights", "train", "serve"):
            s = jobs.state(t, job)
            if s.state != "absent" and job != "train":
                print(f"  {job}: {s.state}" + (f" (exit {s.exit_code})" if s.exit_code is not None else ""))
        status_lines(t)
        if t.kind == "pod":
            from playbooks.cost import watchdog_lines

            for line in watchdog_lines(t):
                print(f"  {line}")


@task(help={"stack": STACK_HELP, "job": "train, process, weights, setup, serve, watchdog, tensorboard",
            "follow": "keep streaming until the job ends (Ctrl-C detaches)", "lines": "how many lines to show",
            "keep_running": KEEP_RUNNING_HELP})
def logs(c, stack=None, job="train", follow=False, lines=50, keep_running=False):
    """Show a job's log (--follow reattaches to a running job)."""
    with target(stack, keep_running) as t:
        st = jobs.state(t, job)
        if st.state == "absent":
            raise SystemExit(f"error: no job '{job}' on {t.name}")
        if follow:
            jobs.follow(t, job)
        else:
            sys.stdout.write(jobs.tail(t, job, int(lines)))
            print(f"[{job}: {st.state}" + (f", exit {st.exit_code}]" if st.exit_code is not None else "]"))


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


@task(help={"stack": STACK_HELP, "port": "TensorBoard's port on the target and (if free) here",
            "keep_running": KEEP_RUNNING_HELP})
def tensorboard(c, stack=None, port=6006, keep_running=False):
    """Run TensorBoard on the target over outputs/ and tunnel it here (Ctrl-C closes the tunnel)."""
    port = int(port)
    with target(stack, keep_running) as t:
        if jobs.state(t, "tensorboard").state != "running":
            jobs.start(t, "tensorboard", py(t, "tensorboard.main", "--logdir", OUTPUTS, "--port", str(port),
                                             "--host", "127.0.0.1"))
        if t.kind == "local":
            print(f"TensorBoard: http://127.0.0.1:{port}  (stop: `fab teardown --stack local`)")
            return
        local = _free_port(port)
        proc = subprocess.Popen(t.tunnel_argv(local, port))
        print(f"TensorBoard: http://127.0.0.1:{local}  (tunnel to {t.name}; Ctrl-C closes it)")
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()


@task(help={"stack": STACK_HELP, "run": "run id under outputs/ (default: the latest)",
            "dest": "local folder (default outputs/)", "checkpoints": "also the resumable checkpoints (large)",
            "keep_running": KEEP_RUNNING_HELP})
def fetch(c, stack=None, run=None, dest=OUTPUTS, checkpoints=False, keep_running=False):
    """Bring a run home: export/ (the trained model), metrics, loss curve, config (resumable)."""
    with target(stack, keep_running) as t:
        run = run or latest_run(t)
        if not run:
            raise SystemExit(f"error: no run under {OUTPUTS}/ on {t.name}")
        home = Path(dest) / run
        excludes = () if checkpoints else ("checkpoints/",)
        res = rsync.pull(t, t.path(OUTPUTS, run), home, excludes=excludes)
        print(f"{run}: {res.transferred} files fetched ({res.bytes_sent / 1e6:.1f} MB sent up, into {home})")
        export = home / "export"
        if export.is_dir():
            print(f"  trained model: {export}")
