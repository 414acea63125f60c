"""Load figure for the refine API: requests/s and p50/p95 latency, tiny model, CPU, loopback.

    .venv/bin/python bench/serving.py                                  # 30 requests at 1 and at 4 clients
    .venv/bin/python bench/serving.py --requests 60 --concurrency 1,4,8 --octree-resolution 16
    .venv/bin/python bench/serving.py --ckpt model.pt --config configs/infer_dit_refine.yaml \\
        --serve-config configs/serve.yaml                              # a real model (on a GPU pod)

Starts `python -m ml.serving` as a child (as in production: one API server process, one worker),
waits for its ready line, sends a bounded number of requests from N client threads, and stops it.
Latency is client-side wall time per request (upload + queue + refine + download); the server's own
refine time (X-Refine-Seconds) is reported beside it. max_queue is raised to the largest concurrency
so the figure measures throughput, not 503s (any 503 is still counted).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.serving.auth import ENV_KEY  # noqa: E402
from ml.serving.client import RefineClient, ServerProcess, ServingError  # noqa: E402

MAX_REQUESTS = 1000  # bounded: this is a load figure, not a soak test


def inputs() -> tuple[bytes, bytes]:
    """An RGBA view and a coarse sphere off the origin (as in the tests)."""
    import trimesh
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((20, 24, 108, 104), fill=(200, 120, 60, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.apply_scale([7.0, 5.0, 6.0])
    mesh.apply_translation([100.0, -50.0, 20.0])
    return buf.getvalue(), mesh.export(file_type="glb")


def tiny_checkpoint(config: Path, out: Path) -> Path:
    from ml.config import load_config
    from ml.models.checkpoint import write_random_checkpoint
    from ml.refine import InferConfig

    return write_random_checkpoint(load_config(config, InferConfig).model, out, seed=0)


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def run_level(client: RefineClient, n: int, conc: int, png: bytes, glb: bytes, params: dict) -> dict:
    lat: list[float] = []
    server_s: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                _, headers = client.infer_with_headers(png, glb, seed=i, **params)
                code = "200"
            except ServingError as e:
                code, headers = str(e.status), {}
            dt = time.perf_counter() - t0
            with lock:
                statuses[code] = statuses.get(code, 0) + 1
                if code == "200":
                    lat.append(dt)
                    if "x-refine-seconds" in headers:
                        server_s.append(float(headers["x-refine-seconds"]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        for _ in range(conc):
            pool.submit(worker)
    wall = time.perf_counter() - t0
    ok = statuses.get("200", 0)
    return {
        "concurrency": conc,
        "requests": n,
        "statuses": statuses,
        "wall_s": round(wall, 2),
        "rps": round(ok / wall, 3),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(pct(lat, 95), 3) if lat else None,
        "max_s": round(max(lat), 3) if lat else None,
        "server_refine_p50_s": round(statistics.median(server_s), 3) if server_s else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint; default: a tiny random one in a temp dir")
    ap.add_argument("--config", default=str(ROOT / "configs" / "infer_dit_refine-tiny.yaml"))
    ap.add_argument("--serve-config", default=str(ROOT / "configs" / "serve-tiny.yaml"))
    ap.add_argument("--requests", type=int, default=30, help=f"per concurrency level (<= {MAX_REQUESTS})")
    ap.add_argument("--concurrency", default="1,4", help="comma-separated client thread counts")
    ap.add_argument("--steps", type=int, default=None, help="default: the serving config's")
    ap.add_argument("--octree-resolution", type=int, default=None, help="default: the serving config's")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        ap.error(f"--requests must be in 1..{MAX_REQUESTS}")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        ap.error("--concurrency wants positive integers, e.g. 1,4")

    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(Path(args.config), tmp / "tiny.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = secrets.token_urlsafe(24)
    params = {k: v for k, v in {"steps": args.steps, "octree_resolution": args.octree_resolution}.items() if v}
    png, glb = inputs()
    srv = ServerProcess(
        ["--ckpt", str(ckpt), "--config", args.config, "--serve-config", args.serve_config, "--port", str(port),
         "--set", f"max_queue={max(levels)}"],
        env={ENV_KEY: key}, cwd=ROOT, start_timeout_s=600,
    )
    t_start = time.perf_counter()
    results = []
    try:
        srv.start()
        startup_s = time.perf_counter() - t_start
        client = RefineClient(srv.url, key, timeout_s=600)
        for i in range(args.warmup):
            client.infer(png, glb, seed=10_000 + i, **params)
        for conc in levels:
            r = run_level(client, args.requests, conc, png, glb, params)
            results.append(r)
            print(json.dumps(r), flush=True)
        health = client.health()
    finally:
        srv.stop()

    load = os.getloadavg()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg {load[0]:.1f}"
    print(f"\nserving load figure: {Path(ckpt).name} on {health.get('device')} via {srv.url} (loopback); "
          f"startup {startup_s:.1f} s; params {params or 'serving-config defaults'}; {machine}")
    print(f"{'clients':>7} {'requests':>8} {'ok':>4} {'503':>4} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'refine p50 s':>12}")
    for r in results:
        print(f"{r['concurrency']:>7} {r['requests']:>8} {r['statuses'].get('200', 0):>4} {r['statuses'].get('503', 0):>4} "
              f"{r['rps']:>7.2f} {r['p50_s'] or float('nan'):>7.3f} {r['p95_s'] or float('nan'):>7.3f} "
              f"{r['max_s'] or float('nan'):>7.3f} {r['server_refine_p50_s'] or float('nan'):>12.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "params": params, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
