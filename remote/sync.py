"""Files to and from a target with rsync: incremental, resumable, with progress.

    push(target, "data/input", target.path("data/input"), limit=100)
    pull(target, target.path("outputs/run1/export"), "outputs/run1/export")

- Incremental: rsync's size + mtime check, so a no-change sync of thousands of files sends
  only the file list.
- Resumable: `--partial-dir` keeps a half-sent file on the target; the next run continues it
  (rsync's delta algorithm against the partial) instead of starting over. That matters for a
  6 GB checkpoint over a hotel Wi-Fi.
- Progress: `--info=progress2` (one overall line) when a person is watching.
- Over the target's own SSH options (pinned host key, multiplexed connection).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from remote.target import Target, TargetError

MESH_SUFFIXES = (".obj", ".stl", ".glb", ".gltf", ".ply", ".off")
PARTIAL_DIR = ".rsync-partial"


@dataclass
class SyncResult:
    files: int  # files considered (after --limit)
    transferred: int  # files actually sent
    bytes_sent: int


def select_files(src: Path, limit: int | None = None, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Relative paths under `src`, sorted (so `--limit 100` picks the same 100 every time)."""
    if not src.is_dir():
        raise TargetError(f"{src}: no such folder. Put your meshes there, or pass --src DIR.")
    rels = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            if suffixes and not f.lower().endswith(suffixes):
                continue
            rels.append(os.path.relpath(os.path.join(dirpath, f), src))
    rels.sort()
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        rels = rels[:limit]
    return rels


@functools.lru_cache(maxsize=1)
def rsync_version() -> tuple[int, int]:
    """The local rsync's (major, minor); macOS ships 2.6.9 (or openrsync), which lacks --info."""
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TargetError("rsync is not installed here: apt-get install rsync (Linux) or brew install rsync (macOS)") from e
    m = re.search(r"version\s+(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _rsync(args: list[str], progress: bool) -> SyncResult:
    cmd = ["rsync", "-a", "--partial", f"--partial-dir={PARTIAL_DIR}", "--stats", *args]
    if progress and sys.stderr.isatty():
        # One overall progress line (rsync >= 3.1); older ones print a line per file instead.
        cmd.insert(1, "--info=progress2" if rsync_version() >= (3, 1) else "--progress")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines = []
    assert p.stdout is not None
    for line in p.stdout:
        out_lines.append(line)
        # --stats goes to stdout after the transfer; progress lines go through as they come.
        if progress and not line.startswith(("Number of", "Total", "Literal", "Matched", "File list", "sent ", "total ")):
            sys.stdout.write(line)
            sys.stdout.flush()
    err = p.stderr.read() if p.stderr else ""
    rc = p.wait()
    if rc != 0:
        hint = ""
        if rc == 255 or "connection" in err.lower():
            hint = " (the SSH connection failed; rerun: rsync resumes where it stopped)"
        elif rc in (23, 24):
            hint = " (some files vanished or could not be read during the transfer)"
        raise TargetError(f"rsync failed with exit {rc}{hint}:\n{err.strip()[-2000:]}")
    return _parse_stats("".join(out_lines))


def _parse_stats(text: str) -> SyncResult:
    def num(label: str) -> int:
        for line in text.splitlines():
            if line.startswith(label):
                v = line.split(":", 1)[1].strip().split()[0].replace(",", "")
                try:
                    return int(v)
                except ValueError:
                    return 0
        return 0

    def regular_files() -> int:
        # "Number of files: 5 (reg: 4, dir: 1)": the total counts folders too; we report files.
        for line in text.splitlines():
            m = re.search(r"reg: ([\d,.]+)", line) if line.startswith("Number of files:") else None
            if m:
                return int(re.sub(r"[,.]", "", m.group(1)))  # thousands separators
        return num("Number of files:")

    return SyncResult(
        files=regular_files(),
        # rsync 3 says "regular files transferred"; 2.6 (macOS) says "files transferred".
        transferred=num("Number of regular files transferred:") or num("Number of files transferred:"),
        bytes_sent=num("Total bytes sent:"),
    )


def push(
    target: Target,
    src: str | os.PathLike,
    dest: str,
    *,
    limit: int | None = None,
    suffixes: tuple[str, ...] | None = None,
    progress: bool = True,
) -> SyncResult:
    """Copy the folder `src` (here) to `dest` (on the target). `limit` sends only the first N files.

    Never deletes on the target: a mesh removed here stays there until you remove it yourself,
    because a sync that deletes is one typo in --src away from emptying the pod's data.
    """
    src = Path(src)
    target.open()
    target.run(f"mkdir -p {shlex.quote(dest)}")
    args = [*target.rsync_shell()]
    listfile = None
    if limit is not None or suffixes:
        files = select_files(src, limit, suffixes)
        if not files:
            raise TargetError(f"{src}: no files to send" + (f" with suffixes {suffixes}" if suffixes else ""))
        listfile = tempfile.NamedTemporaryFile("w", suffix=".files", delete=False)
        listfile.write("\n".join(files) + "\n")
        listfile.close()
        args += [f"--files-from={listfile.name}"]
    elif not src.is_dir():
        raise TargetError(f"{src}: no such folder. Put your meshes there, or pass --src DIR.")
    args += ["--exclude", PARTIAL_DIR, f"{src}/", target.rsync_remote(dest.rstrip("/") + "/")]
    try:
        return _rsync(args, progress)
    finally:
        if listfile is not None:
            os.unlink(listfile.name)


def pull(
    target: Target,
    src: str,
    dest: str | os.PathLike,
    *,
    excludes: tuple[str, ...] = (),
    includes: tuple[str, ...] = (),
    progress: bool = True,
) -> SyncResult:
    """Copy the folder `src` (on the target) to `dest` (here). Never deletes anything here."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not target.exists(src):
        raise TargetError(f"{target}: {src} does not exist (nothing to fetch yet?)")
    args = [*target.rsync_shell()]
    for inc in includes:
        args += ["--include", inc]
    for exc in (PARTIAL_DIR, *excludes):
        args += ["--exclude", exc]
    args += [target.rsync_remote(src.rstrip("/") + "/"), f"{dest}/"]
    return _rsync(args, progress)


def pull_file(target: Target, src: str, dest: str | os.PathLike, *, progress: bool = False) -> SyncResult:
    """Copy one file from the target to `dest` (a file path here), resumably."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists(src):
        raise TargetError(f"{target}: {src} does not exist")
    return _rsync([*target.rsync_shell(), target.rsync_remote(src), str(dest)], progress)
