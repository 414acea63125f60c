"""Headless CPU renders: RGBA on transparent, camera parameters that reproduce the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from ml.processing.load import load_mesh
from ml.processing.render import render_views
from ml.processing.sample import face_normals_areas, normalize

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cow(examples_dir):
    m = load_mesh(examples_dir / "meshes" / "cow.obj")
    u, _, _ = normalize(m.vertices)
    fn, _ = face_normals_areas(u, m.faces)
    return u, m.faces, fn


def test_views_are_rgba_on_transparent(cow):
    u, f, fn = cow
    views, cams = render_views(u, f, fn, num_views=6, size=96, elevations_deg=[20.0, -10.0])
    assert len(views) == len(cams) == 6
    for img in views:
        assert img.shape == (96, 96, 4) and img.dtype == np.uint8
        a = img[..., 3]
        assert set(np.unique(a)) <= {0, 255} and 0.05 < (a > 0).mean() < 0.9
        assert a[0, 0] == a[0, -1] == a[-1, 0] == a[-1, -1] == 0
        assert (img[a == 0, :3] == 0).all() and img[a > 0, :3].max() > 100
    assert not np.array_equal(views[0][..., 3], views[1][..., 3])  # different viewpoints


def test_cameras_reproduce_the_silhouette(cow):
    """Projecting the vertices with the saved K and c2w (OpenCV: pixel i's centre at i) lands on the
    rendered alpha: a pixel is covered when its centre is inside, so the outermost covered pixel is
    less than one pixel inside the projected extreme, never outside it."""
    u, f, fn = cow
    views, cams = render_views(u, f, fn, num_views=4, size=128, elevations_deg=[30.0])
    for img, cam in zip(views, cams):
        K, c2w = np.array(cam["K"]), np.array(cam["c2w"])
        assert K[0, 2] == K[1, 2] == 63.5  # the centre of a 128-px image in OpenCV pixel coordinates
        assert np.allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-9)
        pc = (u - c2w[:3, 3]) @ c2w[:3, :3]
        assert (pc[:, 2] > 0).all()  # everything in front of the camera
        x = K[0, 0] * pc[:, 0] / pc[:, 2] + K[0, 2]
        y = K[1, 1] * pc[:, 1] / pc[:, 2] + K[1, 2]
        ys, xs = np.nonzero(img[..., 3])
        eps = 1e-6
        assert -eps <= xs.min() - x.min() < 1 + eps and -eps <= x.max() - xs.max() < 1 + eps
        assert -eps <= ys.min() - y.min() < 1 + eps and -eps <= y.max() - ys.max() < 1 + eps
        assert x.min() >= -0.5 and x.max() <= 127.5 and y.min() >= -0.5 and y.max() <= 127.5  # fully in frame


def test_up_is_up(cow):
    """Y is up in the normalised frame (the cow's legs are at low y): the legs render at the bottom."""
    u, f, fn = cow
    views, cams = render_views(u, f, fn, num_views=1, size=128, elevations_deg=[0.0])
    a = views[0][..., 3] > 0
    rows = np.nonzero(a.any(1))[0]
    legs = u[:, 1] < np.percentile(u[:, 1], 5)
    c2w = np.array(cams[0]["c2w"])
    pc = (u[legs] - c2w[:3, 3]) @ c2w[:3, :3]
    ylegs = 1.0 * cams[0]["K"][1][1] * pc[:, 1] / pc[:, 2] + cams[0]["K"][1][2]
    assert ylegs.mean() > (rows.min() + rows.max()) / 2
