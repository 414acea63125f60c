"""The whole run: data lists, render.json, report, reruns, changed files, timeouts, broken inputs, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ml.processing import ProcessingConfig, run
from ml.processing.pipeline import split_uids

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


def tiny(inp, out, **kw) -> ProcessingConfig:
    base = dict(
        input_dir=str(inp), output_dir=str(out), num_workers=2, resolution=48, num_views=3, render_size=48,
        surface_uniform_points=1000, surface_sharp_points=1000, near_uniform_points=1000, near_sharp_points=1000,
        space_points=1000, val_ratio=0.25,
    )
    base.update(kw)
    return ProcessingConfig(**base)


def report(out: Path) -> dict[str, dict]:
    return {r["source"]: r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}


@pytest.fixture()
def examples_copy(examples_dir, tmp_path):
    inp = tmp_path / "input"
    shutil.copytree(examples_dir / "meshes", inp)
    return inp


def test_run_writes_the_official_layout(examples_copy, tmp_path):
    out = tmp_path / "out"
    s = run(tiny(examples_copy, out), progress=False)
    assert s["ok"] == 5 and s["rejected"] == 0 and s["processed_now"] == 5
    rep = report(out)
    assert set(rep) == {"cow.obj", "CesiumMilkTruck.glb", "bone.ply", "elephant.off", "featuretype.stl"}
    for r in rep.values():
        assert r["status"] == "ok" and r["check"]["watertight"] and r["check"]["boundary_edges"] == 0
        assert r["cpu_s"] > 0 and "wt_mc" in r["stage_cpu_s"] and len(r["uid"]) == 16
    uids = {r["uid"] for r in rep.values()}
    train = json.loads((out / "data_list" / "train.json").read_text())
    val = json.loads((out / "data_list" / "val.json").read_text())
    assert set(train) | set(val) == uids and not set(train) & set(val) and len(val) >= 1
    # the official image loader: f"{render_json[uid]}/{basename(render_json[uid])}/rgba/NNN.png"
    rj = json.loads((out / "render.json").read_text())
    assert set(rj) == uids
    for uid, p in rj.items():
        for i in range(3):
            img = f"{p}/{os.path.basename(p)}/rgba/{i:03d}.png"
            assert os.path.isfile(img), img
        assert Path(p) == (out / "renders" / uid).resolve()  # and what pathlib (our trainer) makes of it
        cams = json.loads((out / "renders" / uid / "cameras.json").read_text())["views"]
        assert len(cams) == 3
        assert (out / "samples" / f"{uid}.npz").is_file()
    assert (out / "contact_sheet.png").stat().st_size > 1000
    # nothing half-written is visible
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_rerun_skips_and_changed_file_is_redone(examples_copy, tmp_path):
    out = tmp_path / "out"
    run(tiny(examples_copy, out), progress=False)
    before = {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*.npz")}
    s = run(tiny(examples_copy, out), progress=False)
    assert s["processed_now"] == 0 and s["skipped"] == 5 and s["ok"] == 5
    assert before == {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*.npz")}
    # edit one file: a new uid, processed; the old uid leaves the lists
    old = report(out)["cow.obj"]["uid"]
    with open(examples_copy / "cow.obj", "a") as f:
        f.write("\n# touched\n")
    s = run(tiny(examples_copy, out), progress=False)
    new = report(out)["cow.obj"]["uid"]
    assert new != old and s["processed_now"] == 1 and s["skipped"] == 4
    lists = json.loads((out / "data_list" / "train.json").read_text()) + json.loads((out / "data_list" / "val.json").read_text())
    assert new in lists and old not in lists
    # an output setting changes: everything is redone
    s = run(tiny(examples_copy, out, resolution=40), progress=False)
    assert s["processed_now"] == 5


def test_limit_takes_the_first_in_path_order(examples_copy, tmp_path):
    s = run(tiny(examples_copy, tmp_path / "out", limit=2), progress=False)
    assert s["inputs"] == 2
    assert set(report(tmp_path / "out")) == {"CesiumMilkTruck.glb", "bone.ply"}  # sorted by path


def test_duplicate_bytes_are_processed_once(examples_copy, tmp_path):
    shutil.copy(examples_copy / "bone.ply", examples_copy / "bone_copy.ply")
    s = run(tiny(examples_copy, tmp_path / "out"), progress=False)
    rep = report(tmp_path / "out")
    assert rep["bone_copy.ply"]["status"] == "duplicate" and rep["bone_copy.ply"]["duplicate_of"] == "bone.ply"
    assert s["ok"] == 5 and s["processed_now"] == 5


def test_hanging_mesh_is_killed_and_the_batch_goes_on(examples_copy, tmp_path):
    t = time.time()
    s = run(tiny(examples_copy, tmp_path / "out", timeout_s=4.0, debug_hang_on="elephant"), progress=False)
    rep = report(tmp_path / "out")
    assert rep["elephant.off"]["status"] == "rejected" and rep["elephant.off"]["reason"] == "timeout"
    assert s["ok"] == 4 and s["reasons"] == {"timeout": 1}
    assert time.time() - t < 60
    # a timeout is retried on the next run (the hook is gone now)
    s = run(tiny(examples_copy, tmp_path / "out"), progress=False)
    assert s["processed_now"] == 1 and s["ok"] == 5


def test_split_is_deterministic_and_stable():
    uids = [f"{i:016x}" for i in range(200)]
    tr, va = split_uids(uids, 0.1)
    assert split_uids(list(reversed(uids)), 0.1) == (tr, va)
    assert 8 <= len(va) <= 35 and len(tr) + len(va) == 200
    tr2, va2 = split_uids(uids + [f"{i:016x}" for i in range(1000, 1100)], 0.1)
    assert set(va) <= set(va2)  # adding meshes never moves old ones
    assert split_uids(["a"], 0.5) == (["a"], [])


def test_cli_flags_override_the_config_and_errors_name_the_key(tmp_path, examples_copy):
    py = [sys.executable, "-m", "ml.processing"]
    base = ["--config", "configs/processing-tiny.yaml", "--input-dir", str(examples_copy), "--quiet"]
    r = subprocess.run(py + base + ["--output-dir", str(tmp_path / "o"), "--resolution", "40", "--num-views", "2",
                       "--limit", "1", "--set", "render_size=32", "surface_uniform_points=500", "surface_sharp_points=500"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["config"]
    assert cfg["resolution"] == 40 and cfg["num_views"] == 2 and cfg["render_size"] == 32 and cfg["limit"] == 1
    assert len(list((tmp_path / "o" / "renders").glob("*/rgba/*.png"))) == 2
    r = subprocess.run(py + base + ["--output-dir", str(tmp_path / "o2"), "--set", "resolutoin=64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "resolutoin" in r.stderr and "resolution" in r.stderr
    r = subprocess.run(py + ["--input-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o3")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "nope" in r.stderr


def test_kill_9_mid_run_loses_nothing(examples_copy, tmp_path):
    """kill -9 the CLI and its workers while one mesh hangs and the others are done, then rerun."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ml.processing", "--config", "configs/processing-tiny.yaml", "--input-dir", str(examples_copy),
           "--output-dir", str(out), "--resolution", "48", "--num-views", "3", "--num-workers", "2", "--quiet",
           "--set", "debug_hang_on=featuretype", "timeout_s=600"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "meta").glob("*.json"))) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        assert len(list((out / "meta").glob("*.json"))) == 4
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # what is visible is whole: every npz loads, every meta parses
    for f in (out / "samples").glob("*.npz"):
        with np.load(f) as z:
            assert z["clean_surface_points"].shape[0] > 0
    for f in (out / "meta").glob("*.json"):
        json.loads(f.read_text())
    r = subprocess.run(cmd[: cmd.index("--set")] + ["--set", "timeout_s=600"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = report(out)
    assert all(v["status"] == "ok" for v in rep.values()) and len(rep) == 5
    assert sum(1 for v in rep.values() if v.get("skipped")) == 4  # only the interrupted mesh was redone
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_corpus_broken_batch(corpus_dir, tmp_path):
    """A batch of real broken files: each is processed or rejected with its reason, none stops the run."""
    inp = tmp_path / "input"
    inp.mkdir()
    picks = {
        "trimesh_models/empty.stl": "empty",
        "trimesh_models/stl_empty_ascii.stl": "empty",
        "trimesh_models/stl_empty_bin.stl": "empty",
        "trimesh_models/empty_nodes.glb": "empty",
        "cgal/P.off": "ok",  # non-manifold, trimesh cannot read it
        "cgal/mpi.off": "ok",
        "cgal/double-torus-3-holes.off": "ok",
        "trimesh_models/soup.stl": "ok",
        "trimesh_models/nested.glb": "ok",
        "odedstein/pizza__pizza.obj": "ok",  # 4,740 parts
        "c3d/horse.ply": "ok",
    }
    for rel in picks:
        (inp / rel.replace("/", "__")).symlink_to(corpus_dir / rel)
    (inp / "garbage.obj").write_bytes(os.urandom(5000))
    (inp / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")  # zero area
    s = run(tiny(inp, tmp_path / "out"), progress=False)
    rep = report(tmp_path / "out")
    for rel, want in picks.items():
        r = rep[rel.replace("/", "__")]
        assert (r["status"] if want == "ok" else r.get("reason")) == want, (rel, r)
    assert rep["garbage.obj"]["reason"] in ("unreadable", "empty")
    assert rep["flat.obj"]["reason"] == "degenerate"
    assert s["ok"] == 7


def test_too_large_is_rejected_before_the_work(examples_copy, tmp_path):
    s = run(tiny(examples_copy, tmp_path / "out", max_faces=4000), progress=False)
    rep = report(tmp_path / "out")
    big = {k for k, v in rep.items() if v.get("reason") == "too_large"}
    assert big == {"cow.obj", "elephant.off"}  # 5,804 and 5,558 faces; the others have fewer than 4,000
    assert all("max_faces" in rep[k]["message"] for k in big) and s["ok"] == 3


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")
def test_workers_die_with_a_kill_9_parent(examples_copy, tmp_path):
    """kill -9 ONLY the CLI while its workers hang: they must not be left running (daemon=True does nothing here)."""
    cmd = [sys.executable, "-m", "ml.processing", "--config", "configs/processing-tiny.yaml", "--input-dir", str(examples_copy),
           "--output-dir", str(tmp_path / "out"), "--resolution", "48", "--num-views", "3", "--num-workers", "2", "--quiet",
           "--set", f"debug_hang_on={examples_copy.name}", "timeout_s=600"]  # fmt: skip  (every mesh hangs)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_children(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        time.sleep(1.0)  # let them take their (hanging) meshes
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived their kill -9'd parent"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
