"""The npz format the official loaders read: keys, dtypes, counts, [0,1] frame, SDF sign and size."""

from __future__ import annotations

import numpy as np
import pytest

from ml.processing import ProcessingConfig, run
from ml.processing.load import load_mesh
from ml.processing.sample import SDF, normalize, sample_surface, vertex_curvature, face_normals_areas
from ml.processing.watertight import make_watertight

RES = 64


def tiny(inp, out, **kw) -> ProcessingConfig:
    base = dict(
        input_dir=str(inp), output_dir=str(out), num_workers=2, resolution=RES, num_views=2, render_size=64,
        surface_uniform_points=4000, surface_sharp_points=4000, near_uniform_points=4000, near_sharp_points=3000,
        space_points=4000,
    )
    base.update(kw)
    return ProcessingConfig(**base)


@pytest.fixture(scope="module")
def processed(examples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples_out")
    run(tiny(examples_dir / "meshes", out), progress=False)
    return out


@pytest.mark.integration
def test_npz_keys_dtypes_and_counts(processed):
    files = sorted((processed / "samples").glob("*.npz"))
    assert len(files) == 5
    for f in files:
        with np.load(f) as z:
            assert set(z.files) == {
                "clean_surface_points", "clean_surface_normals", "uniform_near_points", "uniform_near_sdf",
                "curvature_near_points", "curvature_near_sdf", "space_points", "space_sdf", "center", "scale",
            }  # fmt: skip
            assert z["clean_surface_points"].shape == z["clean_surface_normals"].shape == (8000, 3)
            assert z["uniform_near_points"].shape == (4000, 3) and z["uniform_near_sdf"].shape == (4000,)
            assert z["curvature_near_points"].shape == (3000, 3) and z["curvature_near_sdf"].shape == (3000,)
            assert z["space_points"].shape == (4000, 3) and z["space_sdf"].shape == (4000,)
            assert z["center"].shape == (3,) and z["scale"].shape == () and float(z["scale"]) > 0
            for k in z.files:
                assert z[k].dtype == np.float32, k
                assert np.isfinite(z[k]).all(), k
            for k in ("clean_surface_points", "uniform_near_points", "curvature_near_points", "space_points"):
                p = z[k]
                assert p.min() >= 0.0 and p.max() <= 1.0, k
                q = (p - 0.5) * 2  # what the official loaders feed the VAE
                assert np.abs(q).max() <= 1.0
            n = np.linalg.norm(z["clean_surface_normals"], axis=1)
            np.testing.assert_allclose(n, 1.0, atol=1e-4)
            for k in ("uniform_near_sdf", "curvature_near_sdf", "space_sdf"):
                assert np.abs(z[k]).max() <= 0.05 + 1e-6  # sdf_truncation


@pytest.mark.integration
def test_center_and_scale_map_back_to_the_source_frame(processed, examples_dir):
    import json

    rec = {json.loads(l)["source"]: json.loads(l) for l in open(processed / "report.jsonl")}
    uid = rec["elephant.off"]["uid"]
    m = load_mesh(examples_dir / "meshes" / "elephant.off")
    with np.load(processed / "samples" / f"{uid}.npz") as z:
        back = (z["clean_surface_points"].astype(np.float64) - 0.5) * float(z["scale"]) + z["center"]
    lo, hi = m.vertices.min(0), m.vertices.max(0)
    size = (hi - lo).max()
    # surface points are on the watertight surface, offset a voxel outward: inside the source box + 2 voxels
    assert (back.min(0) >= lo - 2 * size / RES).all() and (back.max(0) <= hi + 2 * size / RES).all()


def _winding_number(P, V, F):
    """Generalised winding number of a closed mesh at points P (Jacobson et al. 2013), numpy, chunked."""
    w = np.zeros(len(P))
    A, B, C = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    for s in range(0, len(P), 256):
        p = P[s : s + 256, None, :]
        a, b, c = A[None] - p, B[None] - p, C[None] - p
        la, lb, lc = (np.linalg.norm(x, axis=2) for x in (a, b, c))
        det = np.einsum("ijk,ijk->ij", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("ijk,ijk->ij", a, b) * lc + np.einsum("ijk,ijk->ij", b, c) * la + np.einsum("ijk,ijk->ij", c, a) * lb
        w[s : s + 256] = (2 * np.arctan2(det, den)).sum(1) / (4 * np.pi)
    return w


@pytest.mark.integration
def test_sdf_sign_agrees_with_the_winding_number_of_the_closed_input(processed, examples_dir):
    """elephant.off is closed: away from the surface, sdf < 0 exactly where its winding number is 1."""
    import json

    rec = {json.loads(l)["source"]: json.loads(l) for l in open(processed / "report.jsonl")}
    uid = rec["elephant.off"]["uid"]
    m = load_mesh(examples_dir / "meshes" / "elephant.off")
    with np.load(processed / "samples" / f"{uid}.npz") as z:
        u = ((m.vertices - z["center"]) / float(z["scale"]) + 0.5)
        P = np.concatenate([z["space_points"], z["uniform_near_points"]])
        sdf = np.concatenate([z["space_sdf"], z["uniform_near_sdf"]])
    far = np.abs(sdf) > 3.0 / RES  # the watertight surface is ~1-2 voxels outside the input
    P, sdf = P[far][:3000], sdf[far][:3000]
    inside = _winding_number(P.astype(np.float64), u, m.faces) > 0.5
    assert inside.sum() > 50 and (~inside).sum() > 50
    assert ((sdf < 0) == inside).mean() > 0.995


@pytest.mark.unit
def test_sdf_magnitude_matches_brute_force(examples_dir):
    import trimesh

    m = load_mesh(examples_dir / "meshes" / "cow.obj")
    u, _, _ = normalize(m.vertices)
    wt = make_watertight(u, m.faces, resolution=RES)
    sdf = SDF(wt, 0.05)
    rng = np.random.default_rng(1)
    pts, _ = sample_surface(wt.vertices, wt.faces, 300, 1, rng)
    P = np.clip(pts[:150] + rng.standard_normal((150, 3)).astype(np.float32) * 0.02, 0, 1)
    got = np.abs(sdf(P))
    mesh = trimesh.Trimesh(wt.vertices.astype(np.float64), wt.faces, process=False)
    _, ref, _ = trimesh.proximity.closest_point_naive(mesh, P.astype(np.float64))
    ref = np.minimum(ref, 0.05)
    # descent from a coarse-grid start: exact up to a small fraction of a voxel
    assert np.median(np.abs(got - ref)) < 1e-5
    assert np.percentile(np.abs(got - ref), 99) < 0.5 / RES


@pytest.mark.unit
def test_sharp_half_follows_curvature(examples_dir):
    """featuretype.stl is a machined part: the second half of the points gathers on its edges."""
    from scipy.spatial import cKDTree

    m = load_mesh(examples_dir / "meshes" / "featuretype.stl")
    u, _, _ = normalize(m.vertices)
    wt = make_watertight(u, m.faces, resolution=RES)
    pts, nrm = sample_surface(wt.vertices, wt.faces, 3000, 3000, np.random.default_rng(0))
    fn, area = face_normals_areas(wt.vertices, wt.faces)
    curv = vertex_curvature(wt.vertices, wt.faces, fn, area)
    _, idx = cKDTree(wt.vertices).query(pts)
    assert curv[idx[3000:]].mean() > 2 * curv[idx[:3000]].mean()
