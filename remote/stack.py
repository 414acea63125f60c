"""From a stack name to a Target: `local`, or the stack's pod as the live RunPod API describes it.

    from remote.stack import target_for
    with target_for("a40") as t:       # finds pod `ultrashape-a40`; starts it if stopped
        t.run("nvidia-smi")

The pod is looked up by its deterministic name (infra/stack_config.py: `ultrashape-<stack>`) every
time a PodTarget opens, never cached in a file: RunPod gives a pod a new public port for 22/tcp
after each restart, so an address written down yesterday is wrong today.

Which stack, when none is named: $ULTRASHAPE_STACK, else the stack `pulumi stack select` chose for
this project, else `local`. Pulumi keeps that choice in
~/.pulumi/workspaces/<project>-<sha1 of the Pulumi.yaml path>-workspace.json ({"stack": ...}),
which we read directly so that `fab` works where only the kit is installed (no pulumi CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from remote.target import REPO, LocalTarget, SSHTarget, Target, TargetError

LOCAL = "local"


def pulumi_selected_stack(project_dir: Path = REPO, pulumi_home: Optional[Path] = None) -> Optional[str]:
    """The stack `pulumi stack select` chose for the project in project_dir, or None."""
    proj = Path(project_dir).resolve() / "Pulumi.yaml"
    if not proj.is_file():
        return None
    try:
        import yaml

        name = (yaml.safe_load(proj.read_text()) or {}).get("name")
    except Exception:  # a broken Pulumi.yaml is reported by the stack config loader, with its path
        return None
    home = Path(pulumi_home or os.environ.get("PULUMI_HOME") or Path.home() / ".pulumi")
    digest = hashlib.sha1(str(proj).encode()).hexdigest()
    ws = home / "workspaces" / f"{name}-{digest}-workspace.json"
    try:
        stack = json.loads(ws.read_text()).get("stack")
    except (OSError, ValueError):
        return None
    # Self-managed backends store "organization/<project>/<stack>"; the stack file is named by the last part.
    return stack.rsplit("/", 1)[-1] if stack else None


def default_stack() -> str:
    return os.environ.get("ULTRASHAPE_STACK") or pulumi_selected_stack() or LOCAL


def target_for(stack: Optional[str] = None, *, start: bool = True, log: Callable[[str], None] | None = None) -> Target:
    """The Target for `stack` (cheap: nothing is contacted until it is used)."""
    stack = stack or default_stack()
    if stack == LOCAL:
        return LocalTarget()
    return PodTarget(stack, start=start, log=log)


def ssh_endpoint(pod) -> tuple[str, int]:
    """(host, port) for direct SSH to `pod` (an infra.runpod.Pod), refusing to guess.

    The API reports the mapping twice: `ssh.direct` and the runtime port list (private 22). If both
    are there and disagree, we do not pick one: connecting to the wrong port of a shared host is how
    you end up on someone else's pod.
    """
    direct = (pod.ssh_host, pod.ssh_port) if pod.ssh_host and pod.ssh_port else None
    runtime = None
    for p in ((pod.raw.get("runtime") or {}).get("ports")) or []:
        if p.get("private") == 22 and p.get("public"):
            runtime = (p.get("ip") or pod.public_ip, int(p["public"]))
    if direct and runtime and runtime[0] and (direct[0] != runtime[0] or direct[1] != runtime[1]):
        raise TargetError(
            f"pod {pod.id} ({pod.name}): refusing to be ambiguous: its SSH endpoint is {direct[0]}:{direct[1]} in "
            f"`ssh.direct` but {runtime[0]}:{runtime[1]} in `runtime.ports`. Wait a few seconds and retry "
            f"(the pod may be restarting); if it persists, restart the pod from the RunPod console."
        )
    ep = direct or (runtime if runtime and runtime[0] else None)
    if not ep:
        raise TargetError(
            f"pod {pod.id} ({pod.name}) is {pod.status} but has no public 22/tcp mapping; the stack's "
            f"`ports` must include '22/tcp' (Pulumi.yaml) - fix it and run `pulumi up`"
        )
    return ep


class PodTarget(SSHTarget):
    """The pod of a stack, resolved through the stack config and the live RunPod API on first use."""

    kind = "pod"

    def __init__(
        self,
        stack: str,
        *,
        start: bool = True,
        client=None,
        log: Callable[[str], None] | None = None,
        wait_timeout: float = 900.0,
        poll: float = 3.0,
    ):
        from infra.stack_config import StackConfigError, load_stack_config

        try:
            self.config = load_stack_config(stack)
        except StackConfigError as e:
            raise TargetError(str(e)) from e
        # Host and port are unknown until open(): the placeholders are never used to connect.
        super().__init__(
            stack,
            host="",
            port=22,
            user="root",
            identity=str(self.config.ssh_private_key_file),
            root=self.config.workspace,
        )
        self.start_if_stopped = start
        # True once this object has started the stopped pod: playbooks/common.target() then stops it again
        # when a task that leaves no job behind ends (a `fab logs` must not leave a GPU billing).
        self.started_pod = False
        self.left_running: str | None = None  # the job a task left running on purpose (it keeps the pod up)
        self._client = client
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.wait_timeout = wait_timeout
        self.poll = poll
        self.pod = None  # infra.runpod.Pod, as last seen

    def __str__(self) -> str:
        if self.host:
            return f"{self.name} (pod {self.pod.id if self.pod else '?'} at {self.user}@{self.host}:{self.port})"
        return f"{self.name} (pod {self.config.pod_name})"

    @property
    def client(self):
        if self._client is None:
            from infra.runpod import RunPodClient, RunPodError

            try:
                self._client = RunPodClient()
            except RunPodError as e:
                raise TargetError(f"stack '{self.name}': {e}") from e
        return self._client

    def find_pod(self):
        """The stack's pod as the API has it now, or None. Several live pods with the name is an error."""
        from infra.runpod import RunPodError

        try:
            pods = [p for p in self.client.find_pods(self.config.pod_name) if p.status != "TERMINATED"]
        except RunPodError as e:
            raise TargetError(f"stack '{self.name}': cannot list pods: {e}") from e
        if len(pods) > 1:
            ids = ", ".join(f"{p.id} ({p.status})" for p in pods)
            raise TargetError(
                f"stack '{self.name}': refusing to be ambiguous: {len(pods)} pods are named {self.config.pod_name}: "
                f"{ids}. Terminate the ones Pulumi does not manage (`pulumi stack export` shows its pod id)."
            )
        self.pod = pods[0] if pods else None
        return self.pod

    def require_pod(self):
        pod = self.find_pod()
        if pod is None:
            raise TargetError(
                f"stack '{self.name}' has no pod (looked for '{self.config.pod_name}'). Create it with:\n"
                f"  pulumi up --stack {self.name}"
            )
        return pod

    def ensure_running(self):
        """Start the pod if it is stopped (saying so: billing resumes), wait for SSH, set host and port."""
        from infra.runpod import RunPodError

        pod = self.require_pod()
        if pod.status == "ERROR":
            raise TargetError(
                f"pod {pod.id} ({pod.name}) is in ERROR; read its logs in the RunPod console, then "
                f"`pulumi up --stack {self.name} --replace` recreates it (the volume stays)"
            )
        if pod.status == "EXITED":
            if not self.start_if_stopped:
                raise TargetError(f"pod {pod.id} ({pod.name}) is stopped; `fab setup --stack {self.name}` starts it")
            gpu = f"{pod.gpu_count}x {pod.gpu_type_id}" if pod.gpu_type_id else "CPU"
            self.log(f"pod {pod.id} ({pod.name}, {gpu}) was stopped: starting it (GPU billing resumes)")
            try:
                self.client.start_pod(pod.id)
                self.started_pod = True
            except RunPodError as e:
                raise TargetError(
                    f"could not start pod {pod.id}: {e}\n(A stopped pod resumes on its own host; if that host "
                    f"has no free GPU now, `pulumi up --stack {self.name} --replace` places a new one.)"
                ) from e
        if not pod.ssh_ready:
            t0 = time.monotonic()
            try:
                pod = self.client.wait_for_pod(
                    pod.id, "RUNNING", timeout=self.wait_timeout, poll=self.poll, require_ssh=True
                )
            except (RunPodError, TimeoutError) as e:
                raise TargetError(str(e)) from e
            self.log(f"pod {pod.id} is RUNNING ({time.monotonic() - t0:.0f} s)")
        self.pod = pod
        self.host, self.port = ssh_endpoint(pod)
        self.user = pod.ssh_username or "root"
        # Pin the key to this pod, not to host:port (which change on restart) nor to the stack
        # (a recreated pod is a new machine with a new key, which must not look like an attack).
        self.host_key_alias = f"ultrashape-{self.name}-{pod.id}"
        return pod

    def open(self) -> None:
        if self._opened:
            return
        self.ensure_running()
        # RUNNING means the container is up; its sshd may need a few more seconds to listen.
        deadline = time.monotonic() + 60
        while True:
            try:
                super().open()
                return
            except TargetError as e:
                if "cannot reach sshd" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def reconnect(self) -> None:
        # After a drop the pod may have been restarted (new port): look it up again.
        self.close()
        self.open()
