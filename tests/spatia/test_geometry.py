"""Cameras, SE(3), projection and the camera-file format."""

import jax.numpy as jnp
import numpy as np
import pytest

from spatia import geometry as geo


def _random_poses(rng, n, max_angle=np.pi * 0.95, max_t=3.0):
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    ang = rng.uniform(0, max_angle, n)
    if n >= 3:
        ang[:3] = [0.0, 1e-5, np.pi * 0.999]  # identity, tiny and near-pi rotations
    xi = np.concatenate([axes * ang[:, None], rng.uniform(-max_t, max_t, (n, 3))], 1)
    return jnp.asarray(xi, jnp.float32)


def test_se3_exp_log_roundtrip(rng):
    xi = _random_poses(rng, 64)
    t = geo.se3_exp(xi)
    r = np.asarray(t[:, :3, :3], np.float64)
    np.testing.assert_allclose(
        r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=2e-6
    )
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(t[:, 3]), np.tile([0, 0, 0, 1.0], (64, 1)))
    back = geo.se3_log(t)
    # compare as matrices (log is unique for angles < pi)
    np.testing.assert_allclose(np.asarray(geo.se3_exp(back)), np.asarray(t), atol=5e-5)
    np.testing.assert_allclose(np.asarray(back[3:]), np.asarray(xi[3:]), atol=2e-4)


def test_se3_exp_matches_first_order_perturbation():
    # exp([w, v]) p ~ p + w x p + v for small xi (the ICP Jacobian's convention)
    xi = jnp.array([1e-3, -2e-3, 0.5e-3, 1e-3, 2e-3, -1e-3])
    p = jnp.array([0.3, -1.2, 2.0])
    moved = geo.transform_points(geo.se3_exp(xi), p)
    approx = p + jnp.cross(xi[:3], p) + xi[3:]
    np.testing.assert_allclose(np.asarray(moved), np.asarray(approx), atol=1e-5)


def test_inverse_and_rotation_angle(rng):
    t = geo.se3_exp(_random_poses(rng, 16))
    eye = np.asarray(geo.se3_inverse(t) @ t)
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(4), eye.shape), atol=2e-5)
    ang = geo.rotation_angle_deg(geo.se3_exp(jnp.array([0.0, 0.0, np.radians(30.0), 0, 0, 0])))
    np.testing.assert_allclose(float(ang), 30.0, atol=1e-4)


def test_project_unproject_identity(rng):
    w2c = geo.se3_exp(_random_poses(rng, 1)[0] * 0.3)
    intr = jnp.array([50.0, 55.0, 24.3, 15.8])
    # world points in front of the camera
    xc = np.c_[rng.uniform(-2, 2, (500, 2)), rng.uniform(0.5, 8, 500)].astype(np.float32)
    pw = geo.transform_points(geo.se3_inverse(w2c), xc)
    uv, z = geo.project(pw, w2c, intr)
    np.testing.assert_allclose(np.asarray(z), xc[:, 2], rtol=1e-5)
    back = geo.unproject(uv, z, w2c, intr)
    np.testing.assert_allclose(np.asarray(back), np.asarray(pw), atol=2e-5 * 8)
    # and pixel -> point -> pixel
    uv0 = jnp.asarray(rng.uniform(0, 48, (300, 2)), jnp.float32)
    z0 = jnp.asarray(rng.uniform(0.3, 9, 300), jnp.float32)
    uv1, z1 = geo.project(geo.unproject(uv0, z0, w2c, intr), w2c, intr)
    np.testing.assert_allclose(np.asarray(uv1), np.asarray(uv0), atol=2e-4)
    np.testing.assert_allclose(np.asarray(z1), np.asarray(z0), rtol=1e-5)


def test_depth_to_points_pixel_centres_reproject_to_their_pixel():
    h, w = 6, 9
    intr = geo.intrinsics_from_fov(h, w, 60.0)
    w2c = geo.look_at([0.2, -0.1, 1.5], [3.0, 0.5, 1.0])
    depth = jnp.linspace(1.0, 4.0, h * w).reshape(h, w)
    pts = geo.depth_to_points(depth, w2c, intr)
    uv, z = geo.project(pts.reshape(-1, 3), w2c, intr)
    np.testing.assert_allclose(np.asarray(z), np.asarray(depth).ravel(), rtol=1e-5)
    np.testing.assert_array_equal(np.floor(np.asarray(uv[:, 0])), np.tile(np.arange(w), h))
    np.testing.assert_array_equal(np.floor(np.asarray(uv[:, 1])), np.repeat(np.arange(h), w))


def test_look_at_and_centres():
    eye, target = np.array([1.0, 2.0, 1.5]), np.array([4.0, 2.0, 1.5])
    w2c = geo.look_at(eye, target)
    np.testing.assert_allclose(np.asarray(geo.camera_centers(w2c)), eye, atol=1e-6)
    # the target is straight ahead on the optical axis; world up (+z) is image up (-y)
    xc = np.asarray(geo.transform_points(w2c, target))
    np.testing.assert_allclose(xc, [0, 0, 3.0], atol=1e-6)
    up = np.asarray(geo.transform_points(w2c, eye + [0, 0, 1.0]))
    assert up[1] < 0


def test_normalized_intrinsics_roundtrip():
    intr = np.array([500.0, 510.0, 320.0, 240.0])
    n = geo.normalize_intrinsics(intr, 480, 640)
    np.testing.assert_allclose(n, [500 / 640, 510 / 480, 0.5, 0.5])
    np.testing.assert_allclose(geo.denormalize_intrinsics(n, 480, 640), intr)


def test_camera_files_roundtrip_and_official_format(tmp_path, rng):
    w2c = np.asarray(geo.se3_exp(_random_poses(rng, 5, max_t=1.0)), np.float64)
    for rows in (4, 3):
        p = tmp_path / f"w2c_{rows}.txt"
        geo.write_w2c_file(p, w2c, rows=rows)
        np.testing.assert_allclose(geo.read_w2c_file(p), w2c, atol=1e-6)
    # the official files: one Python nested list per line; also plain 12-number lines
    p = tmp_path / "official.txt"
    p.write_text(
        "[[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, -0.25], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0]]\n"
        "# comment line\n\n"
        "1 0 0 0.5  0 1 0 -0.25  0 0 1 2.0\n"
    )
    m = geo.read_w2c_file(p)
    assert m.shape == (2, 4, 4)
    np.testing.assert_allclose(m[0], m[1])
    pi = tmp_path / "intrinsics.txt"
    pi.write_text("[0.8246414596970016 1.4608655657087053 0.49907563551972733 0.5008032662527901]")
    np.testing.assert_allclose(geo.read_intrinsics_file(pi)[0], 0.8246414596970016)
    geo.write_intrinsics_file(pi, [0.7, 1.2, 0.5, 0.5])
    np.testing.assert_allclose(geo.read_intrinsics_file(pi), [0.7, 1.2, 0.5, 0.5])


@pytest.mark.parametrize(
    "content, message",
    [
        ("1 0 0 0 0 1 0 0 0 0 1\n", "got 11 numbers"),
        ("1 0 0 0 0 1 0 0 0 0 1 x\n", "cannot parse 'x'"),
        ("1 0 0 0 0 1 0 0 0 0 1 0 0 0 1 1\n", "bottom row"),
        ("2 0 0 0 0 1 0 0 0 0 1 0\n", "not a proper rotation"),
        ("-1 0 0 0 0 1 0 0 0 0 1 0\n", "not a proper rotation"),
        ("1 0 0 nan 0 1 0 0 0 0 1 0\n", "NaN or Inf"),
        ("# only a comment\n", "contains no matrices"),
        ("[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 'a']]\n", "non-numeric"),
    ],
)
def test_malformed_w2c_files_give_clear_errors(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    first_ok = "no matrices" not in message
    p.write_text(("1 0 0 0 0 1 0 0 0 0 1 0\n" if first_ok else "") + content)
    with pytest.raises(geo.CameraFileError, match=message) as err:
        geo.read_w2c_file(p)
    if first_ok:
        assert f"{p}:2" in str(err.value)  # names the file and the line


def test_malformed_intrinsics_and_missing_files(tmp_path):
    p = tmp_path / "k.txt"
    p.write_text("[0.8 1.4 0.5]")
    with pytest.raises(geo.CameraFileError, match="expected 4 normalised intrinsics"):
        geo.read_intrinsics_file(p)
    p.write_text("[0.8 -1.4 0.5 0.5]")
    with pytest.raises(geo.CameraFileError, match="fx, fy > 0"):
        geo.read_intrinsics_file(p)
    with pytest.raises(geo.CameraFileError, match="does not exist"):
        geo.read_w2c_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="must be"):
        geo.write_w2c_file(tmp_path / "x.txt", np.zeros((2, 2, 2)))
