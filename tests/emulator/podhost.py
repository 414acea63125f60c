"""A pod's "container": a real sshd on loopback, alone in its own mount and PID namespaces.

    unshare --mount --pid --fork --mount-proc --kill-child -- sh -c \
        'mount --bind <pod>/workspace /workspace && exec sshd -D ...'

- /workspace inside is the pod's own host directory (or its network volume's), so remote code uses
  the same paths as on RunPod and two pods never see each other's files.
- Each pod has its own temp directory, given to sessions as TMPDIR and TMUX_TMPDIR, so each pod
  has its own tmux server (a bind mount over /tmp would hide the sshd files, which live under the
  test's tmp_path).
- sshd is PID 1 of the namespace: killing it (stop, terminate) kills every process of the pod,
  detached tmux jobs included, as stopping a RunPod container does.
- The pod's environment reaches SSH sessions through sshd's `SetEnv` (RunPod's images export the
  container environment to login shells); PUBLIC_KEY becomes the authorized key, as RunPod's start
  script does with ~/.ssh/authorized_keys.

Needs root (mount namespaces) and openssh-server; `ssh_supported()` says whether this machine can.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def ssh_supported() -> tuple[bool, str]:
    """(True, "") when real SSH pods can run here; else (False, why)."""
    if os.geteuid() != 0:
        return False, "emulated pods need root for mount namespaces (unshare -m); run the tests as root"
    for tool in ("unshare", "ssh-keygen", "ssh"):
        if not shutil.which(tool):
            return False, f"{tool} not found: install openssh-server/openssh-client and util-linux (make sysdeps)"
    if not Path(SSHD).exists():
        return False, "sshd not found: apt-get install openssh-server (make sysdeps)"
    return True, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_key(path: Path, comment: str) -> Path:
    """An ed25519 key pair at path (private) and path.pub, made once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True, stdout=subprocess.DEVNULL,
        )
    return path


class PodHost:
    """One pod's sshd. start() returns the new loopback port; stop() kills the pod's processes."""

    def __init__(self, pod_dir: Path, workspace: Path, host_key: Path):
        self.pod_dir = pod_dir
        self.workspace = workspace
        self.host_key = host_key
        # Short on purpose: tmux's socket lives in it and Unix socket paths stop at 108 bytes, which a
        # directory under pytest's tmp_path can exceed.
        self.tmp_dir = Path("/tmp") / f"rpemu-{pod_dir.name}"
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: dict[str, str], timeout: float = 10.0) -> int:
        self.stop()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.chmod(0o1777)
        self.workspace.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        (self.pod_dir / "authorized_keys").write_text((env.get("PUBLIC_KEY", "").strip() + "\n").lstrip("\n"))
        self.port = free_port()
        cfg = self.pod_dir / "sshd_config"
        cfg.write_text(self._config(env))
        log = open(self.pod_dir / "sshd.log", "ab")
        script = (
            f"mount --bind {_q(self.workspace)} /workspace && "
            f"exec {SSHD} -D -e -f {_q(cfg)}"
        )
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
             "--kill-child", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pod sshd exited with {self.proc.returncode}; see {self.pod_dir / 'sshd.log'}:\n"
                    + (self.pod_dir / "sshd.log").read_text()[-2000:]
                )
            if _banner(self.port):
                return self.port
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"pod sshd did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                # unshare ignores SIGTERM while it waits for its child; SIGKILL it, and --kill-child
                # (the parent-death signal) SIGKILLs sshd, PID 1 of the pod, which takes every other
                # process of the namespace with it.
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        self.port = None
        # The temp dir is container disk: like RunPod's, it does not survive a stop or restart.
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    remove = stop  # terminate and emulator close: nothing else is kept outside the pod directory

    def _config(self, env: dict[str, str]) -> str:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.pod_dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.pod_dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The pod directories live under pytest's tmp_path, whose modes sshd would refuse.
            "StrictModes no",
            "PrintMotd no",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
        ]
        env = {**env, "TMPDIR": str(self.tmp_dir), "TMUX_TMPDIR": str(self.tmp_dir)}
        pairs = []
        for k, v in sorted(env.items()):
            if '"' in v or "\n" in v:
                raise ValueError(f"pod env {k} has a quote or newline, which sshd's SetEnv cannot carry")
            pairs.append(f'"{k}={v}"')
        # One SetEnv line: like most sshd keywords, only the first SetEnv line counts.
        lines.append("SetEnv " + " ".join(pairs))
        return "\n".join(lines) + "\n"


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(1.0)
            return s.recv(16).startswith(b"SSH-")
    except OSError:
        return False


def _q(p: Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"
