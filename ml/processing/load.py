"""Read any mesh file we meet into one triangle soup (vertices, faces), every part kept.

    mesh = load_mesh("horse.ply")      # LoadedMesh(vertices (V,3) float64, faces (F,3) int64, parts, loader)

trimesh first (fast, scene graphs with transforms), pymeshlab where trimesh fails or reads no faces.
Traps on real files (see ../shared/corpus/SOURCES.md):
- old `tristrips` PLY files come out of trimesh as point clouds with no faces and no error: we read the
  strips ourselves (-1 separates strips, alternate triangles flip to keep the winding);
- trimesh 5.2 with numpy 2 raises on some OFF files: pymeshlab reads them;
- pymeshlab's load_new_mesh changes the working directory and does not restore it when the load fails;
- GLB/OBJ files hold thousands of parts: all are merged, none dropped.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MESH_SUFFIXES = (".obj", ".stl", ".glb", ".gltf", ".ply", ".off")


class Rejected(Exception):
    """A mesh we will not process; `reason` is one of the report's rejection reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # empty | unreadable | degenerate | too_large | timeout | crashed | failed


@dataclass
class LoadedMesh:
    vertices: np.ndarray  # (V,3) float64, source frame
    faces: np.ndarray  # (F,3) int64
    parts: int  # geometry nodes merged (a scene's instances, or 1)
    loader: str  # trimesh | pymeshlab | tristrips


def load_mesh(path: str | os.PathLike) -> LoadedMesh:
    path = Path(path)
    errors = []
    mesh = None
    try:
        mesh = _load_trimesh(path)
    except Exception as e:  # noqa: BLE001 - any parser failure falls through to the next reader
        errors.append(f"trimesh: {type(e).__name__}: {e}")
    if (mesh is None or len(mesh.faces) == 0) and path.suffix.lower() == ".ply":
        try:
            strips = _load_tristrip_ply(path)
            if strips is not None:
                mesh = strips
        except Exception as e:  # noqa: BLE001
            errors.append(f"tristrips: {type(e).__name__}: {e}")
    if (mesh is None or len(mesh.faces) == 0) and path.suffix.lower() in (".ply", ".off", ".obj", ".stl"):
        try:
            mesh = _load_pymeshlab(path)
        except Exception as e:  # noqa: BLE001
            errors.append(f"pymeshlab: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if mesh is None:
        raise Rejected("unreadable", f"{path}: no reader could parse it ({'; '.join(errors)})")
    mesh = _clean(mesh)
    if len(mesh.faces) == 0:
        raise Rejected("empty", f"{path}: the file holds no triangles (an empty file or a point cloud)")
    return mesh


def _load_trimesh(path: Path) -> LoadedMesh:
    import trimesh

    obj = trimesh.load(str(path), process=False)
    if isinstance(obj, trimesh.Scene):
        verts, faces, off, parts = [], [], 0, 0
        for node in obj.graph.nodes_geometry:
            transform, name = obj.graph[node]
            g = obj.geometry.get(name)
            if not isinstance(g, trimesh.Trimesh) or len(g.faces) == 0:
                continue
            v = np.asarray(g.vertices, np.float64)
            v = v @ transform[:3, :3].T + transform[:3, 3]
            verts.append(v)
            faces.append(np.asarray(g.faces, np.int64) + off)
            off += len(v)
            parts += 1
        if not verts:
            return LoadedMesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), 0, "trimesh")
        return LoadedMesh(np.concatenate(verts), np.concatenate(faces), parts, "trimesh")
    if isinstance(obj, trimesh.Trimesh):
        return LoadedMesh(np.asarray(obj.vertices, np.float64), np.asarray(obj.faces, np.int64), 1, "trimesh")
    # PointCloud, Path: no faces
    return LoadedMesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), 0, "trimesh")


def _load_pymeshlab(path: Path) -> LoadedMesh:
    import pymeshlab

    cwd = os.getcwd()  # load_new_mesh chdirs to the file's folder and leaves it there on failure
    try:
        ms = pymeshlab.MeshSet()
        ms.load_new_mesh(str(path.resolve()))
        m = ms.current_mesh()
        v = np.asarray(m.vertex_matrix(), np.float64)
        f = np.asarray(m.face_matrix(), np.int64)
    finally:
        os.chdir(cwd)
    return LoadedMesh(v, f.reshape(-1, 3), 1, "pymeshlab")


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def _load_tristrip_ply(path: Path) -> LoadedMesh | None:
    """PLY files whose faces are an element `tristrips` with a list property `vertex_indices`
    (old Stanford/Cyberware scans). Returns None when the file has no such element."""
    data = path.read_bytes()
    end = data.find(b"end_header")
    if end < 0:
        return None
    header = data[:end].decode("ascii", "replace").splitlines()
    body_start = data.index(b"\n", end) + 1
    fmt = None
    elements: list[tuple[str, int, list]] = []
    for line in header:
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements:
            elements[-1][2].append(tok[1:])
    if not any(e[0] == "tristrips" for e in elements):
        return None
    verts = None
    strips: list[np.ndarray] = []
    if fmt == "ascii":
        words = data[body_start:].split()
        pos = 0
        for name, count, props in elements:
            if name == "vertex":
                nprop = len(props)
                arr = np.array(words[pos : pos + count * nprop], dtype=np.float64).reshape(count, nprop)
                names = [p[-1] for p in props]
                verts = arr[:, [names.index("x"), names.index("y"), names.index("z")]]
                pos += count * nprop
            else:
                for _ in range(count):
                    for p in props:
                        if p[0] == "list":
                            k = int(words[pos])
                            vals = np.array(words[pos + 1 : pos + 1 + k], dtype=np.int64)
                            if name == "tristrips":
                                strips.append(vals)
                            pos += 1 + k
                        else:
                            pos += 1
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        pos = body_start
        for name, count, props in elements:
            if name == "vertex" and all(p[0] != "list" for p in props):
                dt = np.dtype([(p[1], endian + _PLY_TYPES[p[0]]) for p in props])
                arr = np.frombuffer(data, dt, count, pos)
                verts = np.stack([arr["x"], arr["y"], arr["z"]], axis=1).astype(np.float64)
                pos += dt.itemsize * count
                continue
            for _ in range(count):
                for p in props:
                    if p[0] == "list":
                        ct, it = endian + _PLY_TYPES[p[1]], endian + _PLY_TYPES[p[2]]
                        k = struct.unpack_from(ct, data, pos)[0]
                        pos += struct.calcsize(ct)
                        vals = np.frombuffer(data, it, k, pos).astype(np.int64)
                        pos += k * struct.calcsize(it)
                        if name == "tristrips":
                            strips.append(vals)
                    else:
                        pos += struct.calcsize(endian + _PLY_TYPES[p[0]])
    if verts is None:
        return None
    return LoadedMesh(verts, strips_to_faces(strips), 1, "tristrips")


def strips_to_faces(strips: list[np.ndarray]) -> np.ndarray:
    """Triangle strips (-1 restarts a strip) -> triangles, flipping every other one to keep the winding."""
    faces = []
    for s in strips:
        cuts = np.flatnonzero(s < 0)
        for run in np.split(s, cuts):
            run = run[run >= 0]
            if len(run) < 3:
                continue
            a, b, c = run[:-2], run[1:-1], run[2:]
            tri = np.stack([a, b, c], axis=1)
            odd = np.arange(len(tri)) % 2 == 1
            tri[odd] = tri[odd][:, [1, 0, 2]]
            faces.append(tri)
    return np.concatenate(faces) if faces else np.zeros((0, 3), np.int64)


def _clean(mesh: LoadedMesh) -> LoadedMesh:
    """Drop faces that point at missing or non-finite vertices, or repeat a vertex (zero area by index)."""
    v, f = mesh.vertices, mesh.faces
    if len(f) == 0:
        return mesh
    ok = (f >= 0).all(1) & (f < len(v)).all(1)
    f = f[ok]
    finite = np.isfinite(v).all(1)
    if not finite.all():
        f = f[finite[f].all(1)]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    return LoadedMesh(v, f, mesh.parts, mesh.loader)
