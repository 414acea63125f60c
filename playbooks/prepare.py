"""Getting a target ready: setup, sync, process, weights. Each is safe to run again."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from fabric import task

from playbooks.common import (
    INPUT,
    KEEP_RUNNING_HELP,
    OUTPUT,
    STACK_HELP,
    WEIGHTS,
    claim_pod,
    config_path,
    py,
    run_job,
    say,
    since,
    target,
)
from remote import kit, sync as rsync
from remote.target import Target

SETUP_HELP = {
    "stack": STACK_HELP,
    "python": "base interpreter on the pod for the venv (default: python3, the image's, which has CUDA torch)",
    "site_packages": "also reuse packages from this folder on the pod (a .pth line); remembered for later runs",
    "keep_running": KEEP_RUNNING_HELP,
}


def do_setup(t: Target, python: str | None = None, site_packages: str | None = None) -> bool:
    t0 = time.monotonic()
    rev = None if t.kind == "local" else kit.local_revision()
    changed = False
    if rev is not None:
        changed |= kit.ship_kit(t, rev, log=say)
    kit.link_workspace(t)
    changed |= kit.ensure_venv(t, rev, base_python=python, site_packages=site_packages, log=say)
    say(f"[{t.name}] setup {'done' if changed else 'already up to date'} ({since(t0)})")
    return changed


@task(help=SETUP_HELP)
def setup(c, stack=None, python=None, site_packages=None, keep_running=False):
    """Put the kit (this checkout's git revision) and a venv on the volume; seconds when nothing changed."""
    with target(stack, keep_running) as t:
        do_setup(t, python, site_packages)


def do_sync(t: Target, src: str = INPUT, limit: int | None = None) -> rsync.SyncResult:
    t0 = time.monotonic()
    src_path = Path(src) if Path(src).is_absolute() else Path.cwd() / src
    limit = int(limit) if limit not in (None, "") else None
    # --limit counts meshes (not their .mtl and textures), so "100 models" means 100 models.
    res = rsync.push(t, src_path, t.path(INPUT), limit=limit, suffixes=rsync.MESH_SUFFIXES if limit else None)
    say(f"[{t.name}] sync {src} -> {INPUT}: {res.transferred} of {res.files} files sent "
        f"({res.bytes_sent / 1e6:.1f} MB on the wire, {since(t0)})")
    return res


@task(help={"stack": STACK_HELP, "src": "local folder of meshes (default data/input)",
            "limit": "send only the first N meshes (sorted by path), e.g. 100 for the A40 test",
            "keep_running": KEEP_RUNNING_HELP})
def sync(c, stack=None, src=INPUT, limit=None, keep_running=False):
    """Upload meshes to the target's data/input (incremental, resumable; never deletes there)."""
    with target(stack, keep_running) as t:
        do_sync(t, src, limit)


def processing_done(t: Target) -> bool:
    return t.exists(t.path(OUTPUT, "data_list", "train.json"))


def do_process(t: Target, config: str, follow: bool = True, watch: bool = False):
    """`watch`: the pod's watchdog stops the pod when processing ends (standalone `fab process`; `fab train`
    follows its prerequisites itself, see the rule there). Processing is CPU work: no GPU-idle stop."""
    cmd = py(t, "ml.processing", "--input-dir", INPUT, "--output-dir", OUTPUT, "--config", config)
    return run_job(t, "process", cmd, follow=follow, watch=watch, idle=False)


@task(help={"stack": STACK_HELP, "config": "processing config (default configs/processing.yaml)",
            "tiny": "use the CPU-sized configs (configs/*-tiny.yaml)", "follow": "stream the log until done"})
def process(c, stack=None, config=None, tiny=False, follow=True):
    """Turn data/input meshes into training samples (detached; resumes where it stopped)."""
    cfg = config_path("processing", config, tiny)
    with target(stack) as t, claim_pod(t, "process"):
        do_process(t, cfg, follow, watch=True)


# --- weights ------------------------------------------------------------------------------------

WEIGHTS_HELP = {
    "stack": STACK_HELP,
    "repo": "Hugging Face repo of the released weights",
    "filename": "file in that repo",
    "revision": "branch, tag or commit of the repo (pin a commit for reproducible runs)",
    "source": "a local copy of the file to upload instead of downloading on the target",
    "out": "where it goes on the target (default ckpt/<filename>, what configs/train_dit_refine.yaml names)",
    "follow": "stream the log until done",
}


def do_weights(
    t: Target,
    repo: str = "infinith/UltraShape",
    filename: str = "ultrashape_v1.pt",
    revision: str = "main",
    source: str | None = None,
    follow: bool = True,
    out: str | None = None,
    watch: bool = False,
):
    """`watch`: as for do_process (a download leaves the GPU idle: no GPU-idle stop)."""
    out = out or f"{WEIGHTS}/{filename}"
    if source:
        src = Path(source).expanduser()
        if not src.is_file():
            raise SystemExit(f"error: --source {source}: no such file")
        # rsync the one file (resumable: a 6 GB upload that drops continues from the partial).
        res = rsync.push(t, src.parent, t.path(str(Path(out).parent)), suffixes=(src.name,))
        if src.name != Path(out).name:
            t.run(f"mv {shlex.quote(t.path(str(Path(out).parent), src.name))} {shlex.quote(t.path(out))}")
        say(f"[{t.name}] weights: {src.name} uploaded ({res.bytes_sent / 1e6:.1f} MB sent)")
    args = ["--repo", repo, "--filename", filename, "--revision", revision, "--out", out]
    if source:
        args += ["--local"]
    return run_job(t, "weights", py(t, "remote.weights", *args), follow=follow, watch=watch, idle=False)


@task(help=WEIGHTS_HELP)
def weights(c, stack=None, repo="infinith/UltraShape", filename="ultrashape_v1.pt", revision="main",
            source=None, follow=True, out=None):
    """Download the released UltraShape weights on the target (resumes; sha256 and layout checked)."""
    with target(stack) as t, claim_pod(t, "weights"):
        do_weights(t, repo, filename, revision, source, follow, out, watch=True)
