"""Fetch the released UltraShape checkpoint on the target, verify it, convert it for training.

    python -m remote.weights --repo infinith/UltraShape --filename ultrashape_v1.pt --out ckpt/ultrashape_v1.pt

`fab weights` runs this on the pod (in the workspace root), as a detached job: a 6 GB download
should not depend on the laptop's Wi-Fi.

- Resume: huggingface_hub keeps an `.incomplete` file in the cache and continues it (HTTP Range)
  after an interruption; running the command again is the retry.
- Checksum: for a file stored with Git LFS, the Hub names the cached blob by the file's sha256
  (the same value as its ETag and its `lfs.sha256`). We hash what landed and compare, so a
  truncated or corrupted download is an error, not a silent NaN at step 1. The verified digest is
  written beside the file (`<file>.sha256`) so later runs skip the 6 GB hash when size and mtime
  have not changed.
- `--local`: the file was uploaded by `fab weights --source` (no Hub access needed); its digest is
  checked against `--sha256` when given, and recorded either way.
- Training format: the trainer loads the released layout itself ({"vae", "dit", "conditioner"},
  strictly; ml/models/checkpoint.py), so there is nothing to rewrite. What we do is open the file
  with that reader, in a child process (ml is imported only there: remote/ is the wiring, the format
  belongs to the models), so a file of the wrong layout fails here and not an hour into `fab train`.

Licence: the weights are under the Tencent Hunyuan 3D 2.1 Community License (see README); this
command downloads them only when the user runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = "ckpt/hf-cache"  # on the volume, so a stopped pod keeps a half-finished download


class WeightsError(RuntimeError):
    pass


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    t0 = time.monotonic()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            done += len(b)
            if size > 1 << 30 and time.monotonic() - t0 > 5:  # a progress line for multi-GB files
                print(f"  sha256 {done / size:.0%}", flush=True)
                t0 = time.monotonic()
    return h.hexdigest()


def recorded_digest(path: Path) -> str | None:
    """The digest recorded at the last verification, if the file is unchanged since."""
    rec = Path(str(path) + ".sha256")
    try:
        d = json.loads(rec.read_text())
        st = path.stat()
        if d["size"] == st.st_size and d["mtime_ns"] == st.st_mtime_ns:
            return d["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def record_digest(path: Path, digest: str) -> None:
    st = path.stat()
    rec = Path(str(path) + ".sha256")
    tmp = rec.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    tmp.replace(rec)


def download(repo: str, filename: str, revision: str, cache_dir: str = CACHE) -> tuple[Path, str | None]:
    """(path of the cached file, expected sha256 or None when the Hub does not give one)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - the pod venv always has it (remote/kit.py)
        raise WeightsError("huggingface_hub is not installed in the target's venv; run `fab setup`") from e
    print(f"downloading {repo}/{filename}@{revision} into {cache_dir} (resumes if interrupted)", flush=True)
    try:
        path = hf_hub_download(
            repo_id=repo, filename=filename, revision=revision, cache_dir=cache_dir, token=os.environ.get("HF_TOKEN")
        )
    except LocalEntryNotFoundError as e:
        raise WeightsError(
            f"{repo}/{filename}: not in {cache_dir} and the Hub cannot be reached ({e}). "
            f"Check the pod's network, or upload a copy: fab weights --source /path/to/{filename}"
        ) from e
    except Exception as e:  # HTTP errors carry the reason (gated repo, 404, ...)
        raise WeightsError(f"{repo}/{filename}@{revision}: download failed: {e}") from e
    blob = Path(path).resolve()
    # The cache names LFS blobs by their sha256; small (non-LFS) files by a git sha1 (40 hex).
    expected = blob.name if re.fullmatch(r"[0-9a-f]{64}", blob.name) else None
    return Path(path), expected


def verify(path: Path, expected: str | None) -> str:
    have = recorded_digest(path)
    if have is None:
        print(f"checking sha256 of {path} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
        have = sha256_file(path)
    if expected and have != expected:
        raise WeightsError(
            f"{path}: sha256 {have} does not match the expected {expected}: the file is corrupt or truncated. "
            f"Delete it and run `fab weights` again (the download resumes from scratch for this file)."
        )
    return have


def check_layout(path: Path) -> None:
    """Open `path` with ml/models/checkpoint.py's reader and require the three official parts."""
    code = (
        "import sys; from ml.models.checkpoint import PARTS, read_checkpoint; "
        "ck = read_checkpoint(sys.argv[1]); missing = [p for p in PARTS if p not in ck]; "
        "print('parts:', ', '.join(f'{p} ({len(ck[p])} tensors)' for p in PARTS if p in ck)); "
        "sys.exit(f'{sys.argv[1]}: missing parts {missing}' if missing else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)])
    if r.returncode != 0:
        raise WeightsError(f"{path}: not an UltraShape checkpoint the trainer can load (see above)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m remote.weights", description=__doc__.split("\n")[0])
    p.add_argument("--repo", default="infinith/UltraShape")
    p.add_argument("--filename", default="ultrashape_v1.pt")
    p.add_argument("--revision", default="main")
    p.add_argument("--out", required=True, help="where the verified file is placed (the config's model.weights)")
    p.add_argument("--no-check", action="store_true", help="skip opening the file with the model's reader")
    p.add_argument("--local", action="store_true", help="--out is already there (uploaded); do not download")
    p.add_argument("--sha256", default=None, help="expected digest (for --local, or to pin a download)")
    p.add_argument("--cache-dir", default=CACHE)
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if a.local:
            if not out.is_file():
                raise WeightsError(f"{out}: not found; upload it with `fab weights --source FILE`")
            digest = verify(out, a.sha256)
        else:
            cached, expected = download(a.repo, a.filename, a.revision, a.cache_dir)
            if a.sha256 and expected and a.sha256 != expected:
                raise WeightsError(f"--sha256 {a.sha256} but the Hub says {expected} for {a.repo}/{a.filename}@{a.revision}")
            want = a.sha256 or expected
            if want and out.is_file() and recorded_digest(out) == want:
                digest = want  # verified on an earlier run and unchanged since: skip the 6 GB hash
            else:
                digest = verify(cached, want)
            if not (out.is_file() and recorded_digest(out) == digest):
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".tmp")
                # A hard link when the cache is on the same volume (no second 6 GB), else a copy.
                try:
                    tmp.unlink(missing_ok=True)
                    os.link(cached.resolve(), tmp)
                except OSError:
                    shutil.copyfile(cached, tmp)
                tmp.replace(out)
        record_digest(out, digest)
        print(f"{out}: sha256 {digest} ok", flush=True)
        if not a.no_check:
            check_layout(out)
        print(f"{out}: ready for training (model.weights: {out})", flush=True)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
