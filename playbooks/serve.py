"""Using the trained model, and stopping the bill: serve, infer, teardown."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from fabric import task

from playbooks.common import OUTPUTS, STACK_HELP, config_path, latest_run, py, run_job, say, target
from remote import jobs, sync as rsync
from remote.target import Target

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
    with target(stack) as t:
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
            from playbooks.run import start_watchdog

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


@task(help={"stack": STACK_HELP, "image": "condition image (PNG/JPG)", "mesh": "coarse mesh to refine",
            "ckpt": "model file (default: the latest run's export)", "config": "inference config",
            "tiny": "the CPU-sized inference config", "out": "where the refined GLB lands here"})
def infer(c, stack=None, image=None, mesh=None, ckpt=None, config=None, tiny=False, out=None):
    """Refine one mesh with the trained model on the target, and bring the GLB home."""
    cfg = config_path("infer", config, tiny or (ckpt is None and config is None and stack == "local"))
    image = image or _example("image")
    mesh = mesh or _example("mesh")
    with target(stack) as t:
        model = find_ckpt(t, ckpt)
        stem = Path(mesh).stem
        remote_dir = t.path(OUTPUTS, "infer")
        up = t.path("data", "infer-inputs")
        for f in (image, mesh):
            if not Path(f).is_file():
                raise SystemExit(f"error: {f}: no such file")
        for f in (image, mesh):
            rsync.push(t, Path(f).resolve().parent, up, suffixes=(Path(f).name,), progress=False)
        remote_out = f"{OUTPUTS}/infer/{stem}_refined.glb"
        t.run(f"mkdir -p {shlex.quote(remote_dir)}")
        cmd = py(t, "ml.refine", "--ckpt", model, "--config", cfg, "--image", f"data/infer-inputs/{Path(image).name}",
                 "--mesh", f"data/infer-inputs/{Path(mesh).name}", "--out", remote_out)
        run_job(t, "infer", cmd)
        dest = Path(out) if out else Path("outputs") / "infer" / f"{stem}_refined.glb"
        rsync.pull(t, remote_dir, dest.parent, progress=False)
        if out and dest.name != f"{stem}_refined.glb":
            (dest.parent / f"{stem}_refined.glb").replace(dest)
        print(f"refined mesh: {dest}")


def _example(kind: str) -> str:
    """The bundled example pair for the demo (examples/), so `fab infer --stack local` needs no arguments."""
    from remote.target import REPO

    ex = REPO / "examples"
    if kind == "mesh":
        cands = sorted(p for p in (ex / "meshes").glob("*") if p.suffix.lower() in (".obj", ".glb", ".ply", ".stl", ".off"))
    else:
        cands = sorted(p for p in ex.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not cands:
        raise SystemExit(f"error: no example {kind} under {ex}; pass --{kind} FILE")
    return str(cands[0])


@task(help={"stack": STACK_HELP, "terminate": "delete the pod (a host-local volume goes with it; a network volume stays)",
            "yes": "with --terminate: do not ask"})
def teardown(c, stack=None, terminate=False, yes=False):
    """Stop the pod: GPU billing stops, the volume stays (--terminate deletes it). Safe to run twice."""
    from remote.stack import default_stack

    name = stack or default_stack()
    if name == "local":
        with target(name) as t:
            for job in ("train", "process", "weights", "serve", "tensorboard", "infer"):
                if jobs.state(t, job).state == "running":
                    jobs.stop(t, job)
                    print(f"local: stopped job {job}")
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
