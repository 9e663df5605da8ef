"""The z-buffer renderer against brute-force numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from spatia import geometry as geo
from spatia import render as rnd

from . import references

H, W = 32, 48
INTR = np.array([40.0, 42.0, 24.3, 15.6], np.float32)


@pytest.fixture(scope="module")
def cloud():
    """Random cloud with exact ties, points behind the camera, off-screen and invalid points."""
    rng = np.random.default_rng(0)
    n = 5000
    w2c = np.asarray(geo.se3_exp(jnp.array([0.05, -0.08, 0.03, 0.1, -0.05, 0.2])))
    # ~3 points per pixel, some off-screen (|u| margin) and some behind the camera (z < 0)
    u = rng.uniform(-4, W + 4, n)
    v = rng.uniform(-4, H + 4, n)
    z = rng.uniform(-0.5, 6.0, n)
    xc = np.c_[(u - INTR[2]) / INTR[0] * np.abs(z), (v - INTR[3]) / INTR[1] * np.abs(z), z]
    xyz = np.array(geo.transform_points(geo.se3_inverse(w2c), xc), np.float32)
    xyz[100:200] = xyz[:100]  # duplicated positions: depth ties broken by the smaller index
    rgb = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    valid = rng.uniform(size=n) > 0.1
    return xyz, rgb, valid, w2c


def _check_against(out, ref, n):
    np.testing.assert_array_equal(np.asarray(out.index), np.minimum(ref["index"], n))
    np.testing.assert_array_equal(np.asarray(out.hole), ref["hole"])
    np.testing.assert_array_equal(np.asarray(out.rgb), ref["rgb"])
    np.testing.assert_allclose(np.asarray(out.depth), ref["depth"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 700])
def test_point_mode_equals_brute_force_zbuffer(cloud, chunk):
    xyz, rgb, valid, w2c = cloud
    bg = np.array([0.25, 0.5, 0.75], np.float32)
    out = rnd.render(xyz, rgb, valid, w2c, INTR, height=H, width=W, chunk=chunk, bg=bg)
    ref = references.reference_zbuffer(xyz, rgb, valid, w2c, INTR, H, W, bg=bg)
    _check_against(out, ref, len(xyz))
    np.testing.assert_array_equal(np.asarray(out.visible), ref["visible"])
    # the test exercises what it claims: ties, empty pixels, culled points
    assert ref["hole"].any() and (~ref["hole"]).sum() > H * W // 2
    assert np.asarray(out.visible)[100:200].sum() > 0 and not np.asarray(out.visible)[~valid].any()
    # every output pixel is written: covered pixels show their point, empty ones the background
    img, idx = np.asarray(out.rgb), np.asarray(out.index)
    assert np.isfinite(img).all()
    np.testing.assert_array_equal(img[idx < len(xyz)], rgb[idx[idx < len(xyz)]])
    np.testing.assert_array_equal(
        img[idx == len(xyz)], np.broadcast_to(bg, img[idx == len(xyz)].shape)
    )


def test_ties_prefer_smaller_index_and_are_all_visible():
    xyz = np.array([[0.0, 0.0, 2.0]] * 3 + [[0.0, 0.0, 3.0]], np.float32)
    rgb = np.eye(4, 3, dtype=np.float32)
    out = rnd.render(xyz, rgb, None, np.eye(4), INTR, height=H, width=W)
    assert int(out.index[15, 24]) == 0
    np.testing.assert_array_equal(np.asarray(out.visible), [True, True, True, False])


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.5])
def test_minfilter_equals_footprint_equals_brute_force(cloud, radius):
    xyz, rgb, valid, w2c = cloud
    a = rnd.render(xyz, rgb, valid, w2c, INTR, height=H, width=W, mode="minfilter", radius=radius)
    b = rnd.render(
        xyz, rgb, valid, w2c, INTR, height=H, width=W, mode="footprint", radius=radius, chunk=1000
    )
    for field in ("rgb", "depth", "hole", "index"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    ref = references.reference_splat(xyz, rgb, valid, w2c, INTR, H, W, radius)
    _check_against(b, ref, len(xyz))
    # wider splats cover a superset of the 1-px pixels
    p = rnd.render(xyz, rgb, valid, w2c, INTR, height=H, width=W)
    assert (np.asarray(p.hole) | ~np.asarray(a.hole)).all() and np.asarray(
        a.hole
    ).sum() < np.asarray(p.hole).sum()


def _soft_reference(xyz, rgb, w2c, intr, h, w, radius, k):
    """PyTorch3D-style top-K alpha compositing, one pixel at a time."""
    u, v, z, ok = references.np_project(xyz, w2c, intr, h, w, 1e-4)
    ok_front = z > 1e-4
    img = np.zeros((h, w, rgb.shape[1]))
    acc = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            d2 = (u - (j + 0.5)) ** 2 + (v - (i + 0.5)) ** 2
            cand = np.nonzero(ok_front & (d2 < radius**2))[0]
            cand = cand[np.lexsort((cand, z[cand]))][:k]
            trans = 1.0
            for p in cand:
                a = 1 - d2[p] / radius**2
                img[i, j] += trans * a * rgb[p]
                acc[i, j] += trans * a
                trans *= 1 - a
    return img, 1 - acc


def test_soft_compositor_matches_reference():
    rng = np.random.default_rng(3)
    n = 400
    xyz = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(2, 5, n)].astype(np.float32)
    rgb = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    w2c = np.eye(4, dtype=np.float32)
    out = rnd.render(
        xyz, rgb, None, w2c, INTR, height=H, width=W, mode="soft", radius=2.5, k=3, chunk=128
    )
    img, hole = _soft_reference(xyz, rgb, w2c, INTR, H, W, 2.5, 3)
    np.testing.assert_allclose(np.asarray(out.rgb), img, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.hole), hole, atol=2e-5)
    assert (np.asarray(out.hole) < 1).sum() > 100 and (np.asarray(out.hole) == 1).sum() > 0


def test_soft_minfilter_equals_soft_when_no_point_is_hidden_at_its_pixel():
    rng = np.random.default_rng(4)
    pix = rng.choice(H * W, 500, replace=False)  # at most one point per pixel
    uv = np.c_[pix % W + rng.uniform(0.05, 0.95, 500), pix // W + rng.uniform(0.05, 0.95, 500)]
    xyz = geo.unproject(
        jnp.asarray(uv, jnp.float32),
        jnp.asarray(rng.uniform(2, 5, 500), jnp.float32),
        jnp.eye(4),
        INTR,
    )
    rgb = rng.uniform(0, 1, (500, 3)).astype(np.float32)
    a = rnd.render(xyz, rgb, None, np.eye(4), INTR, height=H, width=W, mode="soft", radius=2.5, k=3)
    b = rnd.render(
        xyz, rgb, None, np.eye(4), INTR, height=H, width=W, mode="soft_minfilter", radius=2.5, k=3
    )
    for field in ("rgb", "hole", "index", "depth"):
        np.testing.assert_allclose(
            np.asarray(getattr(b, field)), np.asarray(getattr(a, field)), atol=1e-6
        )
    assert (np.asarray(a.hole) < 0.5).mean() > 0.5


def test_render_views_equals_per_view_render(cloud):
    xyz, rgb, valid, w2c = cloud
    cams = np.stack(
        [
            w2c,
            np.eye(4, dtype=np.float32),
            np.asarray(geo.se3_exp(jnp.array([0, 0.2, 0, 0.3, 0, 0]))),
        ]
    )
    batch = rnd.render_views(
        xyz,
        rgb,
        valid,
        cams,
        INTR,
        height=H,
        width=W,
        mode="minfilter",
        radius=1.5,
        view_chunk=2,
        chunk=1024,
    )
    for t in range(3):
        one = rnd.render(
            xyz, rgb, valid, cams[t], INTR, height=H, width=W, mode="minfilter", radius=1.5
        )
        for field in one._fields:
            np.testing.assert_array_equal(
                np.asarray(getattr(batch, field)[t]), np.asarray(getattr(one, field))
            )


def test_disk_offsets_and_radius_conversion():
    assert (
        len(rnd.disk_offsets(1.0)) == 5
        and len(rnd.disk_offsets(1.5)) == 9
        and len(rnd.disk_offsets(2.0)) == 13
    )
    # Spatia's radius 0.01 NDC at 704 x 1248 is ~3.5 px
    assert abs(rnd.pytorch3d_radius_to_pixels(0.01, 704, 1248) - 3.52) < 1e-9


def test_bad_inputs_are_rejected(cloud):
    xyz, rgb, valid, w2c = cloud
    with pytest.raises(ValueError, match="xyz must be"):
        rnd.render(xyz[:, :2], rgb, valid, w2c, INTR, height=H, width=W)
    with pytest.raises(ValueError, match="rgb must be"):
        rnd.render(xyz, rgb[:10], valid, w2c, INTR, height=H, width=W)
    with pytest.raises(ValueError, match="mode must be"):
        rnd.render(xyz, rgb, valid, w2c, INTR, height=H, width=W, mode="splat")
    with pytest.raises(ValueError, match="needs radius"):
        rnd.render(xyz, rgb, valid, w2c, INTR, height=H, width=W, mode="minfilter")
