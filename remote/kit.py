"""`fab setup` on a target: the kit's code at the local git revision, and a venv with its dependencies.

    with target_for("a40") as t:
        ship_kit(t)            # git archive HEAD | ssh tar -x, only when the revision differs
        ensure_venv(t)         # python -m venv --system-site-packages + pip install, only when the deps differ

Why this shape (no Docker, no image build):
- The code is a plain source tree on PYTHONPATH, not an installed package: a new commit means
  shipping ~1 MB of source, never a pip run. `<kit>/.revision` records what is there.
- The venv holds only the third-party dependencies, keyed by a hash of the requirement lines
  (from pyproject.toml at that revision), so it is rebuilt only when they change.
- `--system-site-packages`: RunPod's PyTorch images carry a CUDA build of torch in the system
  Python that matches the host driver; reusing it saves a 2-3 GB download per pod and a version
  mismatch. `site_packages` adds one more directory the same way (a .pth file) - the tests use it
  to reuse this machine's packages on the emulator's pods instead of downloading them.
- Both live on the volume (/workspace), so a stopped-and-started pod keeps them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass

from remote import jobs
from remote.target import REPO, LocalTarget, Target, TargetError

POD_EXTRAS = ("train", "serve")  # what runs on a pod: process, models, train, serve (not the laptop's pulumi/fabric)
POD_EXTRA_PACKAGES = ("requests>=2.31", "huggingface_hub>=0.24")  # the watchdog (RunPod API) and `fab weights`


@dataclass
class Revision:
    sha: str
    dirty: bool


def local_revision(repo=REPO) -> Revision:
    """HEAD of the local checkout, and whether the working tree has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise TargetError(f"{repo}: not a git checkout with a commit; `fab setup` ships a git revision") from e
    return Revision(sha, dirty)


def requirements(rev: str, extras=POD_EXTRAS, repo=REPO) -> list[str]:
    """The dependency lines of `extras` in pyproject.toml at `rev`, self-references expanded."""
    text = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:pyproject.toml"], capture_output=True, text=True, check=True
    ).stdout
    proj = tomllib.loads(text)["project"]
    name = proj["name"]
    optional = proj.get("optional-dependencies", {})
    out: list[str] = list(proj.get("dependencies", []))
    seen: set[str] = set()

    def add(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise TargetError(f"pyproject.toml at {rev[:10]}: no extra named '{extra}'")
        seen.add(extra)
        for req in optional[extra]:
            m = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if m:
                for e in m.group(1).split(","):
                    add(e)
            else:
                out.append(req)

    for e in extras:
        add(e)
    out += list(POD_EXTRA_PACKAGES)
    return sorted(dict.fromkeys(out))


def ship_kit(target: Target, rev: Revision | None = None, log=print) -> bool:
    """Put the kit at `rev` in <target.kit>. Returns True when something was sent."""
    rev = rev or local_revision()
    if rev.dirty:
        log(f"note: uncommitted changes are not shipped; the pod gets commit {rev.sha[:10]} (commit, then `fab setup`)")
    kit = target.kit
    have = (target.read_text(f"{kit}/.revision") or "").strip()
    if have == rev.sha:
        log(f"kit: {rev.sha[:10]} already on {target.name}")
        return False
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev.sha], capture_output=True, check=True
    ).stdout
    q, new = shlex.quote(kit), shlex.quote(kit + ".new")
    # Unpack beside the old tree and swap, so an interrupted upload never leaves half a kit behind.
    target.run(
        f"rm -rf {new} && mkdir -p {new} && tar -x -C {new} && echo {rev.sha} > {new}/.revision && "
        f"rm -rf {q}.old && {{ [ ! -e {q} ] || mv {q} {q}.old; }} && mv {new} {q} && rm -rf {q}.old",
        input=archive,
    )
    log(f"kit: {have[:10] or 'nothing'} -> {rev.sha[:10]} on {target.name} ({len(archive) / 1e6:.1f} MB)")
    return True


def deps_key(reqs: list[str], base_python: str, site_packages: str | None) -> str:
    blob = json.dumps({"reqs": reqs, "python": base_python, "site": site_packages}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_venv(
    target: Target,
    rev: Revision | None = None,
    *,
    base_python: str | None = None,
    site_packages: str | None = None,
    log=print,
    out=None,
) -> bool:
    """Build (or keep) the venv at <target.venv>. Returns True when pip ran.

    `base_python` (default python3) and `site_packages` are remembered in the venv's marker: a later
    `fab setup` or `fab train` without them keeps the earlier choice instead of rebuilding."""
    if isinstance(target, LocalTarget):
        # Here the kit is this checkout and the interpreter is the one running fab (`make setup` built it).
        r = target.run(f"{target.env_prefix()} {shlex.quote(target.python)} -c 'import ml.config, yaml'", check=False)
        if not r.ok:
            raise TargetError(f"{target.python} lacks the kit's dependencies; run `make setup` first")
        log(f"venv: local ({target.python})")
        return False
    rev = rev or local_revision()
    reqs = requirements(rev.sha)
    venv = target.venv
    marker = f"{venv}/.ultrashape-deps"
    try:
        have = json.loads(target.read_text(marker) or "{}")
    except ValueError:
        have = {}
    if base_python is None and site_packages is None:
        base_python, site_packages = have.get("python"), have.get("site_packages")
    base_python = base_python or "python3"
    key = deps_key(reqs, base_python, site_packages)
    if have.get("key") == key:
        log(f"venv: dependencies unchanged ({key})")
        return False
    qv = shlex.quote(venv)
    pth = ""
    if site_packages:
        # A .pth line puts another environment's packages on sys.path after the venv's own.
        pth = (
            f"sp=$({qv}/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])') && "
            f"echo {shlex.quote(site_packages)} > \"$sp/_ultrashape_reuse.pth\" && "
        )
    script = (
        "set -e\n"
        f"rm -f {shlex.quote(marker)}\n"
        # --without-pip: the venv's own pip (and the old setuptools ensurepip bundles) would shadow the
        # image's newer ones and make pip "upgrade" setuptools from the network; the base's pip is enough.
        f"if [ ! -x {qv}/bin/python ]; then "
        f"{shlex.quote(base_python)} -m venv --system-site-packages --without-pip {qv} || "
        f"{{ echo 'python3 -m venv failed: the image needs python3-venv (apt-get install python3-venv)'; exit 1; }}; fi\n"
        f"{pth}true\n"
        f"{qv}/bin/python -m pip --version >/dev/null 2>&1 || {qv}/bin/python -m ensurepip --default-pip\n"
        f"{qv}/bin/python -m pip install --disable-pip-version-check --progress-bar off "
        + " ".join(shlex.quote(r) for r in reqs)
        + "\n"
        f"echo {shlex.quote(json.dumps({'key': key, 'python': base_python, 'site_packages': site_packages}))}"
        f" > {shlex.quote(marker)}.tmp && mv {shlex.quote(marker)}.tmp {shlex.quote(marker)}\n"
    )
    log(f"venv: installing {len(reqs)} requirements into {venv} (detached job 'setup'; Ctrl-C leaves it running)")
    jobs.start(target, "setup", script)
    st = jobs.follow(target, "setup", out=out)
    if st.state == "detached":
        raise TargetError("setup goes on in the background; `fab setup` again when it is done")
    if st.exit_code != 0:
        raise TargetError(f"{target}: building the venv failed (exit {st.exit_code}); the log is {st.log}")
    return True


LINKED = ("configs", "examples")  # kit folders that relative paths in configs and commands name


def link_workspace(target: Target) -> None:
    """Create the workspace folders, and link configs/ and examples/ from the kit into it.

    Jobs run in the workspace root (data/, outputs/ and weights/ are there, on the volume), while
    configs name other configs relative to the kit root (`model.config: configs/infer_dit_refine.yaml`);
    the links make both true at once."""
    root = shlex.quote(target.root)
    links = " && ".join(f"ln -sfn {shlex.quote(target.kit + '/' + d)} {root}/{d}" for d in LINKED)
    target.run(f"mkdir -p {root}/data/input {root}/data/output {root}/outputs {root}/ckpt {root}/jobs && {links}")
