"""A real OpenSSH server on 127.0.0.1, for transport tests (no mocks: rsync and tmux over real SSH).

    with LoopbackSSHD(tmp_path) as srv:
        t = srv.target(root=tmp_path / "ws")

It runs as the current user with a fresh host key and one authorized client key, both made
here; it needs /usr/sbin/sshd (openssh-server) and, to log in as root, to be started by root.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote.target import REPO, SSHTarget

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


class LoopbackSSHD:
    def __init__(self, base: Path, port: int | None = None):
        self.base = Path(base)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LoopbackSSHD":
        if not os.path.exists(SSHD):
            pytest.skip("sshd not installed (apt-get install openssh-server; `make sysdeps` does it)")
        self.base.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation dir sshd insists on
        hostkey = self.base / "host_ed25519"
        if not hostkey.exists():
            keygen(hostkey)
        self.client_key = self.base / "client_ed25519"
        if not self.client_key.exists():
            keygen(self.client_key)
        auth = self.base / "authorized_keys"
        auth.write_text(Path(str(self.client_key) + ".pub").read_text())
        cfg = self.base / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
            f"AuthorizedKeysFile {auth}\nPidFile {self.base}/sshd.pid\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nAllowTcpForwarding yes\nMaxSessions 50\nMaxStartups 50\n"
            # The login shell must find python3, rsync, tmux like a pod's does.
            f"SetEnv PATH={os.environ.get('PATH', '/usr/bin:/bin')}\n"
        )
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=open(self.base / "sshd.log", "wb")
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sshd exited: {(self.base / 'sshd.log').read_text()}")
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # Per-connection sshd processes outlive the listener; end them too, so no client lingers.
            import psutil

            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def target(self, root: Path, name: str = "loop", **kw) -> SSHTarget:
        kw.setdefault("known_hosts", self.base / "known_hosts")
        return SSHTarget(
            name,
            "127.0.0.1",
            self.port,
            user=getpass.getuser(),
            identity=str(self.client_key),
            root=str(root),
            kit=str(REPO),
            python=sys.executable,
            **kw,
        )
