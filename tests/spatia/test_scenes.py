"""Synthetic worlds: determinism, exact geometry of the ray caster, dynamic masks, trajectories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatia import geometry as geo
from spatia import scenes, trajectories

from .conftest import H, W


def test_scene_is_deterministic_and_in_spec():
    a, b, c = scenes.make_scene(11), scenes.make_scene(11), scenes.make_scene(12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.prop_center), np.asarray(c.prop_center))
    for seed in range(6):
        s = scenes.make_scene(seed)
        size = np.asarray(s.room_hi - s.room_lo)
        assert 4 <= size[0] <= 8 and 4 <= size[1] <= 8 and 2.5 <= size[2] <= 3.0
        assert 4 <= int(s.prop_valid.sum()) <= 10
        assert float(jnp.min(jnp.minimum(s.tex_colour1, s.tex_colour2))) >= 0.1


def _points(frame, w2c, intr):
    return np.asarray(geo.depth_to_points(frame.depth, w2c, intr)), np.asarray(frame.obj_id)


def test_raycaster_hits_lie_on_their_primitives(small_scene):
    scene, intr, w2c, fr = (
        small_scene["scene"],
        small_scene["intr"],
        small_scene["w2c"],
        small_scene["frames"],
    )
    lo, hi = np.asarray(scene.room_lo), np.asarray(scene.room_hi)
    checked = set()
    for t in range(w2c.shape[0]):
        frame = jax.tree.map(lambda x, t=t: x[t], fr)
        pts, oid = _points(frame, w2c[t], intr)
        assert (np.asarray(frame.depth) > 0).all()  # inside a closed room every ray hits
        # room surfaces: floor z = 0, ceiling z = h, walls at the x / y bounds
        for k, (ax, val) in {
            1: (2, lo[2]),
            2: (2, hi[2]),
            3: (0, lo[0]),
            4: (0, hi[0]),
            5: (1, lo[1]),
            6: (1, hi[1]),
        }.items():
            sel = oid == k
            if sel.any():
                np.testing.assert_allclose(pts[sel][:, ax], val, atol=2e-4)
                checked.add(k)
        for slot in range(scenes.MAX_PROPS):
            sel = oid == scenes.PROP_ID0 + slot
            if not sel.any():
                continue
            typ = int(scene.prop_type[slot])
            c, sz, yaw = (
                np.asarray(scene.prop_center[slot]),
                np.asarray(scene.prop_size[slot]),
                float(scene.prop_yaw[slot]),
            )
            p = pts[sel] - c
            if typ == 0:  # on the box surface: max |local / half| == 1
                cy, sy = np.cos(-yaw), np.sin(-yaw)
                loc = np.c_[cy * p[:, 0] - sy * p[:, 1], sy * p[:, 0] + cy * p[:, 1], p[:, 2]]
                np.testing.assert_allclose(np.abs(loc / sz).max(1), 1.0, atol=2e-3)
            elif typ == 1:
                np.testing.assert_allclose(np.linalg.norm(p, axis=1), sz[0], atol=2e-4)
            else:  # side (r = radius) or caps (z = 0 or height)
                r = np.linalg.norm(p[:, :2], axis=1)
                on = (
                    (np.abs(r - sz[0]) < 3e-4)
                    | (np.abs(p[:, 2]) < 3e-4)
                    | (np.abs(p[:, 2] - sz[2]) < 3e-4)
                )
                assert on.all()
            checked.add(("prop", typ))
    assert {1, 3} <= checked or {1, 4} <= checked or {1, 5} <= checked or {1, 6} <= checked
    assert any(isinstance(c, tuple) for c in checked)


def test_depth_of_a_frontal_plane_is_constant():
    scene = scenes.make_scene(5)
    h = float(scene.room_hi[2])
    eye = np.array([0.1, -0.2, 1.3])
    w2c = geo.look_at(eye, eye - np.array([0, 0, 1.0]), up=(0.0, 1.0, 0.0))  # straight down
    intr = geo.intrinsics_from_fov(H, W, 40.0)
    fr = scenes.raycast_views(scene, w2c[None], intr, H, W)
    floor = np.asarray(fr.obj_id[0]) == 1
    assert floor.mean() > 0.5
    np.testing.assert_allclose(np.asarray(fr.depth[0])[floor], 1.3, rtol=1e-5)
    w2c_up = geo.look_at(eye, eye + np.array([0, 0, 1.0]), up=(0.0, 1.0, 0.0))
    fr = scenes.raycast_views(scene, w2c_up[None], intr, H, W)
    ceil = np.asarray(fr.obj_id[0]) == 2
    np.testing.assert_allclose(np.asarray(fr.depth[0])[ceil], h - 1.3, rtol=1e-5)


def test_dynamic_masks_are_exact(small_scene):
    scene, intr = small_scene["scene"], small_scene["intr"]
    # look straight at each mover over time so that the masks are not empty
    cams, times = [], []
    for d in range(scenes.MAX_DYNAMIC):
        for tt in (0.0, 7.0):
            c = np.asarray(scenes.dynamic_positions(scene, tt))[d]
            cams.append(geo.look_at([0.0, 0.0, 1.4], c))
            times.append(tt)
    fr = scenes.raycast_views(scene, jnp.stack(cams), intr, H, W, jnp.asarray(times))
    dyn, rgb, oid = np.asarray(fr.dynamic), np.asarray(fr.rgb), np.asarray(fr.obj_id)
    assert dyn.any(axis=(1, 2)).all()
    np.testing.assert_array_equal(np.asarray(scenes.colour_key_mask(rgb)), dyn)
    np.testing.assert_array_equal(dyn, oid >= scenes.DYNAMIC_ID0)
    assert rgb[~dyn].max() <= 0.85 + 1e-6 and rgb[~dyn].min() >= 0.05 - 1e-6


def test_movers_move():
    scene = scenes.make_scene(3, n_dynamic=2)
    p0, p1 = (
        np.asarray(scenes.dynamic_positions(scene, 0.0)),
        np.asarray(scenes.dynamic_positions(scene, 10.0)),
    )
    assert (np.linalg.norm(p1 - p0, axis=1) > 0.05).all()


@pytest.mark.parametrize("kind", ["yaw", "dolly", "orbit"])
def test_loops_return_exactly_to_the_start(small_scene, kind):
    traj = trajectories.loop_trajectory(4, 10, scene=small_scene["scene"], kind=kind)
    assert traj.shape == (21, 4, 4)
    np.testing.assert_array_equal(traj[-1], traj[0])  # bit for bit
    np.testing.assert_array_equal(traj[10 + 3], traj[10 - 3])
    deg, m = trajectories.step_sizes(traj)
    assert deg.max() <= 10.0 and m.max() <= 0.15 and (deg.max() > 0.5 or m.max() > 0.01)
    centres = np.asarray(geo.camera_centers(jnp.asarray(traj)))
    assert (np.linalg.norm(centres[:, :2], axis=1) <= scenes.FREE_RADIUS + 1e-5).all()


def test_loop_frames_render_identically_at_start_and_end(small_scene):
    scene, intr = scenes.make_scene(7), small_scene["intr"]  # no movers: a static scene
    traj = jnp.asarray(trajectories.loop_trajectory(0, 4, scene=scene))
    fr = scenes.raycast_views(scene, traj[jnp.array([0, 8])], intr, H, W)
    np.testing.assert_array_equal(np.asarray(fr.rgb[0]), np.asarray(fr.rgb[1]))


def test_exploration_is_smooth_and_inside_the_free_region(small_scene):
    traj = trajectories.exploration_trajectory(9, 40, scene=small_scene["scene"])
    deg, m = trajectories.step_sizes(traj)
    assert traj.shape == (40, 4, 4) and deg.max() <= 10.0 and m.max() <= 0.15
    centres = np.asarray(geo.camera_centers(jnp.asarray(traj)))
    assert (np.linalg.norm(centres[:, :2], axis=1) <= scenes.FREE_RADIUS + 1e-5).all()


@pytest.mark.parametrize("n_clips", [2, 4, 6])
def test_split_clips(n_clips):
    n = 2 * 24 + 1
    clips = trajectories.split_clips(n, n_clips, overlap=2)
    assert len(clips) == n_clips and clips[0][0] == 0 and clips[-1][-1] == n - 1
    new = np.concatenate([clips[0]] + [c[2:] for c in clips[1:]])
    np.testing.assert_array_equal(new, np.arange(n))  # every frame generated exactly once
    for a, b in zip(clips, clips[1:], strict=False):
        np.testing.assert_array_equal(b[:2], a[-2:])  # preceding frames = end of the previous clip
    if n_clips == 2:
        np.testing.assert_array_equal(clips[0], np.arange(25))  # the outbound half of the loop
