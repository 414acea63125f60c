"""`python -m ml.serving` as a real process: startup line, generated key, 50 concurrent clients.

    .venv/bin/python -m pytest tests/ml/serving/test_serving_process.py -q
"""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ml.serving.auth import ENV_KEY
from ml.serving.client import RefineClient, ServerProcess, ServingError

pytestmark = pytest.mark.integration
MAX_QUEUE = 4
N_CONCURRENT = 50


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _inference_worker_pids(main_pid: int) -> list[int]:
    """LitServe's inference workers: children of the main process started by multiprocessing spawn."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == main_pid and b"spawn_main" in cmd:
            pids.append(int(d))
    return pids


def _group_gone(pgid: int, within_s: float = 15.0) -> bool:
    # Children killed with the group are reaped by init a moment later; until then they still count.
    t_end = time.monotonic() + within_s
    while _group_alive(pgid) and time.monotonic() < t_end:
        time.sleep(0.2)
    return not _group_alive(pgid)


@pytest.mark.slow  # two server starts (~10 s each on 2 busy cores) and 50 requests; essential, kept in CI
def test_server_process_key_concurrency_worker_restart_and_shutdown(
    tiny_model, repo_root, tmp_path, free_port, view_png, coarse_glb
):
    ckpt, config = tiny_model
    key_file = tmp_path / "keys" / "api_key"
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY}
    args = [
        "--ckpt", str(ckpt), "--config", str(config),
        "--serve-config", str(repo_root / "configs" / "serve-tiny.yaml"),
        "--port", str(free_port), "--key-file", str(key_file),
        "--set", f"max_queue={MAX_QUEUE}", "defaults.octree_resolution=16", "defaults.steps=2",
    ]
    srv = ServerProcess(args, env=env, cwd=repo_root, start_timeout_s=240)
    pgid = None
    try:
        srv.start()
        pgid = srv.proc.pid  # a session leader (start_new_session)
        out = srv.output()
        # The key is generated on first start, kept 0600, and printed (once) in full.
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert "shown only this once" in out and key in out
        assert srv.url == f"http://127.0.0.1:{free_port}"

        anon = RefineClient(srv.url)
        h = anon.health()
        assert h["model_loaded"] and h["device"] == "cpu"
        with pytest.raises(ServingError) as e:
            anon.infer(view_png, coarse_glb)
        assert e.value.status == 401

        client = RefineClient(srv.url, key, timeout_s=300)

        def one(i: int):
            try:
                glb = client.infer(view_png, coarse_glb, seed=i)
                return 200, glb[:4]
            except ServingError as err:
                return err.status, err.detail.get("code") if isinstance(err.detail, dict) else err.detail

        with ThreadPoolExecutor(N_CONCURRENT) as pool:
            results = list(pool.map(one, range(N_CONCURRENT)))
        statuses = [s for s, _ in results]
        assert len(results) == N_CONCURRENT
        assert set(statuses) <= {200, 503}, results
        assert all(x == b"glTF" for s, x in results if s == 200)
        assert all(x == "queue_full" for s, x in results if s == 503)
        # 50 arrive at once and only MAX_QUEUE are admitted; a tiny request takes far longer than
        # the burst, so both outcomes occur.
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses

        # Alive afterwards: healthy, nothing left in flight, and it still refines.
        assert srv.alive()
        h = anon.health()
        assert h["model_loaded"] and h["queue"]["inflight"] == 0
        assert client.infer(view_png, coarse_glb)[:4] == b"glTF"
    finally:
        srv.stop()
        if pgid is not None:
            assert _group_gone(pgid), "server left processes behind"

    # Second start with the same key file: the key is reused and no longer printed. A killed worker is
    # restarted. Then SIGTERM to the main process alone (as `docker stop` or fab would send) must take
    # its children along.
    srv2 = ServerProcess(args, env=env, cwd=repo_root, start_timeout_s=240)
    try:
        srv2.start()
        out2 = srv2.output()
        assert key not in out2 and re.search(r"API key from .*api_key \(sha256 [0-9a-f]{12}", out2), out2
        client = RefineClient(srv2.url, key, timeout_s=300)
        assert client.health()["model_loaded"]

        # A worker that dies (segfault, OOM kill) is started again and the server goes on serving.
        workers = _inference_worker_pids(srv2.proc.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        t_end = time.monotonic() + 120
        saw_restart = False
        while time.monotonic() < t_end:
            h = client.health()
            saw_restart |= not h["model_loaded"]
            new = _inference_worker_pids(srv2.proc.pid)
            if saw_restart and h["model_loaded"] and new and new != workers:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"worker not restarted: {client.health()}\n{srv2.output()}")
        assert client.infer(view_png, coarse_glb)[:4] == b"glTF"

        pgid = srv2.proc.pid
        os.kill(srv2.proc.pid, signal.SIGTERM)
        rc = srv2.proc.wait(timeout=60)
        leftover = not _group_gone(pgid)
    finally:
        srv2.stop()
    assert rc == 0, srv2.output()
    assert not leftover, "LitServe's worker or manager outlived the main process"


def test_public_bind_without_auth_is_refused(tiny_model, free_port):
    ckpt, config = tiny_model
    srv = ServerProcess(
        ["--ckpt", str(ckpt), "--config", str(config), "--host", "0.0.0.0", "--port", str(free_port),
         "--insecure-no-auth"],
        start_timeout_s=60,
    )
    with pytest.raises(RuntimeError, match="refusing to serve without an API key"):
        srv.start()
    srv.stop()


def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_model, free_port):
    _, config = tiny_model
    srv = ServerProcess(["--ckpt", str(tmp_path / "nope.pt"), "--config", str(config), "--port", str(free_port)],
                        env={ENV_KEY: "k" * 32}, start_timeout_s=60)
    with pytest.raises(RuntimeError, match="nope.pt: file not found"):
        srv.start()
    srv.stop()


def test_unreadable_checkpoint_fails_the_start_with_the_reason(tmp_path, tiny_model, free_port):
    _, config = tiny_model
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    srv = ServerProcess(["--ckpt", str(bad), "--config", str(config), "--port", str(free_port)],
                        env={ENV_KEY: "k" * 32}, start_timeout_s=120)
    with pytest.raises(RuntimeError, match="exited with 1") as e:
        srv.start()
    srv.stop()
    assert "not a readable torch checkpoint" in str(e.value) and "workers failed to start" in str(e.value)
