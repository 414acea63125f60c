"""A RunPod REST v2 emulator for tests: the API on loopback, with pods that are real SSH servers.

    from tests.emulator import RunPodEmulator, Clock

    def test_something(tmp_path, monkeypatch):
        with RunPodEmulator(tmp_path) as emu:
            for k, v in emu.client_env().items():          # RUNPOD_API_KEY, RUNPOD_API_BASE
                monkeypatch.setenv(k, v)
            rp = RunPodClient()                            # or RunPodClient(emu.api_key, emu.base_url)
            pod = rp.create_pod(PodRequest(name="ultrashape-a40", image="runpod/pytorch:x",
                                           gpu_type_id="NVIDIA A40", env={"PUBLIC_KEY": emu.public_key}))
            pod = rp.wait_for_pod(pod.id, poll=0.05)        # RUNNING, with ssh_host/ssh_port
            subprocess.run(emu.ssh_command(pod.id) + ["ls /workspace"])
            emu.pod(pod.id).workspace                      # the host directory behind its /workspace

What it follows: `runpod-openapi-v2.json` (a copy of ../shared/reference/), for the operations the kit
uses: pods (list, create, get, patch, delete, action start/stop/restart/terminate), network volumes
(CRUD), account SSH keys, the catalog (GPU types with prices and availability, data centers) and
billing (/v2/billing, /v2/billing/pods, /v2/billing/network-volumes). Request bodies are validated
against the document's schemas (a violation is a 422 with `errors`); every error is an
application/problem+json ErrorResponse; responses carry RateLimit headers; tests check every
response against the document (tests/infra/test_infra_emulator_spec.py).

Construction
    RunPodEmulator(root, clock=None, *, provision_seconds=0.3, start_seconds=0.2, ssh=None,
                   balance_usd=1000.0, api_key=None)
    root        a directory (pytest's tmp_path); everything lives under root/runpod-emulator/
    clock       a Clock: Clock() follows wall time from now (the default); Clock(start, real=False)
                is frozen until advanced, for exact billing figures
    ssh         None: real SSH pods where the machine allows it (root, sshd, unshare); False: API only
                (pods reach RUNNING without an SSH endpoint); True: require SSH, fail otherwise
    Use as a context manager: `with RunPodEmulator(tmp_path) as emu:` (close() stops every sshd).

What a test reads
    emu.base_url, emu.api_key, emu.client_env()   where the API is and how to authenticate
    emu.user_key, emu.public_key                  an ed25519 key pair: put public_key in the pod's
                                                  PUBLIC_KEY env, connect with user_key
    emu.ssh_command(pod_id)                       ssh argv that logs into the pod as root
    emu.pod(pod_id) -> EmuPod                     id, name, status, ssh_host ("127.0.0.1"), ssh_port,
                                                  workspace (host Path behind /workspace), pod_dir,
                                                  env (as created), session_env (what SSH sessions
                                                  see), gpu_type_id, data_center_id, cost_per_hr
    emu.pods_named(name), emu.pods, emu.terminated, emu.volumes
    emu.exchanges                                 every answered request: method, path, template,
                                                  status, content_type, body, headers
    emu.requests_to("POST", "/v2/pods")           those of one kind
    emu.spend_usd()                               all spend so far (pods and volumes)

Pod life cycle (PodStatus): create -> PROVISIONING (provision_seconds) -> STARTING (start_seconds)
-> RUNNING, at which point the pod's sshd is listening. Transitions happen when anything looks (an
API request, emu.pod(), emu.advance()), so a frozen clock holds a pod in PROVISIONING until advanced.
    stop      kills the pod's sshd and every process in it (tmux jobs too); /workspace is kept;
              status EXITED, cost 0, ssh.direct null
    start     STARTING -> RUNNING with a NEW ssh port (RunPod maps a new public port on start)
    restart   like stop + start
    terminate/DELETE  the pod disappears from listings (GET -> 404); its host-local /workspace is
              deleted; a network volume's directory is kept
Each pod's sshd runs in its own mount and PID namespace (`unshare`) with the pod's directory
bind-mounted at /workspace, so remote code uses /workspace exactly as on RunPod. SSH sessions see
the pod's env plus RUNPOD_POD_ID, RUNPOD_API_KEY (the emulator's key, for the in-pod watchdog),
RUNPOD_API_BASE (this emulator, so in-pod API calls reach it), RUNPOD_GPU_COUNT, RUNPOD_DC_ID, and
TMPDIR/TMUX_TMPDIR (a per-pod temp dir, so each pod has its own tmux server).
A pod on a network volume (mounts.network) shares that volume's directory: two pods on the same
volume see the same files.
Pods share the host's network (only mounts and PIDs are private): a server a pod starts on 8000 is at
127.0.0.1:8000. The API still reports RunPod's proxy addresses (https://<id>-<port>.proxy.runpod.net);
set RUNPOD_PROXY_URL="http://127.0.0.1:{port}" and infra.runpod.Pod.proxy_url() returns the loopback one.

Billing (clock-driven): a pod bills cost_per_hr (GPU list price x count) while PROVISIONING,
STARTING or RUNNING, plus disk at $0.10/GB/month running and its volume at $0.20/GB/month stopped;
network volumes bill $0.07 (STANDARD) or $0.14 (HIGH_PERFORMANCE) per GB per month. The billing
endpoints return exact bucketed records of that; emu.advance(seconds) moves time.

Fault injection
    emu.out_of_capacity(gpu_type_id, times=None)  creates on that GPU get RunPod's 400 capacity
                                                  error (and the catalog shows availability NONE)
    emu.forbid(gpu_type_id)                        403 on that GPU's pool
    emu.inject(status, method="*", path="*", times=1, detail="", retry_after=None)
                                                  the next matching requests (fnmatch on the path,
                                                  e.g. "/v2/pods/*") get that status: 429 with
                                                  Retry-After, 500/502/503, 402, ...
    emu.lose_response(method="POST", path="/v2/pods", times=1, apply=True)
                                                  process the request, then close the connection
                                                  without a reply (apply=False: drop it unprocessed)
    emu.set_balance(usd)                          creates/starts get 402 once spend reaches it
    emu.clear_faults()
"""

from .podhost import ssh_supported
from .server import Clock, EmuPod, EmuVolume, Exchange, RunPodEmulator

__all__ = ["RunPodEmulator", "Clock", "EmuPod", "EmuVolume", "Exchange", "ssh_supported"]
