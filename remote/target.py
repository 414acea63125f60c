"""Where a stage runs: this machine, or a pod reached over SSH.

    from remote import LocalTarget
    with LocalTarget() as t:
        t.run("python -m ml.processing --help")

A Target is shaped like Fabric's `Connection`: constructing one is cheap and touches nothing,
the first `run()` opens the connection (`open()` does nothing when already open), and `with`
closes it. Every target has the same workspace layout, so a playbook writes one command line
and it runs on a pod or here:

    <root>/data/input     meshes uploaded by `fab sync`
    <root>/data/output    processed samples (ml.processing)
    <root>/outputs/<run>  training runs (ml.training)
    <root>/ckpt           the released checkpoint (`fab weights`)
    <root>/jobs/<name>    detached jobs: run.sh, log, exit_code (remote/jobs.py)
    <kit>                 the code (a pod: the git revision `fab setup` shipped; here: this checkout)
    <python>              the interpreter that has the kit's dependencies

Jobs run with the workspace root as their working directory and the kit on PYTHONPATH, so the
relative paths in configs (data/output, outputs/) mean the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """Laptop-side state (the pinned host keys). Gitignored; ULTRASHAPE_STATE_DIR moves it (tests do)."""
    return Path(os.environ.get("ULTRASHAPE_STATE_DIR", REPO / ".fab"))


def local_workspace() -> Path:
    """The `--stack local` workspace root. Gitignored; ULTRASHAPE_LOCAL_WORKSPACE moves it."""
    return Path(os.environ.get("ULTRASHAPE_LOCAL_WORKSPACE", REPO / ".workspace"))


class TargetError(RuntimeError):
    """A target could not be reached or a command on it failed; the message says what to do."""


@dataclass
class Result:
    """What a command left behind (Fabric's Result, reduced to what the playbooks read)."""

    command: str
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Target:
    """Base class: the workspace layout and the commands built on `run`. Subclasses say how to run."""

    kind = "base"

    def __init__(self, name: str, root: str, kit: str, python: str):
        self.name = name  # the stack name; also names tmux sessions and pinned host keys
        self.root = root.rstrip("/") or "/"
        self.kit = kit.rstrip("/")
        self.python = python

    # --- layout -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path under the workspace root, as the target sees it (always POSIX)."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    @property
    def venv(self) -> str:
        return str(Path(self.python).parent.parent)

    def env_prefix(self) -> str:
        """`cd root && PYTHONPATH=kit` - what every ml command runs under."""
        return f"cd {shlex.quote(self.root)} && export PYTHONPATH={shlex.quote(self.kit)}${{PYTHONPATH:+:$PYTHONPATH}} &&"

    def module_cmd(self, module: str, *args: str) -> str:
        """`python -m module args...` with the target's interpreter, quoted for bash."""
        return " ".join([shlex.quote(self.python), "-m", module, *[shlex.quote(a) for a in args]])

    # --- connection (Fabric-like) ---------------------------------------------------------------
    def open(self) -> None:  # pragma: no cover - overridden
        pass

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    @property
    def is_connected(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- commands ---------------------------------------------------------------------------------
    def argv(self, command: str) -> list[str]:
        """The local argv that runs `command` (a bash script) on the target."""
        raise NotImplementedError

    def run(
        self,
        command: str,
        *,
        check: bool = True,
        capture: bool = True,
        input: bytes | str | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Run a bash command on the target. `check` raises TargetError (with its stderr) on failure."""
        self.open()
        data = input.encode() if isinstance(input, str) else input
        try:
            p = subprocess.run(
                self.argv(command),
                input=data,
                stdin=None if data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture else None,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise TargetError(f"{self}: '{_short(command)}' did not finish within {timeout:.0f} s") from e
        res = Result(
            command,
            p.returncode,
            (p.stdout or b"").decode(errors="replace"),
            (p.stderr or b"").decode(errors="replace"),
        )
        if check and not res.ok:
            raise TargetError(self.explain_failure(res))
        return res

    def popen(self, command: str, **kw) -> subprocess.Popen:
        """Start a command on the target and stream it (logs --follow, tunnels)."""
        self.open()
        return subprocess.Popen(self.argv(command), stdin=subprocess.DEVNULL, **kw)

    def explain_failure(self, res: Result) -> str:
        err = (res.stderr or res.stdout).strip()
        tail = "\n".join(err.splitlines()[-15:])
        return f"{self}: command failed (exit {res.returncode}): {_short(res.command)}\n{tail}"

    # --- files ----------------------------------------------------------------------------------
    def rsync_remote(self, path: str) -> str:
        """How rsync names `path` on this target (`user@host:path`, or just `path` here)."""
        raise NotImplementedError

    def rsync_shell(self) -> list[str]:
        """rsync's `-e` argument, or [] for a local copy."""
        return []

    def exists(self, path: str) -> bool:
        return self.run(f"test -e {shlex.quote(path)}", check=False).ok

    def read_text(self, path: str) -> str | None:
        r = self.run(f"cat {shlex.quote(path)}", check=False)
        return r.stdout if r.ok else None

    def write_text(self, path: str, text: str) -> None:
        """Atomic write: a temp file beside the target, then rename."""
        q = shlex.quote(path)
        self.run(f"mkdir -p $(dirname {q}) && cat > {q}.tmp && mv {q}.tmp {q}", input=text)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


class LocalTarget(Target):
    """This machine: the same commands, run by bash here, under the local workspace."""

    kind = "local"

    def __init__(self, root: str | os.PathLike | None = None, python: str | None = None):
        root = Path(root) if root is not None else local_workspace()
        # The local kit is this checkout itself (the working tree, uncommitted edits included):
        # shipping a copy of the code to the same disk would only make `fab train --stack local` slower.
        super().__init__("local", str(root.resolve()), str(REPO), python or sys.executable)

    def open(self) -> None:
        Path(self.root).mkdir(parents=True, exist_ok=True)

    def argv(self, command: str) -> list[str]:
        return ["bash", "-c", command]

    def rsync_remote(self, path: str) -> str:
        return path

    def __str__(self) -> str:
        return f"local:{self.root}"


class SSHTarget(Target):
    """A host reached with the system's OpenSSH client.

    OpenSSH (not paramiko) because rsync needs it anyway, and its connection multiplexing
    (ControlMaster) makes each later command or rsync reuse one authenticated connection.
    The host key is pinned on first use in the project's own known_hosts, under an alias
    (`HostKeyAlias`) that names the pod rather than its address: a RunPod pod gets a new public
    port after every restart, and pinning per address would either prompt every time or, with
    addresses reused across pods, pin the wrong machine.
    """

    kind = "ssh"

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        user: str = "root",
        identity: str | None = None,
        host_key_alias: str | None = None,
        root: str = "/workspace",
        kit: str | None = None,
        python: str | None = None,
        known_hosts: str | os.PathLike | None = None,
    ):
        super().__init__(
            name, root, kit or f"{root.rstrip('/')}/kit", python or f"{root.rstrip('/')}/venv/bin/python"
        )
        if not isinstance(port, int) or not 0 < port < 65536:
            raise TargetError(f"{name}: SSH port must be an integer in 1..65535, got {port!r}")
        self.host, self.port, self.user = host, port, user
        self.identity = identity
        self.host_key_alias = host_key_alias or f"ultrashape-{name}"
        self.known_hosts = Path(known_hosts) if known_hosts else state_dir() / "known_hosts"
        # Under /tmp rather than $TMPDIR, which on macOS is a long /var/folders/... path that would push the
        # socket past the 104-byte limit; named by control_path(), not ssh's %C, so we can find a stale one.
        tmp = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
        self._control = tmp / f"ultrashape-ssh-{os.getuid()}"
        self._opened = False
        self._owns_master = False

    def __str__(self) -> str:
        return f"{self.name} ({self.user}@{self.host}:{self.port})"

    def ssh_options(self, master: bool = False) -> list[str]:
        """OpenSSH options. Only open() starts the multiplexing master: a client that turns itself into
        a background master keeps its caller's stdout pipe open, and subprocess.run(capture) would then
        wait for ever. Every other call uses the master if it is there and connects on its own if not."""
        opts = {
            "BatchMode": "yes",  # never hang on a password or passphrase prompt inside a playbook
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "accept-new",  # pin on first use, refuse a changed key after
            "HostKeyAlias": self.host_key_alias,
            "HashKnownHosts": "no",  # a readable file: `grep ultrashape-h100 .fab/known_hosts`
            "ControlMaster": "yes" if master else "no",
            "ControlPath": str(self.control_path),
            "ServerAliveInterval": "10",
            "ServerAliveCountMax": "3",
            "ConnectTimeout": "15",
            "LogLevel": "ERROR",
        }
        out = ["-p", str(self.port)]
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        if master:
            out += ["-o", "ControlPersist=yes"]  # until close(): `with target:` bounds the connection
        if self.identity:
            out += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return out

    @property
    def control_path(self) -> Path:
        key = f"{self.user}@{self.host}:{self.port}".encode()
        return self._control / hashlib.sha1(key).hexdigest()[:20]

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def open(self) -> None:
        """Start the multiplexed master connection (no-op when already open)."""
        if self._opened:
            return
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        self._control.mkdir(mode=0o700, exist_ok=True)
        if self._master_alive():  # another Target in this process already holds one: share it
            self._opened, self._owns_master = True, False
            return
        # A master that was killed (network drop, OOM) leaves its socket behind; a new master would then
        # refuse to listen ("already exists, disabling multiplexing") and run unreachable for ever.
        self.control_path.unlink(missing_ok=True)
        # stderr to a file, not a pipe: the master forks into the background holding it (see ssh_options).
        with tempfile.TemporaryFile() as err:
            p = subprocess.run(
                ["ssh", *self.ssh_options(master=True), "-fN", self.destination],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=60,
            )
            err.seek(0)
            msg = err.read().decode(errors="replace")
        if p.returncode != 0:
            raise TargetError(self._explain_ssh_error(msg))
        self._opened, self._owns_master = True, True

    def reconnect(self) -> None:
        """Drop whatever is left of the connection and open a new one (after a network drop)."""
        self.close()
        self.open()

    def _master_alive(self) -> bool:
        p = subprocess.run(
            ["ssh", *self.ssh_options(), "-O", "check", self.destination], capture_output=True, timeout=15
        )
        return p.returncode == 0

    def master_pid(self) -> int | None:
        """The pid of the multiplexing master, if one runs (tests kill it to drop the connection)."""
        p = subprocess.run(
            ["ssh", *self.ssh_options(), "-O", "check", self.destination], capture_output=True, timeout=15
        )
        text = p.stderr.decode() + p.stdout.decode()
        if p.returncode == 0 and "pid=" in text:
            return int(text.split("pid=")[1].split(")")[0])
        return None

    @property
    def is_connected(self) -> bool:
        return self._opened and self._master_alive()

    def close(self) -> None:
        if self._opened and self._owns_master:
            subprocess.run(
                ["ssh", *self.ssh_options(), "-O", "exit", self.destination], capture_output=True, timeout=15
            )
        self._opened = False

    def argv(self, command: str) -> list[str]:
        # The remote login shell gets one word: `bash -c '<command>'`, so quoting is ours alone.
        return ["ssh", *self.ssh_options(), self.destination, "bash -c " + shlex.quote(command)]

    def tunnel_argv(self, local_port: int, remote_port: int) -> list[str]:
        return [
            "ssh", *self.ssh_options(), "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", self.destination,
        ]  # fmt: skip

    def rsync_remote(self, path: str) -> str:
        return f"{self.destination}:{path}"

    def rsync_shell(self) -> list[str]:
        return ["-e", shlex.join(["ssh", *self.ssh_options()])]

    def explain_failure(self, res: Result) -> str:
        if res.returncode == 255:
            return self._explain_ssh_error(res.stderr)
        return super().explain_failure(res)

    def _explain_ssh_error(self, stderr: str) -> str:
        s = stderr.strip()
        if "IDENTIFICATION HAS CHANGED" in s or "Host key verification failed" in s:
            return (
                f"{self}: the host key differs from the one pinned for '{self.host_key_alias}' in {self.known_hosts}.\n"
                f"A recreated pod has a new key; if you just recreated it, forget the old one and retry:\n"
                f"  ssh-keygen -R {self.host_key_alias} -f {self.known_hosts}\n"
                f"Otherwise do not connect: something else answers at {self.host}:{self.port}."
            )
        if "Permission denied" in s:
            who = f"the key {self.identity}" if self.identity else "your default SSH keys"
            return (
                f"{self}: SSH refused {who}. Register the public key with RunPod (Settings > SSH public keys, "
                f"or the stack's `sshPublicKey`) and recreate the pod, or point the stack at the right private key."
            )
        if "Connection refused" in s or "timed out" in s or "No route" in s:
            return (
                f"{self}: cannot reach sshd at {self.host}:{self.port} ({s.splitlines()[-1] if s else 'no answer'}). "
                f"A pod that just started needs a few seconds; `fab status` shows its state."
            )
        return f"{self}: ssh failed: {s or 'no message'}"


def _short(cmd: str, n: int = 160) -> str:
    one = " ".join(cmd.split())
    return one if len(one) <= n else one[: n - 3] + "..."
