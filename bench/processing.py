"""CPU-seconds per mesh of ml.processing at the official sizes (512^3, 16 views at 512^2, 600k points).

    nice .venv/bin/python bench/processing.py                 # corpus meshes >= 50k faces + a 1M-face sculpt
    nice .venv/bin/python bench/processing.py --min-faces 0 --resolution 128   # quick look

Meshes: every corpus mesh with >= --min-faces faces (small meshes would flatter the figure), plus a
~1.1M-face sculpt made by two Loop subdivisions of odedstein/nefertiti-lowres (70k faces), cached under
.devcache/bench/ (never committed). One worker process, so each mesh's CPU time (user+sys, measured inside
the worker around its own work) is clean; the worker keeps its grids between meshes as a real run does, so
the first mesh also pays their allocation. Prints a line per mesh with its stage breakdown, then median/p95.
`--big --min-faces 10000000 --no-sculpt` runs the ~4.5M-face sculpt alone (peak RSS of a fresh worker).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.processing import ProcessingConfig, run  # noqa: E402

CORPUS = Path(os.environ.get("ULTRASHAPE_CORPUS", ROOT.parent / "shared" / "corpus"))
SCULPT_SRC = "odedstein/nefertiti__nefertiti-lowres.obj"


def make_sculpt(cache_dir: Path, iterations: int = 2) -> Path:
    """70k * 4^iterations faces (2: ~1.1M, 3: ~4.5M): Loop subdivisions of a scan, binary PLY (cached)."""
    out = cache_dir / f"nefertiti_loop{iterations}.ply"
    if out.is_file():
        return out
    import pymeshlab

    cache_dir.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    try:
        ms = pymeshlab.MeshSet()
        ms.load_new_mesh(str(CORPUS / SCULPT_SRC))
        ms.meshing_surface_subdivision_loop(iterations=iterations, threshold=pymeshlab.PercentageValue(0))
        tmp = cache_dir / f".nefertiti_loop{iterations}.tmp.ply"
        ms.save_current_mesh(str(tmp), binary=True, save_vertex_normal=False, save_vertex_color=False)
    finally:
        os.chdir(cwd)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-faces", type=int, default=50_000)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--num-views", type=int, default=16)
    ap.add_argument("--render-size", type=int, default=512)
    ap.add_argument("--no-sculpt", action="store_true", help="skip the 1M-face sculpt")
    ap.add_argument("--big", action="store_true", help="also a ~4.5M-face sculpt (3 Loop subdivisions): the RAM check")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--keep", help="keep outputs in this folder instead of a temporary one")
    a = ap.parse_args()

    if not (CORPUS / "manifest.csv").is_file():
        sys.exit(f"corpus not found at {CORPUS}; set ULTRASHAPE_CORPUS")
    rows = list(csv.DictReader(open(CORPUS / "manifest.csv")))
    picks = [r["file"] for r in rows if r["faces"].isdigit() and int(r["faces"]) >= a.min_faces]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-processing-"))
    inp = work / "input"
    shutil.rmtree(work / "output", ignore_errors=True)
    shutil.rmtree(inp, ignore_errors=True)
    inp.mkdir(parents=True)
    for f in picks[: a.limit]:
        (inp / f.replace("/", "__")).symlink_to(CORPUS / f)
    if not a.no_sculpt:
        sculpt = make_sculpt(ROOT / ".devcache" / "bench")
        (inp / "zz_sculpt_1M.ply").symlink_to(sculpt)
    if a.big:
        (inp / "zz_sculpt_4M.ply").symlink_to(make_sculpt(ROOT / ".devcache" / "bench", 3))

    cfg = ProcessingConfig(
        input_dir=str(inp),
        output_dir=str(work / "output"),
        num_workers=1,
        resolution=a.resolution,
        num_views=a.num_views,
        render_size=a.render_size,
    )
    summary = run(cfg)
    recs = [json.loads(line) for line in open(work / "output" / "report.jsonl")]
    ok = [r for r in recs if r.get("status") == "ok"]
    stages = list(ok[0]["stage_cpu_s"]) if ok else []
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"config: {a.resolution}^3 grid, {a.num_views} views at {a.render_size}^2, 600k surface points, 1 worker\n")
    print(f"{'mesh':44s} {'faces':>9s} {'cpu_s':>6s} {'rss_MB':>7s}  " + " ".join(f"{s[:8]:>8s}" for s in stages))
    for r in recs:
        if r.get("status") != "ok":
            print(f"{r['source'][:44]:44s} {r.get('status')} {r.get('reason', '')}")
            continue
        st = r["stage_cpu_s"]
        print(
            f"{r['source'][:44]:44s} {r['faces_in']:9d} {r['cpu_s']:6.2f} {r['peak_rss_mb']:7.0f}  "
            + " ".join(f"{st.get(s, 0):8.2f}" for s in stages)
        )
    cpu = np.array([r["cpu_s"] for r in ok])
    if len(cpu):
        med = {s: float(np.median([r["stage_cpu_s"].get(s, 0) for r in ok])) for s in stages}
        print(f"\n{len(ok)} meshes: CPU-s per mesh median {np.median(cpu):.2f}, p95 {np.percentile(cpu, 95):.2f}, max {cpu.max():.2f}")
        print("median per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
        print(f"peak RSS of the worker: {max(r['peak_rss_mb'] for r in ok):.0f} MB")
    print(f"wall {summary['wall_s']} s; outputs in {work / 'output'}")


if __name__ == "__main__":
    main()
