"""ml.refine end to end on CPU with a tiny random checkpoint: GLB out, watertight, input frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image, ImageDraw

from ml.config import load_config
from ml.models import write_random_checkpoint
from ml.refine import InferConfig, RefinePipeline, load_image, main, preprocess_image

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "infer_dit_refine-tiny.yaml"
FAST = {"refine.octree_resolution": 32, "refine.num_uniform_points": 5000, "refine.num_sharp_points": 5000}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = load_config(TINY, InferConfig)
    return write_random_checkpoint(cfg.model, tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def pipe(ckpt) -> RefinePipeline:
    p = RefinePipeline.from_checkpoint(ckpt, TINY, device="cpu", overrides=FAST)
    # random weights give a random occupancy field; nudge the occupancy bias so it has an inside
    with torch.no_grad():
        p.models.vae.geo_decoder.output_proj.bias.fill_(0.5)
    return p


@pytest.fixture(scope="module")
def view(tmp_path_factory) -> Path:
    im = Image.new("RGBA", (180, 140), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((30, 20, 150, 120), fill=(210, 120, 50, 255))
    p = tmp_path_factory.mktemp("img") / "view.png"
    im.save(p)
    return p


def _far_mesh() -> trimesh.Trimesh:
    """A box far from the origin, at a scale no normalised mesh has."""
    m = trimesh.creation.box(extents=(30.0, 12.0, 20.0))
    m.apply_translation((500.0, -40.0, 7.0))
    return m


@pytest.mark.integration
def test_refine_corpus_mesh_to_watertight_glb(corpus_dir, ckpt, view, tmp_path):
    src = corpus_dir / "glb" / "Hunyuan3D-2.1__assets_1.glb"
    out = tmp_path / "refined.glb"
    rc = main(["--ckpt", str(ckpt), "--config", str(TINY), "--image", str(view), "--mesh", str(src),
               "--out", str(out), "--device", "cpu", "--set", "refine.octree_resolution=32",
               "refine.steps=3"])
    assert rc == 0 and out.is_file()
    m = trimesh.load(out, force="mesh")
    assert len(m.faces) > 0 and m.is_watertight
    # the output sits inside the decoding box mapped back to the input frame
    inp = trimesh.load(src, force="mesh")
    centre = inp.bounds.mean(0)
    half = (inp.bounds[1] - inp.bounds[0]).max() / 2 / 0.99  # bounds 1.0 / normalize_scale 0.99
    assert np.all(m.bounds[0] >= centre - half - 1e-6) and np.all(m.bounds[1] <= centre + half + 1e-6)


@pytest.mark.integration
def test_output_is_in_the_input_frame(pipe, view):
    """Refining a moved and scaled copy gives the moved and scaled result (same seed)."""
    img = load_image(view)
    base = trimesh.creation.box(extents=(3.0, 1.2, 2.0))
    a = pipe(img, base, seed=7)
    moved = base.copy()
    moved.apply_scale(10.0)
    moved.apply_translation((500.0, -40.0, 7.0))
    b = pipe(img, moved, seed=7)
    assert a.is_watertight and b.is_watertight
    expect = a.vertices * 10.0 + np.array([500.0, -40.0, 7.0])
    assert len(a.vertices) == len(b.vertices)
    assert np.abs(np.sort(expect, axis=0) - np.sort(b.vertices, axis=0)).max() < 1e-3 * 30
    # and the result overlaps the input's box, far from the origin
    assert np.linalg.norm(b.bounds.mean(0) - moved.bounds.mean(0)) < 30


@pytest.mark.integration
def test_fewer_voxels_than_tokens_end_to_end(ckpt, view):
    """num_latents far above what a small mesh occupies: fewer tokens, no crash (official crashes)."""
    p = RefinePipeline.from_checkpoint(ckpt, TINY, device="cpu", overrides={**FAST, "model.vae.num_latents": 50_000})
    with torch.no_grad():
        p.models.vae.geo_decoder.output_proj.bias.fill_(0.5)
    out = p(load_image(view), _far_mesh(), steps=2)
    assert p.timings["tokens"] < 50_000 and out.is_watertight


def test_bad_inputs_are_clear_value_errors(pipe, view, tmp_path):
    img = load_image(view)
    with pytest.raises(ValueError, match="nope.glb: mesh file not found"):
        pipe(img, tmp_path / "nope.glb")
    (tmp_path / "junk.glb").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.glb"):
        pipe(img, tmp_path / "junk.glb")
    with pytest.raises(ValueError, match="holds no triangles"):
        pipe(img, trimesh.Trimesh(vertices=np.random.rand(10, 3), faces=np.zeros((0, 3), dtype=int)))
    with pytest.raises(ValueError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not png")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        load_image(tmp_path / "bad.png")
    rgb = Image.new("RGB", (64, 64), (255, 0, 0))
    try:
        import rembg  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="no alpha channel.*RGBA PNG"):
            preprocess_image(rgb, 64, name="photo.jpg")
    stripe = np.zeros((600, 600, 4), dtype=np.uint8)
    stripe[300:302, 20:580] = 255  # 2 px high: 0 px once fitted into the square (was a ZeroDivisionError)
    with pytest.raises(ValueError, match="stripe.png: the object is too thin after cropping"):
        preprocess_image(Image.fromarray(stripe, "RGBA"), 64, name="stripe.png")
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    with pytest.raises(ValueError, match="empty.png: the alpha channel is empty"):
        preprocess_image(clear, 64, name="empty.png")


def test_cli_reports_errors_with_exit_code_2(ckpt, view, tmp_path, capsys):
    rc = main(["--ckpt", str(ckpt), "--config", str(TINY), "--image", str(view), "--mesh",
               str(tmp_path / "missing.obj"), "--out", str(tmp_path / "o.glb"), "--device", "cpu"])
    assert rc == 2 and "missing.obj: mesh file not found" in capsys.readouterr().err
    rc = main(["--ckpt", str(tmp_path / "none.pt"), "--config", str(TINY), "--image", str(view), "--mesh",
               str(tmp_path / "missing.obj"), "--out", str(tmp_path / "o.glb"), "--device", "cpu"])
    assert rc == 2 and "none.pt: checkpoint not found" in capsys.readouterr().err
    rc = main(["--ckpt", str(ckpt), "--config", str(ROOT / "configs" / "infer_dit_refine.yaml"), "--image",
               str(view), "--mesh", str(tmp_path / "m.obj"), "--out", str(tmp_path / "o.glb"), "--device", "cpu",
               "--set", "refine.stepz=3"])
    assert rc == 2 and "unknown key 'refine.stepz'" in capsys.readouterr().err


def test_preprocess_image_official_geometry():
    im = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((100, 50, 199, 149), fill=(0, 0, 255, 255))
    img, mask = preprocess_image(im, 128, 0.15)
    assert img.shape == (1, 3, 128, 128) and mask.shape == (1, 1, 128, 128)
    assert img.min() >= -1 and img.max() <= 1 and set(mask.unique().tolist()) <= {-1.0, 1.0}
    fg = (mask[0, 0] > 0).nonzero()
    extent = (fg.max(0).values - fg.min(0).values + 1).max().item()
    assert abs(extent - 0.85 * 128) <= 2  # object fills (1 - border_ratio) of the side
    assert abs(fg.float().mean(0) - 63.5).max() <= 2  # centred
    assert torch.allclose(img[0, :, 0, 0], torch.ones(3))  # white background


def test_area_resize_is_banded_and_chunk_independent():
    import tracemalloc

    from ml.refine import _resize_area

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (97, 61, 4), dtype=np.uint8)
    for w, h in [(40, 30), (150, 200), (61, 97), (5, 90)]:  # shrink, enlarge, same, mixed
        a = _resize_area(small, w, h, rows_per_chunk=7)
        assert a.shape == (h, w, 4)
        assert np.array_equal(a, _resize_area(small, w, h))  # chunking changes nothing
    flat = np.full((50, 70, 4), 77, dtype=np.uint8)
    assert (_resize_area(flat, 33, 21) == 77).all()  # an average of equal pixels is that pixel
    # A 3000-px crop fitted into the square (the serve config allows 8192 px): dense (dst, src)
    # weight matrices times a float64 copy of the image peaked above 500 MB here (8 GB at 8192).
    big = rng.integers(0, 256, (3000, 3000, 4), dtype=np.uint8)
    tracemalloc.start()
    out = _resize_area(big, 2550, 2550)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (2550, 2550, 4)
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"


def test_stl_triangle_soup_gets_sharp_edge_samples(tmp_path):
    # STL stores every triangle with its own three vertices; loaded as sent (process=False) no vertex
    # is shared, so without welding for sampling no edge was sharp and a cube got no sharp samples.
    from ml.refine import load_mesh, sample_surface

    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    (tmp_path / "cube.stl").write_bytes(cube.export(file_type="stl"))
    mesh = load_mesh(tmp_path / "cube.stl")
    assert len(mesh.vertices) == 3 * len(mesh.faces)  # really unwelded
    uniform, sharp = sample_surface(mesh, 2000, 500, np.random.default_rng(0))
    assert uniform.shape == (2000, 6) and sharp.shape == (500, 6)
    assert np.allclose(np.abs(sharp[:, :3]).max(axis=1), 0.5, atol=1e-5)  # on the cube's surface
    assert len(mesh.vertices) == 3 * len(mesh.faces)  # the caller's mesh is untouched


@pytest.mark.integration
def test_step_caching_off_by_default_and_same_for_batched_and_split_cfg(pipe, view):
    """refine.cache_interval: 1 in the shipped configs; 2 changes the latents, and keeping cond + uncond
    together (batched CFG) or each branch alone (split, with the zero-context skip) gives the same result."""
    img, mesh = load_image(view), trimesh.creation.box(extents=(3.0, 1.2, 2.0))
    s = pipe.config.refine
    assert s.cache_interval == 1 and load_config(ROOT / "configs" / "infer_dit_refine.yaml",
                                                 InferConfig).refine.cache_interval == 1
    pipe(img, mesh, seed=3, steps=6)
    plain = pipe.last["latents"].clone()
    try:
        s.cache_interval = 2  # 5 DiT calls: full at steps 0, 2, 4; cached at 1, 3
        pipe(img, mesh, seed=3, steps=6)
        cached = pipe.last["latents"].clone()
        s.batched_cfg = False
        pipe(img, mesh, seed=3, steps=6)
        split = pipe.last["latents"].clone()
    finally:
        s.cache_interval, s.batched_cfg = 1, True
    assert not torch.equal(cached, plain)
    torch.testing.assert_close(cached, split, rtol=0, atol=1e-4)
