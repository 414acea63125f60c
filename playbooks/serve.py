"""Using the trained model, and stopping the bill: serve, infer, teardown."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from fabric import task

from playbooks.common import (
    INPUT,
    OUTPUT,
    OUTPUTS,
    STACK_HELP,
    claim_pod,
    config_path,
    latest_run,
    py,
    run_job,
    say,
    start_watchdog,
    target,
)
from remote import jobs, sync as rsync
from remote.target import Target, TargetError

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
KEY_FILE = "outputs/serve-api-key"  # on the target's volume, mode 0600 (ml.serving writes it)


def find_ckpt(t: Target, ckpt: str | None) -> str:
    """--ckpt, or the model file in the latest run's export/ (relative to the workspace)."""
    if ckpt:
        return ckpt
    run = latest_run(t)
    if not run:
        raise SystemExit(f"error: no trained run under {OUTPUTS}/ on {t.name}; train first or pass --ckpt")
    exp = t.path(OUTPUTS, run, "export")
    r = t.run(f"cd {shlex.quote(exp)} 2>/dev/null && ls -1", check=False)
    files = sorted(f for f in r.stdout.split() if f.endswith(MODEL_SUFFIXES))
    if not files:
        raise SystemExit(
            f"error: {OUTPUTS}/{run}/export on {t.name} holds no model file; the run may not have finished "
            f"(`fab status`), or pass --ckpt"
        )
    return f"{OUTPUTS}/{run}/export/{files[0]}"


@task(help={"stack": STACK_HELP, "ckpt": "model file (default: the latest run's export)",
            "config": "inference config (default configs/infer_dit_refine.yaml)",
            "tiny": "the CPU-sized inference config", "port": "port on the target"})
def serve(c, stack=None, ckpt=None, config=None, tiny=False, port=8000):
    """Start the refine API (LitServe) on the target, detached; prints its address and API key file."""
    cfg = config_path("infer", config, tiny)
    with target(stack) as t, claim_pod(t, "serve"):
        model = find_ckpt(t, ckpt)
        if jobs.state(t, "serve").state == "running":
            say(f"[{t.name}] serve is already running (`fab teardown` or `fab logs --job serve`)")
        else:
            # On a pod the API listens on all interfaces: RunPod's proxy forwards 8000/http to it,
            # and the API key (written to the key file, 0600) is what keeps strangers out.
            host = "127.0.0.1" if t.kind == "local" else "0.0.0.0"
            args = ["--ckpt", model, "--config", cfg, "--serve-config", config_path("serve", None, tiny),
                    "--host", host, "--port", str(port), "--key-file", KEY_FILE]
            run_job(t, "serve", py(t, "ml.serving", *args), follow=False)
            start_watchdog(t, "serve")  # an API nobody calls for autostopIdleMinutes stops the pod
        # Wait for the server's ready line (it loads the model first).
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            st = jobs.state(t, "serve")
            if st.state != "running":
                raise SystemExit(f"error: the server stopped (exit {st.exit_code}):\n{jobs.tail(t, 'serve', 30)}")
            if "ml.serving: ready on" in jobs.tail(t, "serve", 200):
                break
            time.sleep(2)
        else:
            raise SystemExit("error: the server did not become ready in 10 minutes; `fab logs --job serve`")
        url = t.pod.proxy_url(int(port)) if t.kind == "pod" and t.pod is not None else f"http://127.0.0.1:{port}"
        print(f"refine API: {url}  (GET /health, POST /infer with header X-API-Key)")
        key = (t.read_text(t.path(KEY_FILE)) or "").strip()
        print(f"API key: {key or '(not readable; see `fab logs --job serve`)'}  (kept on {t.name} in {KEY_FILE})")
        print(f"stop it: fab teardown --stack {t.name}" + (" (stops the pod)" if t.kind == "pod" else ""))


def default_pair(t: Target) -> tuple[str, str]:
    """(image, mesh) on the target for a no-argument `fab infer`: the first processed mesh of data/input and
    its first render (data/output/report.jsonl says which input each sample came from)."""
    r = t.run(f"cat {shlex.quote(t.path(OUTPUT, 'report.jsonl'))} 2>/dev/null", check=False)
    for line in r.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        uid = rec.get("uid")
        src = next((rec[k] for k in ("input", "source", "path", "src", "file") if isinstance(rec.get(k), str)), None)
        if not uid or not src or rec.get("status", "ok") not in ("ok", "done", "skipped", "cached"):
            continue
        image = f"{OUTPUT}/renders/{uid}/rgba/000.png"
        mesh = src if src.startswith("/") or src.startswith(INPUT) else f"{INPUT}/{src}"
        if t.exists(t.path(image)) and t.exists(mesh if mesh.startswith("/") else t.path(mesh)):
            return image, mesh
    raise SystemExit(
        f"error: no processed mesh with a render on {t.name} to refine by default; pass --image FILE --mesh FILE"
    )


@task(help={"stack": STACK_HELP, "image": "condition image (PNG/JPG) here (default: a render of a processed mesh)",
            "mesh": "coarse mesh to refine, here (default: that processed mesh's input)",
            "ckpt": "model file on the target (default: the latest run's export)", "config": "inference config",
            "tiny": "the CPU-sized inference config", "out": "where the refined GLB lands here"})
def infer(c, stack=None, image=None, mesh=None, ckpt=None, config=None, tiny=False, out=None):
    """Refine one mesh with the trained model on the target, and bring the GLB home."""
    cfg = config_path("infer", config, tiny)
    if bool(image) != bool(mesh):
        raise SystemExit("error: pass both --image and --mesh, or neither (a processed mesh and its render)")
    for f in (image, mesh):
        if f and not Path(f).is_file():
            raise SystemExit(f"error: {f}: no such file")
    with target(stack) as t, claim_pod(t, "infer"):
        model = find_ckpt(t, ckpt)
        if image:
            up = "data/infer-inputs"
            for f in (image, mesh):
                rsync.push(t, Path(f).resolve().parent, t.path(up), suffixes=(Path(f).name,), progress=False)
            r_image, r_mesh = f"{up}/{Path(image).name}", f"{up}/{Path(mesh).name}"
        else:
            r_image, r_mesh = default_pair(t)
            say(f"[{t.name}] refining {r_mesh} with its render {r_image}")
        stem = Path(r_mesh).stem
        remote_out = f"{OUTPUTS}/infer/{stem}_refined.glb"
        t.run(f"mkdir -p {shlex.quote(t.path(OUTPUTS, 'infer'))}")
        cmd = py(t, "ml.refine", "--ckpt", model, "--config", cfg, "--image", r_image, "--mesh", r_mesh,
                 "--out", remote_out)
        # The watchdog stops the pod when the refine ends (+10 min: the GLB is pulled right after), in case
        # this laptop goes away meanwhile.
        run_job(t, "infer", cmd, watch=True, linger_minutes=10)
        if out is None and t.kind == "local":
            dest = Path(t.path(remote_out))  # already on this machine
        else:
            dest = Path(out) if out else Path(OUTPUTS) / "infer" / f"{stem}_refined.glb"
            rsync.pull_file(t, t.path(remote_out), dest)
        print(f"refined mesh:   {dest.resolve()}")
        where = "" if t.kind == "local" else f" (on {t.name}; `fab fetch` brings the run home)"
        sheet = t.path(OUTPUT, "contact_sheet.png")
        if t.exists(sheet):
            print(f"contact sheet:  {sheet}{where}")
        run = model.split("/")[1] if model.startswith(f"{OUTPUTS}/") else latest_run(t)
        curve = t.path(OUTPUTS, run, "loss_curve.png") if run else None
        if curve and t.exists(curve):
            print(f"loss curve:     {curve}{where}")


JOBS = ("train", "process", "weights", "serve", "tensorboard", "infer")


def stop_jobs(t: Target, grace: float) -> None:
    """Ctrl-C every running job (training then writes a checkpoint at the step it reached), then TERM/KILL."""
    for job in JOBS:
        if jobs.state(t, job).state == "running":
            say(f"[{t.name}] stopping job {job} (Ctrl-C{', checkpoint' if job == 'train' else ''})...")
            st = jobs.stop(t, job, grace=grace if job == "train" else 30)
            print(f"{t.name}: stopped job {job}" + (f" (exit {st.exit_code})" if st.exit_code is not None else ""))


@task(help={"stack": STACK_HELP, "terminate": "delete the pod (a host-local volume goes with it; a network volume stays)",
            "yes": "with --terminate: do not ask",
            "now": "stop at once, without first letting a running training write its checkpoint",
            "grace": "seconds a running training gets to write its checkpoint before it is killed"})
def teardown(c, stack=None, terminate=False, yes=False, now=False, grace=600):
    """Stop the pod: GPU billing stops, the volume stays (--terminate deletes it). Safe to run twice."""
    from remote.stack import default_stack

    name = stack or default_stack()
    if name == "local":
        with target(name) as t:
            stop_jobs(t, float(grace))
            print("local: nothing is billed here")
        return
    from remote.stack import PodTarget
    from playbooks.run import spend_lines

    pt = PodTarget(name, start=False, log=say)
    try:
        pod = pt.find_pod()
        if pod is None:
            print(f"{name}: no pod (nothing to stop)")
            return
        if terminate:
            if not yes and not _confirm(pod, name):
                print("not terminated")
                return
            pt.client.terminate_pod(pod.id)
            print(f"{name}: pod {pod.id} terminated")
        elif pod.status in ("EXITED", "TERMINATED"):
            print(f"{name}: pod {pod.id} is already stopped ({pod.status}); nothing is billed but its volume")
        else:
            if not now and pod.status == "RUNNING":
                # A stopped container loses the steps since the last checkpoint; Ctrl-C first loses none.
                try:
                    with pt:
                        stop_jobs(pt, float(grace))
                except TargetError as e:
                    say(f"[{name}] could not reach the pod to stop its jobs cleanly ({e}); stopping it anyway")
            pt.client.stop_pod(pod.id)
            pod = pt.client.wait_for_pod(pod.id, "EXITED", timeout=300, poll=2, require_ssh=False)
            print(f"{name}: pod {pod.id} stopped ({pod.status}): GPU billing stopped, /workspace kept. "
                  f"`fab train --stack {name}` starts it again.")
        for line in spend_lines(name, pt.client):
            print(f"  {line.strip()}")
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - one clear line; the pod id is in it
        raise SystemExit(f"error: {name}: {e}") from None


def _confirm(pod, name: str) -> bool:
    vol = "its network volume stays" if pod.network_volume_id else "its /workspace volume is DELETED with it"
    try:
        ans = input(f"terminate pod {pod.id} ({name})? {vol}. Type the stack name to confirm: ")
    except EOFError:
        return False
    return ans.strip() == name
