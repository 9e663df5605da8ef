"""Tests of spatia.metrics: PSNR / SSIM against naive references, closed-loop and revisit metrics,
geometric match accuracy and the ICP camera-control error."""

import jax.numpy as jnp
import numpy as np
import pytest

from spatia import geometry as geo
from spatia import metrics, scenes
from tests.spatia.conftest import H, W
from tests.spatia.references import reference_match_accuracy, reference_psnr, reference_ssim


@pytest.fixture(scope="module")
def image_pairs():
    """Three 16 x 20 RGB pairs: noisy copy, unrelated image, contrast change (float32 in [0, 1])."""
    r = np.random.default_rng(0)
    a = r.random((3, 16, 20, 3)).astype(np.float32)
    b = np.stack(
        [
            np.clip(a[0] + 0.1 * r.standard_normal(a[0].shape), 0, 1),
            r.random(a[1].shape),
            0.5 * a[2] + 0.2,
        ]
    ).astype(np.float32)
    return a, b


def test_psnr_matches_reference_and_closed_form(image_pairs):
    a, b = image_pairs
    got = np.asarray(metrics.psnr(a, b))
    np.testing.assert_allclose(
        got, [reference_psnr(x, y) for x, y in zip(a, b, strict=True)], rtol=1e-5
    )
    # |error| = delta at every pixel: MSE = delta^2 exactly, PSNR = -20 log10(delta / range)
    delta = 0.125
    sign = np.where(np.random.default_rng(1).random(a[0].shape) < 0.5, -1.0, 1.0)
    noisy = (0.5 + delta * sign).astype(np.float32)
    np.testing.assert_allclose(
        float(metrics.psnr(np.full_like(noisy, 0.5), noisy)), -20 * np.log10(delta), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(metrics.psnr(np.full_like(noisy, 127.5), 255 * noisy, data_range=255.0)),
        -20 * np.log10(delta),
        rtol=1e-5,
    )
    assert np.isinf(float(metrics.psnr(a[0], a[0])))


def test_ssim_matches_naive_reference(image_pairs):
    a, b = image_pairs
    got = np.asarray(metrics.ssim(a, b))
    want = [reference_ssim(x, y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    pop = float(metrics.ssim(a[1], b[1], sample_covariance=False))
    np.testing.assert_allclose(pop, reference_ssim(a[1], b[1], sample_covariance=False), atol=1e-6)
    assert abs(pop - got[1]) > 1e-5  # the covariance convention matters, so the test can tell
    np.testing.assert_allclose(float(metrics.ssim(a[1], a[1])), 1.0, atol=1e-6)
    assert got[0] > got[1]  # a noisy copy is more similar than an unrelated image
    np.testing.assert_allclose(float(metrics.ssim(b[0], a[0])), got[0], atol=1e-6)  # symmetric


def test_ssim_matches_scikit_image_if_installed(image_pairs):
    skm = pytest.importorskip("skimage.metrics")
    a, b = image_pairs
    for x, y, s in zip(a, b, np.asarray(metrics.ssim(a, b)), strict=True):
        want = skm.structural_similarity(
            x.astype(np.float64),
            y.astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            data_range=1.0,
            channel_axis=-1,
        )
        np.testing.assert_allclose(s, want, atol=2e-5)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        metrics.ssim(np.zeros((8, 16, 3)), np.zeros((8, 16, 3)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((8, 16, 3)), np.zeros((8, 15, 3)))


def test_closed_loop_and_revisit_metrics(image_pairs):
    a, b = image_pairs
    video = np.concatenate([a[:1], b[:1], a[:1]])  # returns to the first frame exactly
    out = metrics.closed_loop_metrics(video)
    assert np.isinf(out["psnr_c"]) and abs(out["ssim_c"] - 1.0) < 1e-6
    out = metrics.closed_loop_metrics(np.concatenate([a[:1], b[:1]]))
    np.testing.assert_allclose(out["psnr_c"], reference_psnr(a[0], b[0]), rtol=1e-5)

    from spatia import trajectories

    w2c = trajectories.loop_trajectory(0, 3)  # 7 poses, w2c[3 + k] == w2c[3 - k]
    clip = np.array([-1, 0, 0, 0, 1, 1, 1])
    rev = metrics.revisited_frames(w2c, clip)
    np.testing.assert_array_equal(rev, [False, False, False, False, True, True, True])
    # one clip: nothing is revisited by an earlier clip
    assert not metrics.revisited_frames(w2c, np.zeros(7, int)).any()
    gt = np.repeat(a[:1], 7, axis=0)
    gen = gt.copy()
    gen[4] = b[0]
    res = metrics.revisit_metrics(gen, gt, rev)
    assert res["n_revisit"] == 3 and np.isinf(res["psnr"][5]) and np.isfinite(res["psnr"][4])
    np.testing.assert_allclose(res["psnr"][4], reference_psnr(b[0], a[0]), rtol=1e-5)
    assert np.isinf(res["psnr_revisit"])  # the mean includes exact frames


def test_match_accuracy_equals_reference(small_scene):
    fr, w2c, intr = small_scene["frames"], small_scene["w2c"], small_scene["intr"]
    static = ~np.asarray(fr.dynamic)
    rgb, depth = np.asarray(fr.rgb), np.asarray(fr.depth)
    # the same frame against itself: every pixel co-visible and matched
    acc, n_cov, _ = metrics.match_accuracy(rgb[0], rgb[0], depth[0], depth[0], w2c[0], w2c[0], intr)
    assert acc == 1.0 and n_cov == H * W
    # two poses: equal to the pixel-loop reference; corrupting frame j lowers the score
    noisy = np.clip(rgb[1] + np.random.default_rng(2).normal(0, 0.15, rgb[1].shape), 0, 1).astype(
        np.float32
    )
    for img_j in (rgb[1], noisy):
        acc, n_cov, matched = metrics.match_accuracy(
            rgb[0], img_j, depth[0], depth[1], w2c[0], w2c[1], intr, valid_i=static[0]
        )
        ref_acc, ref_cov = reference_match_accuracy(
            rgb[0], img_j, depth[0], depth[1], w2c[0], w2c[1], intr, valid_i=static[0]
        )
        assert n_cov == ref_cov and n_cov > H * W // 4
        np.testing.assert_allclose(
            acc, ref_acc, atol=1.5 / n_cov
        )  # at most one boundary pixel differs
        assert matched.shape == (H, W)
    clean, _, _ = metrics.match_accuracy(rgb[0], rgb[1], depth[0], depth[1], w2c[0], w2c[1], intr)
    worse, _, _ = metrics.match_accuracy(rgb[0], noisy, depth[0], depth[1], w2c[0], w2c[1], intr)
    assert clean > 0.8 and worse < clean - 0.2


def test_camera_score_mapping():
    assert metrics.camera_score([0.0], [0.0]) == 100.0
    assert metrics.camera_score([15.0, 30.0], [0.5, 2.0]) == 0.0
    np.testing.assert_allclose(metrics.camera_score([7.5], [0.0]), 75.0)
    np.testing.assert_allclose(metrics.camera_score([3.0], [0.25]), 0.5 * (80.0 + 50.0))


def test_camera_error_zero_at_command_and_positive_under_perturbation(small_scene):
    scene, fr, w2c, intr = (
        small_scene["scene"],
        small_scene["frames"],
        small_scene["w2c"],
        small_scene["intr"],
    )
    model = metrics.scene_model(fr.rgb, fr.depth, w2c, intr, fr.dynamic, capacity=6 * H * W)
    idx = np.array([0, 2])
    cmd = w2c[idx]
    # frames rendered exactly at the commanded cameras
    exact = metrics.camera_control_error(model, fr.depth[idx], cmd, intr, dynamic=fr.dynamic[idx])
    assert np.all(exact.rotation_deg < 0.05) and np.all(exact.translation < 5e-3)
    assert exact.score > 99.0 and np.all(exact.n_pairs >= 12)
    # frames rendered from cameras moved by 2 degrees and 3 cm: ICP recovers the offset
    xi = jnp.array([0.0, np.radians(2.0), 0.0, 0.03, 0.0, 0.0])
    moved = jnp.stack([geo.se3_exp(xi) @ c for c in cmd])
    fr_m = scenes.raycast_views(scene, moved, intr, H, W, times=jnp.asarray(idx, jnp.float32))
    err = metrics.camera_control_error(model, fr_m.depth, cmd, intr, dynamic=fr_m.dynamic)
    np.testing.assert_allclose(err.rotation_deg, 2.0, atol=0.5)
    true_shift = np.linalg.norm(
        np.asarray(geo.camera_centers(moved) - geo.camera_centers(cmd)), axis=-1
    )
    np.testing.assert_allclose(err.translation, true_shift, atol=0.01)
    assert err.score < exact.score - 5
    with pytest.raises(ValueError, match="commanded_w2c"):
        metrics.camera_control_error(model, fr.depth[idx], w2c[:3], intr)
