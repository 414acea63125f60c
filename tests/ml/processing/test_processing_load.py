"""Reading real files, the broken ones included: every part kept, clear rejection reasons."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ml.processing.load import Rejected, load_mesh, strips_to_faces

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name,faces", [("cow.obj", 5804), ("bone.ply", 3022), ("elephant.off", 5558), ("featuretype.stl", 3476)])
def test_examples_load_with_all_faces(examples_dir, name, faces):
    m = load_mesh(examples_dir / "meshes" / name)
    assert m.faces.shape == (faces, 3) and m.faces.max() < len(m.vertices)
    assert np.isfinite(m.vertices).all()


def test_multi_node_glb_keeps_every_node_with_its_transform(examples_dir):
    import trimesh

    m = load_mesh(examples_dir / "meshes" / "CesiumMilkTruck.glb")
    scene = trimesh.load(examples_dir / "meshes" / "CesiumMilkTruck.glb")
    ref = scene.to_geometry()  # trimesh's own flattening, with node transforms
    assert m.parts == len(scene.graph.nodes_geometry) > 1
    assert len(m.faces) == len(ref.faces)
    np.testing.assert_allclose(np.sort(m.vertices, axis=0), np.sort(np.asarray(ref.vertices), axis=0), atol=1e-6)


def test_tristrip_ply_ascii_and_binary(tmp_path, examples_dir):
    """Old scans store faces as a `tristrips` element; trimesh reads them as a point cloud."""
    m = load_mesh(examples_dir / "meshes" / "bone.ply")
    v, f = m.vertices, m.faces
    # one strip per triangle pair would be too easy: write each face as its own strip, joined by -1,
    # plus one long real strip over a fan-free run: [a b c d] = (a b c), (c b d)
    strip = np.concatenate([np.r_[tri, -1] for tri in f]).astype(np.int32)
    header = (
        "ply\nformat {fmt} 1.0\nelement vertex {nv}\nproperty float x\nproperty float y\nproperty float z\n"
        "element tristrips 1\nproperty list int int vertex_indices\nend_header\n"
    )
    asc = tmp_path / "strips_ascii.ply"
    asc.write_text(
        header.format(fmt="ascii", nv=len(v))
        + "".join(f"{a} {b} {c}\n" for a, b, c in v)
        + f"{len(strip)} " + " ".join(map(str, strip)) + "\n"
    )
    binp = tmp_path / "strips_bin.ply"
    binp.write_bytes(
        header.format(fmt="binary_little_endian", nv=len(v)).encode()
        + v.astype("<f4").tobytes()
        + np.int32(len(strip)).astype("<i4").tobytes()
        + strip.astype("<i4").tobytes()
    )
    for p in (asc, binp):
        got = load_mesh(p)
        assert got.loader in ("tristrips", "pymeshlab")
        assert len(got.faces) == len(f)
        np.testing.assert_allclose(got.vertices, v.astype(np.float32), atol=1e-5)


def test_strip_winding_alternates():
    faces = strips_to_faces([np.array([0, 1, 2, 3, 4, -1, 5, 6, 7])])
    assert faces.tolist() == [[0, 1, 2], [2, 1, 3], [2, 3, 4], [5, 6, 7]]


def test_unreadable_file(tmp_path):
    p = tmp_path / "garbage.obj"
    p.write_bytes(os.urandom(3000))
    with pytest.raises(Rejected) as e:
        load_mesh(p)
    assert e.value.reason in ("unreadable", "empty")


# ----------------------------------------------------------------------------- corpus
@pytest.mark.parametrize(
    "rel", ["trimesh_models/empty.stl", "trimesh_models/stl_empty_ascii.stl", "trimesh_models/stl_empty_bin.stl", "trimesh_models/empty_nodes.glb"]
)
def test_corpus_empty_files_rejected_as_empty(corpus_dir, rel):
    cwd = os.getcwd()
    with pytest.raises(Rejected) as e:
        load_mesh(corpus_dir / rel)
    assert e.value.reason == "empty", str(e.value)
    assert os.getcwd() == cwd  # pymeshlab's failed load must not move us


@pytest.mark.parametrize("rel,faces", [("cgal/P.off", 52), ("cgal/mpi.off", 180), ("cgal/double-torus-3-holes.off", 428), ("cgal/mesh_with_colors.off", 6)])
def test_corpus_off_files_trimesh_cannot_read(corpus_dir, rel, faces):
    m = load_mesh(corpus_dir / rel)
    assert m.loader == "pymeshlab" and len(m.faces) == faces


@pytest.mark.parametrize("rel,faces", [("trimesh_models/nested.glb", 36), ("odedstein/pizza__pizza.obj", 49954), ("c3d/horse.ply", 96966)])
def test_corpus_many_parts_all_kept(corpus_dir, rel, faces):
    m = load_mesh(corpus_dir / rel)
    assert len(m.faces) == faces
