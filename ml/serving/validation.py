"""Checks on what a client sends to POST /infer, each failing with a 4xx that names the problem.

Two layers use these functions:
- the HTTP guard (ml/serving/guard.py), in the API server process, before a request is queued:
  form structure, sizes, parameters, and the file formats sniffed from their first bytes;
- the worker's decode_request (ml/serving/api.py): the full image and mesh decode.

Formats are recognised by content, never by the file name or the part's Content-Type, which are
whatever the client says they are.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

from ml.serving.config import DefaultsConfig, LimitsConfig

IMAGE_FIELD = "image"
MESH_FIELD = "coarse_mesh"
FILE_FIELDS = (IMAGE_FIELD, MESH_FIELD)
PARAM_FIELDS = ("steps", "guidance", "octree_resolution", "seed", "timeout_s")
KNOWN_FIELDS = FILE_FIELDS + PARAM_FIELDS
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MESH_FORMATS = ("glb", "obj", "ply", "stl", "off")
MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds below 2**32; torch's takes more
MIN_STEPS = 2  # ml.refine: the last Euler step has dt = 0, so fewer than 2 would return pure noise


class RequestError(Exception):
    """A client error: HTTP status, a stable machine-readable code, a message saying what to fix."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            d["field"] = self.field
        return d


@dataclass(frozen=True)
class InferParams:
    steps: int
    guidance: float
    octree_resolution: int
    seed: int
    timeout_s: float | None = None  # the client's own limit (<= the server's request_timeout_s); None: the server's


# ---------------------------------------------------------------------------------------- fields

_INT_RE = re.compile(r"^[+-]?\d{1,20}$")


def _parse_int(name: str, raw: str, lo: int, hi: int) -> int:
    s = raw.strip()
    if not _INT_RE.match(s):
        raise RequestError(422, "invalid_parameter", f"'{name}' must be an integer, got {raw[:40]!r}", name)
    v = int(s)
    if not lo <= v <= hi:
        raise RequestError(422, "parameter_out_of_range", f"'{name}' must be in {lo}..{hi}, got {v}", name)
    return v


def _parse_float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        v = float(raw.strip())
    except ValueError:
        raise RequestError(422, "invalid_parameter", f"'{name}' must be a number, got {raw[:40]!r}", name) from None
    if not math.isfinite(v):
        raise RequestError(422, "invalid_parameter", f"'{name}' must be a finite number, got {raw[:40]!r}", name)
    if not lo <= v <= hi:
        raise RequestError(422, "parameter_out_of_range", f"'{name}' must be in {lo:g}..{hi:g}, got {v:g}", name)
    return v


def parse_params(
    fields: dict[str, str], defaults: DefaultsConfig, limits: LimitsConfig, max_timeout_s: float = math.inf
) -> InferParams:
    """Text form fields -> typed, range-checked parameters (defaults for those left out)."""
    steps = defaults.steps
    guidance = defaults.guidance
    octree = defaults.octree_resolution
    seed = defaults.seed
    if "steps" in fields:
        steps = _parse_int("steps", fields["steps"], MIN_STEPS, limits.max_steps)
    if "guidance" in fields:
        guidance = _parse_float("guidance", fields["guidance"], 0.0, limits.max_guidance)
    if "octree_resolution" in fields:
        octree = _parse_int(
            "octree_resolution",
            fields["octree_resolution"],
            limits.min_octree_resolution,
            limits.max_octree_resolution,
        )
    if "seed" in fields:
        seed = _parse_int("seed", fields["seed"], 0, MAX_SEED)
    timeout_s = None
    if "timeout_s" in fields:
        timeout_s = _parse_float("timeout_s", fields["timeout_s"], 0.0, max_timeout_s)
        if timeout_s <= 0:
            raise RequestError(422, "parameter_out_of_range", "'timeout_s' must be > 0", "timeout_s")
    return InferParams(steps=steps, guidance=guidance, octree_resolution=octree, seed=seed, timeout_s=timeout_s)


def split_form(items: list[tuple[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Multipart items -> ({file field: upload}, {param field: text}); structure errors are 400.

    `items` is FormData.multi_items(): uploads have .filename/.file/.size, text fields are str.
    """
    files: dict[str, Any] = {}
    params: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in items:
        if name not in KNOWN_FIELDS:
            raise RequestError(
                400, "unknown_field", f"unknown form field '{name[:40]}'; known fields: {', '.join(KNOWN_FIELDS)}", name
            )
        if name in seen:
            raise RequestError(400, "duplicate_field", f"form field '{name}' was sent more than once", name)
        seen.add(name)
        is_file = hasattr(value, "filename") and hasattr(value, "file")
        if name in FILE_FIELDS:
            if not is_file:
                raise RequestError(
                    400,
                    "not_a_file",
                    f"'{name}' must be a file upload (curl: -F {name}=@path), not a text field",
                    name,
                )
            files[name] = value
        else:
            if is_file:
                raise RequestError(400, "not_a_value", f"'{name}' must be a plain form value, not a file", name)
            params[name] = value
    for name in FILE_FIELDS:
        if name not in files:
            what = "a reference image (PNG/JPEG/WEBP)" if name == IMAGE_FIELD else "the coarse mesh (GLB/OBJ/PLY/STL/OFF)"
            raise RequestError(400, "missing_field", f"missing file field '{name}': send {what}", name)
    return files, params


def check_part_size(name: str, size: int, limits: LimitsConfig) -> None:
    cap = limits.max_image_bytes if name == IMAGE_FIELD else limits.max_mesh_bytes
    if size == 0:
        raise RequestError(400, "empty_file", f"'{name}' is an empty file (0 bytes)", name)
    if size > cap:
        raise RequestError(413, "file_too_large", f"'{name}' is {size} bytes; the limit is {cap} bytes", name)


# ---------------------------------------------------------------------------------------- sniffing

_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"PK\x03\x04", "a zip archive (or USDZ)"),
    (b"\x1f\x8b", "a gzip file"),
    (b"7z\xbc\xaf", "a 7z archive"),
    (b"%PDF", "a PDF"),
    (b"Kaydara FBX Binary", "an FBX file"),
    (b"BLENDER", "a .blend file"),
    (b"glTF", "a GLB mesh"),
    (b"ply", "a PLY mesh"),
)


def _foreign(data: bytes) -> str | None:
    for magic, what in _FOREIGN_MAGIC:
        if data.startswith(magic):
            return what
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WEBP image"
    return None


def sniff_image(data: bytes) -> str:
    """PNG / JPEG / WEBP from the first bytes, else 415 saying what it looks like instead."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    what = _foreign(data) or "not an image this server reads"
    raise RequestError(
        415, "unsupported_image_format", f"'image' is {what}; send PNG, JPEG or WEBP (RGBA PNG preferred)", IMAGE_FIELD
    )


def _text_head(data: bytes, n: int = 65536) -> str | None:
    head = data[:n].removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors); trimesh skips it too
    if b"\x00" in head:
        return None
    return head.decode("latin-1")


_OBJ_KEYWORDS = {"v", "vn", "vt", "vp", "f", "l", "p", "o", "g", "s", "usemtl", "mtllib", "cstype", "deg", "curv"}


def sniff_mesh(data: bytes) -> str:
    """glb / ply / stl / off / obj from the content, else 415 saying what it looks like instead."""
    if data.startswith(b"glTF"):
        return "glb"
    if data[:3] == b"ply" and data[3:4] in (b"\n", b"\r"):
        return "ply"
    if len(data) >= 84:
        (n_tri,) = struct.unpack_from("<I", data, 80)
        if 84 + 50 * n_tri == len(data):  # binary STL: its size is fixed by the triangle count
            return "stl"
    text = _text_head(data)
    if text is not None:
        stripped = text.lstrip()
        if stripped[:5].lower() == "solid" and ("facet" in text or "endsolid" in text):
            return "stl"
        first = _first_token(text)
        if first in ("OFF", "COFF", "NOFF", "CNOFF", "STOFF") or (first.endswith("OFF") and len(first) <= 6):
            return "off"
        if first in _OBJ_KEYWORDS:
            return "obj"
        if stripped.startswith("{") and '"asset"' in text:
            raise RequestError(
                415,
                "unsupported_mesh_format",
                "'coarse_mesh' is a .gltf JSON file, whose buffers live in separate files; export binary .glb instead",
                MESH_FIELD,
            )
    what = _foreign(data) or "not a mesh format this server reads"
    raise RequestError(
        415,
        "unsupported_mesh_format",
        f"'coarse_mesh' is {what}; send one of: {', '.join(MESH_FORMATS)} (recognised by content, not by name)",
        MESH_FIELD,
    )


def _first_token(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        return line.split()[0]
    return ""


# ---------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, limits: LimitsConfig):
    """Bytes -> a loaded PIL image (RGB or RGBA); corrupt, truncated or out-of-bounds -> 4xx."""
    try:
        return _decode_image(data, limits)
    except RequestError:
        raise
    except Exception as e:  # a decoder path not foreseen below: still the upload's fault, not a 500
        raise RequestError(422, "corrupt_image", f"'image' cannot be decoded ({type(e).__name__}: {e})", IMAGE_FIELD)


def _decode_image(data: bytes, limits: LimitsConfig):
    from PIL import Image

    fmt = sniff_image(data)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        w, h = img.size  # from the header, before any pixel is decoded
    except Exception as e:  # PIL raises several types for a bad header
        raise RequestError(422, "corrupt_image", f"'image' has a {fmt} signature but cannot be read: {e}", IMAGE_FIELD)
    if max(w, h) > limits.max_image_side:
        raise RequestError(
            413,
            "image_too_large",
            f"'image' is {w}x{h} px; the largest side allowed is {limits.max_image_side} px (the model sees 518 px)",
            IMAGE_FIELD,
        )
    if min(w, h) < limits.min_image_side:
        raise RequestError(
            422,
            "image_too_small",
            f"'image' is {w}x{h} px; each side must be at least {limits.min_image_side} px",
            IMAGE_FIELD,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:
        raise RequestError(
            422, "corrupt_image", f"'image' is a damaged or truncated {fmt} ({type(e).__name__}: {e})", IMAGE_FIELD
        )
    if img.mode not in ("RGB", "RGBA"):
        # Palette, greyscale and 16-bit images become RGB(A) here, where the error, if any, is ours.
        has_alpha = img.mode in ("LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
        try:
            img = img.convert("RGBA" if has_alpha else "RGB")
        except Exception as e:  # a pixel mode PIL cannot map to RGB
            raise RequestError(
                422, "unsupported_image_mode", f"'image' has pixel mode {img.mode}, which cannot be read as RGB(A): {e}",
                IMAGE_FIELD,
            )
    return img


def decode_mesh(data: bytes, limits: LimitsConfig):
    """Bytes -> one trimesh.Trimesh in the file's own frame (scene transforms applied); else 4xx."""
    try:
        return _decode_mesh(data, limits)
    except RequestError:
        raise
    except Exception as e:  # e.g. a scene graph trimesh loads but cannot flatten: the upload's fault
        raise RequestError(422, "corrupt_mesh", f"'coarse_mesh' cannot be used ({type(e).__name__}: {e})", MESH_FIELD)


def _decode_mesh(data: bytes, limits: LimitsConfig):
    import numpy as np
    import trimesh

    fmt = sniff_mesh(data)
    if fmt == "glb":
        _check_glb_header(data)
    try:
        # process=False keeps the client's vertices exactly (no merging): the answer must come back
        # in the frame and units they sent.
        loaded = trimesh.load(io.BytesIO(data), file_type=fmt, process=False)
    except Exception as e:  # trimesh loaders raise many types on a malformed file
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if fmt != "off":
            raise RequestError(422, "corrupt_mesh", f"'coarse_mesh' ({fmt}) cannot be parsed: {msg}", MESH_FIELD)
        # trimesh reads triangle-only OFF; CGAL and Geomview write quads and n-gons (6 of the 138 OFF
        # files in our corpus). Those are read here in plain Python rather than through a native
        # library that a hostile file could crash.
        loaded = _load_polygon_off(data, limits)

    if isinstance(loaded, trimesh.Scene):
        # dump() copies every geometry once per node that instances it: a small GLB whose one mesh
        # is referenced by thousands of nodes expands to gigabytes there. Count the faces the
        # flattened scene would have first and refuse before building it.
        n_inst = 0
        for node in loaded.graph.nodes_geometry:
            g = loaded.geometry.get(loaded.graph[node][1])
            n_inst += len(g.faces) if isinstance(g, trimesh.Trimesh) else 0
            if n_inst > limits.max_mesh_faces:
                raise RequestError(
                    413,
                    "mesh_too_large",
                    f"'coarse_mesh' has more than {limits.max_mesh_faces} faces once its scene instances are "
                    f"expanded ({len(loaded.graph.nodes_geometry)} instances); the limit is "
                    f"{limits.max_mesh_faces} (decimate it or export it without instancing)",
                    MESH_FIELD,
                )
        geoms = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        if not geoms:
            raise RequestError(
                422, "empty_mesh", f"'coarse_mesh' ({fmt}) contains no triangles (an empty scene)", MESH_FIELD
            )
        mesh = trimesh.util.concatenate(geoms) if len(geoms) > 1 else geoms[0]
    elif isinstance(loaded, trimesh.Trimesh):
        mesh = loaded
    else:
        kind = type(loaded).__name__
        raise RequestError(
            422, "empty_mesh", f"'coarse_mesh' ({fmt}) is a {kind} with no triangles; send a surface mesh", MESH_FIELD
        )

    n_v, n_f = len(mesh.vertices), len(mesh.faces)
    if n_f == 0:
        raise RequestError(422, "empty_mesh", f"'coarse_mesh' ({fmt}) has {n_v} vertices and no faces", MESH_FIELD)
    if n_f > limits.max_mesh_faces:
        raise RequestError(
            413,
            "mesh_too_large",
            f"'coarse_mesh' has {n_f} faces; the limit is {limits.max_mesh_faces} (decimate it first)",
            MESH_FIELD,
        )
    if n_v > limits.max_mesh_vertices:
        raise RequestError(
            413,
            "mesh_too_large",
            f"'coarse_mesh' has {n_v} vertices; the limit is {limits.max_mesh_vertices} (decimate it first)",
            MESH_FIELD,
        )
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    # Count distinct faces when that is cheap: one triangle repeated is still one triangle.
    distinct = len(np.unique(np.sort(f, axis=1), axis=0)) if n_f <= 100_000 else n_f
    if distinct < limits.min_mesh_faces:
        raise RequestError(
            422,
            "mesh_too_small",
            f"'coarse_mesh' has {distinct} distinct face(s); at least {limits.min_mesh_faces} are needed "
            "to describe a volume",
            MESH_FIELD,
        )
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise RequestError(422, "invalid_mesh", f"'coarse_mesh' has {bad} vertices with NaN or infinite coordinates", MESH_FIELD)
    if f.min() < 0 or f.max() >= n_v:
        raise RequestError(422, "invalid_mesh", "'coarse_mesh' has faces that index missing vertices", MESH_FIELD)
    used = v[np.unique(f)]
    with np.errstate(over="ignore"):  # an overflowing span is reported just below
        extent = float(np.linalg.norm(used.max(axis=0) - used.min(axis=0)))
    if not math.isfinite(extent):
        raise RequestError(
            422, "invalid_mesh", "'coarse_mesh' spans an infinite range (coordinates overflow float64)", MESH_FIELD
        )
    if extent < limits.min_mesh_extent:
        raise RequestError(
            422,
            "degenerate_mesh",
            f"'coarse_mesh' spans {extent:.3g} units (bounding-box diagonal); it collapses to a point",
            MESH_FIELD,
        )
    if float(mesh.area) <= (extent**2) * 1e-12:
        raise RequestError(
            422, "degenerate_mesh", "'coarse_mesh' has zero surface area (every face is degenerate)", MESH_FIELD
        )
    return mesh


def _load_polygon_off(data: bytes, limits: LimitsConfig):
    """OFF with polygon faces (and optional per-vertex/per-face colours) -> Trimesh, fan-triangulated."""
    import numpy as np
    import trimesh

    def bad(why: str) -> RequestError:
        return RequestError(422, "corrupt_mesh", f"'coarse_mesh' (off) cannot be parsed: {why}", MESH_FIELD)

    rows = []
    for line in data.decode("latin-1").splitlines():
        toks = line.split("#", 1)[0].split()
        if toks:
            rows.append(toks)
    if not rows or not rows[0][0].endswith("OFF"):
        raise bad("no OFF header")
    head = rows[0][1:] or (rows[1] if len(rows) > 1 else [])
    body = rows[1:] if rows[0][1:] else rows[2:]
    try:
        n_v, n_f = int(head[0]), int(head[1])
    except (IndexError, ValueError):
        raise bad("the counts line must read '<vertices> <faces> <edges>'") from None
    if n_v > limits.max_mesh_vertices or n_f > limits.max_mesh_faces:
        raise RequestError(
            413, "mesh_too_large",
            f"'coarse_mesh' declares {n_v} vertices and {n_f} faces; the limits are "
            f"{limits.max_mesh_vertices} and {limits.max_mesh_faces}", MESH_FIELD,
        )
    if n_v < 0 or n_f < 0 or len(body) < n_v + n_f:
        raise bad(f"declares {n_v} vertices and {n_f} faces but has {len(body)} data lines")
    try:
        verts = np.array([[float(t) for t in r[:3]] for r in body[:n_v]], dtype=np.float64)
        tris = []
        for r in body[n_v:n_v + n_f]:
            k = int(r[0])
            idx = [int(t) for t in r[1:1 + k]]
            if k < 3 or len(idx) != k:
                raise ValueError(f"face line {' '.join(r[:8])!r}")
            tris.extend((idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1))  # fan
    except ValueError as e:
        raise bad(f"malformed vertex or face line ({e})") from None
    if verts.shape != (n_v, 3):
        raise bad("a vertex line has fewer than 3 coordinates")
    faces = np.array(tris, dtype=np.int64).reshape(-1, 3)
    if len(faces) > limits.max_mesh_faces:
        raise RequestError(
            413, "mesh_too_large",
            f"'coarse_mesh' has {len(faces)} triangles after splitting its polygons; the limit is "
            f"{limits.max_mesh_faces}", MESH_FIELD,
        )
    if len(faces) and (faces.min() < 0 or faces.max() >= n_v):
        raise RequestError(422, "invalid_mesh", "'coarse_mesh' has faces that index missing vertices", MESH_FIELD)
    return trimesh.Trimesh(verts, faces, process=False)


def _check_glb_header(data: bytes) -> None:
    # trimesh reads a GLB's declared lengths without checking them against the buffer; a truncated
    # upload then fails deep inside numpy. Checking the 12-byte header gives a clear answer instead.
    if len(data) < 20:
        raise RequestError(422, "corrupt_mesh", f"'coarse_mesh' is a GLB of only {len(data)} bytes", MESH_FIELD)
    _magic, version, length = struct.unpack_from("<4sII", data, 0)
    if version != 2:
        raise RequestError(422, "corrupt_mesh", f"'coarse_mesh' is glTF binary version {version}; only 2 is read", MESH_FIELD)
    if length != len(data):
        raise RequestError(
            422,
            "corrupt_mesh",
            f"'coarse_mesh' GLB header declares {length} bytes but {len(data)} arrived (truncated or padded upload)",
            MESH_FIELD,
        )
