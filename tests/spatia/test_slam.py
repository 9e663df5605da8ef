"""Point-to-plane ICP recovers known pose perturbations; memory update with refined poses."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import scenes, slam

H, W = 48, 64


@pytest.fixture(scope="module")
def corner_world():
    """Three views of a room corner (two walls + floor constrain all 6 degrees of freedom)."""
    scene = scenes.make_scene(2)
    intr = geo.intrinsics_from_fov(H, W, 75.0)
    hi = np.asarray(scene.room_hi)
    corner = np.array([hi[0], hi[1], 0.3])
    eyes = [np.array([0.3, -0.2, 1.5]), np.array([0.0, 0.0, 1.4]), np.array([-0.3, 0.1, 1.6])]
    w2c = jnp.stack([geo.look_at(e, corner) for e in eyes])
    fr = scenes.raycast_views(scene, w2c, intr, H, W)
    idx = jnp.array([0, 2])  # the memory never saw frame 1 itself
    mem, _ = mem_lib.build_memory(
        fr.rgb[idx], fr.depth[idx], w2c[idx], intr, fr.dynamic[idx], capacity=16384, voxel=0.01
    )
    return dict(scene=scene, intr=intr, w2c=w2c, frames=fr, memory=mem)


def _perturb(w2c, rng, deg, metres):
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    shift = rng.normal(size=3)
    shift *= metres / np.linalg.norm(shift)
    delta = geo.se3_exp(jnp.asarray(np.r_[axis * np.radians(deg), shift], jnp.float32))
    return geo.se3_inverse(delta @ geo.se3_inverse(w2c))


def test_icp_recovers_random_perturbations(corner_world):
    w = corner_world
    rng = np.random.default_rng(0)
    truth = w["w2c"][1]
    for deg, metres in [(3.0, 0.05), (4.0, 0.03), (2.0, 0.06)]:
        init = _perturb(truth, rng, deg, metres)
        ang0, dist0 = slam.pose_error(init, truth)
        assert float(ang0) > 1.9 and float(dist0) > 0.02
        res = slam.icp_refine(w["memory"], w["frames"].depth[1], init, w["intr"])
        ang, dist = slam.pose_error(res.w2c, truth)
        assert float(ang) < 0.1 and float(dist) < 1e-3, (deg, metres, float(ang), float(dist))
        assert int(res.n_pairs) > 500


def test_icp_batch_and_memory_update_with_refined_poses(corner_world):
    w = corner_world
    rng = np.random.default_rng(1)
    fr, truth = w["frames"], w["w2c"]
    noisy = jnp.stack([_perturb(truth[t], rng, 2.0, 0.03) for t in range(3)])
    res = slam.icp_refine_batch(w["memory"], fr.depth, noisy, w["intr"], fr.dynamic)
    single = slam.icp_refine(w["memory"], fr.depth[1], noisy[1], w["intr"], fr.dynamic[1])
    np.testing.assert_allclose(np.asarray(res.w2c[1]), np.asarray(single.w2c), atol=1e-5)
    ang, dist = slam.pose_error(res.w2c, truth)
    assert float(ang.max()) < 0.1 and float(dist.max()) < 1e-3
    # memory update: refined poses give (nearly) the memory built from the true poses,
    # while the noisy poses do not
    base = mem_lib.empty_memory(16384)
    ref, _ = mem_lib.update_memory(base, fr.rgb, fr.depth, truth, w["intr"], voxel=0.02)
    upd, stats, used = slam.update_from_frames(
        w["memory"], fr.rgb, fr.depth, noisy, w["intr"], voxel=0.02, refine=True, rebuild=True
    )
    bad, _, _ = slam.update_from_frames(
        w["memory"], fr.rgb, fr.depth, noisy, w["intr"], voxel=0.02, refine=False, rebuild=True
    )
    assert stats.n_overflow == 0
    np.testing.assert_allclose(np.asarray(used), np.asarray(res.w2c), atol=1e-6)

    def chamfer(a, b):
        pa = np.asarray(a.xyz)[np.asarray(a.valid)]
        pb = np.asarray(b.xyz)[np.asarray(b.valid)]
        return cKDTree(pb).query(pa)[0].mean()

    assert chamfer(upd, ref) < 0.2 * chamfer(bad, ref)


def test_icp_config_validation(corner_world):
    w = corner_world
    with pytest.raises(ValueError, match="one entry per level"):
        slam.icp_refine(
            w["memory"], w["frames"].depth[1], w["w2c"][1], w["intr"], cfg=slam.ICPConfig(levels=3)
        )
