"""How long `fab sync` and `fab setup` take when there is nothing to do (they should take seconds).

    .venv/bin/python bench/playbooks_sync.py            # 1,000 files, 3 repeats each
    .venv/bin/python bench/playbooks_sync.py --files 5000 --repeats 5

Runs the real `fab` CLI (a new process each time, as a user types it) against a pod of the RunPod
emulator (tests/emulator: a real sshd on loopback, /workspace in its own mount namespace), provisioned
with the same providers `pulumi up` uses. Network latency is loopback's, so these are floors: on a
real pod add ~3 round trips of your latency (API lookup, SSH handshake, rsync file list), e.g.
~0.5 s from Europe to a US pod. Needs root (the emulator's namespaces), sshd, rsync, tmux.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.resources import NetworkVolumeArgs, NetworkVolumeProvider, PodArgs, PodProvider  # noqa: E402
from infra.stack_config import load_stack_config  # noqa: E402
from tests.emulator import RunPodEmulator, ssh_supported  # noqa: E402

STACK = "a40"


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--kb", type=int, default=64, help="size of each mesh file")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ok, why = ssh_supported()
    if not ok:
        raise SystemExit(f"cannot run emulator pods here: {why}")
    fab = [sys.executable, "-m", "fabric"]
    with tempfile.TemporaryDirectory(prefix="bench-playbooks-") as tmp:
        tmp = Path(tmp)
        src = tmp / "meshes"
        for i in range(a.files):
            d = src / f"set{i // 250:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"mesh{i:05d}.obj").write_bytes(os.urandom(a.kb * 1024))
        with RunPodEmulator(tmp, provision_seconds=0.2, start_seconds=0.1) as emu:
            home = tmp / "home"
            (home / ".ssh").mkdir(parents=True)
            shutil.copy(emu.user_key, home / ".ssh" / "id_ed25519")
            shutil.copy(str(emu.user_key) + ".pub", home / ".ssh" / "id_ed25519.pub")
            env = {**os.environ, **emu.client_env(), "HOME": str(home), "ULTRASHAPE_STATE_DIR": str(tmp / "state")}
            os.environ["HOME"] = str(home)
            cfg = load_stack_config(STACK)
            api = {"apiKey": emu.api_key, "apiBase": emu.base_url}
            nv = cfg.network_volume
            vol = NetworkVolumeProvider().create({**NetworkVolumeArgs(nv.name, nv.size_gb, nv.data_center_id).props(), **api})
            PodProvider(poll_seconds=0.05).create({**PodArgs(
                name=cfg.pod_name, gpu_types=cfg.gpu_types, gpu_count=1, cloud_type=cfg.cloud_type, image=cfg.image,
                container_disk_gb=cfg.container_disk_gb, volume_gb=0, network_volume_id=vol.id, ports=cfg.ports,
                env=cfg.pod_env(cfg.public_key()), data_center_ids=cfg.data_center_ids).props(), **api})

            base_py = getattr(sys, "_base_executable", sys.executable)
            first_setup = timed(fab + ["setup", "--stack", STACK, "--python", base_py,
                                       "--site-packages", sysconfig.get_paths()["purelib"]], env)
            setups = [timed(fab + ["setup", "--stack", STACK], env) for _ in range(a.repeats)]
            first_sync = timed(fab + ["sync", "--stack", STACK, "--src", str(src)], env)
            syncs = [timed(fab + ["sync", "--stack", STACK, "--src", str(src)], env) for _ in range(a.repeats)]
            (src / "set00" / "mesh00000.obj").write_bytes(os.urandom(a.kb * 1024))
            one = timed(fab + ["sync", "--stack", STACK, "--src", str(src)], env)
            noop = timed(fab + ["--list"], env)

    mb = a.files * a.kb / 1024
    rows = [
        ("fab --list (Python + Fabric start-up, no target)", f"{noop:6.2f} s"),
        ("fab setup, first (kit + venv, packages reused)", f"{first_setup:6.2f} s"),
        ("fab setup, nothing changed", f"{statistics.median(setups):6.2f} s [{min(setups):.2f}..{max(setups):.2f}]"),
        (f"fab sync, first ({a.files} files, {mb:.0f} MB)", f"{first_sync:6.2f} s"),
        (f"fab sync, nothing changed ({a.files} files)", f"{statistics.median(syncs):6.2f} s [{min(syncs):.2f}..{max(syncs):.2f}]"),
        (f"fab sync, one file of {a.files} changed", f"{one:6.2f} s"),
    ]
    print(f"fab on the emulator's pod (loopback SSH); median of {a.repeats} [min..max]:")
    for k, v in rows:
        print(f"  {k:<50} {v}")

if __name__ == "__main__":
    main()
