"""The API key: from ULTRASHAPE_API_KEY, else a 0600 key file, else generated once and kept there.

A generated key is printed once, on the start that creates it; later starts only print where it
lives and a short fingerprint, so the key does not end up in every log the pod keeps.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

ENV_KEY = "ULTRASHAPE_API_KEY"
MIN_KEY_LEN = 16  # a shorter key from the environment is refused: guessable over a public port


class ApiKeyError(RuntimeError):
    """The key in the environment or the key file cannot be used."""


@dataclass(frozen=True)
class ApiKey:
    value: str
    source: str  # "env ULTRASHAPE_API_KEY" or the key file's path
    generated: bool  # True only on the start that created the key file

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.value.encode()).hexdigest()[:12]

    def matches(self, presented: str | None) -> bool:
        # Constant-time comparison: a byte-by-byte early exit would leak the key's prefix by timing.
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.value.encode())


def resolve_api_key(key_file: Path, env: dict[str, str] | None = None) -> ApiKey:
    env = os.environ if env is None else env
    from_env = env.get(ENV_KEY, "").strip()
    if from_env:
        if len(from_env) < MIN_KEY_LEN:
            raise ApiKeyError(
                f"{ENV_KEY} is {len(from_env)} characters; use at least {MIN_KEY_LEN} "
                f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return ApiKey(from_env, f"env {ENV_KEY}", generated=False)

    key_file = Path(key_file)
    if key_file.exists():
        return ApiKey(_read_key_file(key_file), str(key_file), generated=False)
    value, created = _create_key_file(key_file)
    return ApiKey(value, str(key_file), generated=created)


def _read_key_file(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Same policy as ssh with private keys: a key others can read is not a secret any more.
        raise ApiKeyError(f"{path}: permissions {oct(mode)} let other users read the API key; run: chmod 600 {path}")
    value = path.read_text().strip()
    if len(value) < MIN_KEY_LEN:
        raise ApiKeyError(
            f"{path}: the key in this file is {len(value)} characters (need >= {MIN_KEY_LEN}); "
            "delete the file to generate a new key"
        )
    return value


def _create_key_file(path: Path) -> tuple[str, bool]:
    value = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL + 0600 at creation: the key is never, even for an instant, in a file others may read.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            # link() fails if another server created the file meanwhile: then use theirs, not ours.
            os.link(tmp, path)
        except FileExistsError:
            return _read_key_file(path), False
    finally:
        tmp.unlink(missing_ok=True)
    return value, True
