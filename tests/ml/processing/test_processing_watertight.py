"""Watertight remeshing on real meshes: closed, outward, every part kept, no inner shell."""

from __future__ import annotations

import numpy as np
import pytest

from ml.processing.load import load_mesh
from ml.processing.sample import normalize
from ml.processing.watertight import check_watertight, make_watertight

pytestmark = pytest.mark.unit


def _wt(path, res=64, **kw):
    m = load_mesh(path)
    used = np.unique(m.faces)
    u, _, _ = normalize(m.vertices[used])
    remap = np.zeros(len(m.vertices), np.int64)
    remap[used] = np.arange(len(used))
    return u, remap[m.faces], make_watertight(u, remap[m.faces], resolution=res, **kw)


@pytest.mark.parametrize("name", ["cow.obj", "bone.ply", "elephant.off", "featuretype.stl", "CesiumMilkTruck.glb"])
def test_examples_become_watertight(examples_dir, name):
    _, _, wt = _wt(examples_dir / "meshes" / name)
    c = check_watertight(wt.vertices, wt.faces)
    assert c["watertight"], c
    assert c["boundary_edges"] == c["nonmanifold_edges"] == c["inconsistent_edges"] == 0 and c["volume"] > 0
    assert wt.vertices.min() >= 0 and wt.vertices.max() <= 1


def test_check_catches_open_and_flipped_meshes(examples_dir):
    _, _, wt = _wt(examples_dir / "meshes" / "bone.ply")
    open_ = check_watertight(wt.vertices, wt.faces[1:])
    assert not open_["watertight"] and open_["boundary_edges"] == 3
    flipped = check_watertight(wt.vertices, wt.faces[:, ::-1])
    assert not flipped["watertight"] and flipped["volume"] < 0
    one_flipped = wt.faces.copy()
    one_flipped[0] = one_flipped[0, ::-1]
    assert check_watertight(wt.vertices, one_flipped)["inconsistent_edges"] == 3


def test_inner_shell_is_removed_and_separate_parts_are_kept(examples_dir):
    """bone.ply plus a copy shrunk to 0.3 inside its shaft (an inner shell) plus a copy moved away (a second part)."""
    m = load_mesh(examples_dir / "meshes" / "bone.ply")
    v, f = m.vertices, m.faces
    c = (v.max(0) + v.min(0)) / 2
    size = (v.max(0) - v.min(0)).max()
    inner = (v - c) * 0.3 + c
    apart = v + np.array([0, 0, 1.5 * size])
    V = np.concatenate([v, inner, apart])
    F = np.concatenate([f, f + len(v), f + 2 * len(v)])
    u, _, _ = normalize(V)
    wt = make_watertight(u, F, resolution=96)
    chk = check_watertight(wt.vertices, wt.faces)
    assert chk["watertight"] and chk["parts"] == 2, chk  # the inner copy is gone, the moved copy stays
    u1, _, _ = normalize(np.concatenate([v, apart]))
    ref = check_watertight(*(lambda w: (w.vertices, w.faces))(make_watertight(u1, np.concatenate([f, f + len(v)]), resolution=96)))
    # same solid as without the inner copy: same volume, same number of faces (no inner surface)
    assert chk["volume"] == pytest.approx(ref["volume"], rel=0.01)
    assert chk["faces"] == pytest.approx(ref["faces"], rel=0.01)


def test_resolution_changes_detail_not_topology(examples_dir):
    _, _, lo = _wt(examples_dir / "meshes" / "cow.obj", res=48)
    _, _, hi = _wt(examples_dir / "meshes" / "cow.obj", res=128)
    clo, chi = check_watertight(lo.vertices, lo.faces), check_watertight(hi.vertices, hi.faces)
    assert clo["watertight"] and chi["watertight"] and chi["faces"] > 4 * clo["faces"]
    # the outward offset is `level` voxels: coarser grid, larger volume
    assert clo["volume"] > chi["volume"] > 0


@pytest.mark.parametrize(
    "rel",
    [
        "cgal/P.off",  # non-manifold edges, trimesh cannot read it
        "cgal/mpi.off",  # 33 non-manifold edges
        "cgal/double-torus-3-holes.off",  # non-manifold, 65 pieces
        "cgal/elephant-with-holes.off",  # open
        "cgal/plane.off",  # a single open sheet: becomes a thin closed slab
        "cgal/tetra_intersected_by_triangle.off",  # self-intersection
        "trimesh_models/soup.stl",  # 100 disconnected triangles
        "trimesh_models/nested.glb",
        "odedstein/tower__tower_holes.obj",
    ],
)
def test_corpus_broken_meshes_become_watertight(corpus_dir, rel):
    _, _, wt = _wt(corpus_dir / rel, res=64)
    c = check_watertight(wt.vertices, wt.faces)
    assert c["watertight"], (rel, c)


def test_corpus_small_holes_are_capped(corpus_dir):
    """triangular_hole.off is a closed surface with one hole: with hole closing the inside stays inside."""
    u, f, wt = _wt(corpus_dir / "cgal/elephant-with-holes.off", res=64, close_holes=2)
    closed = check_watertight(wt.vertices, wt.faces)
    assert closed["parts"] == 1
    # a capped solid: the centre region of the body is inside (a shell around an open surface is not)
    P = np.random.default_rng(0).random((4000, 3)).astype(np.float32)
    inside = wt.sign(P) < 0
    assert inside.mean() > 0.05
