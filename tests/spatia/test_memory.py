"""Point memory: voxelisation semantics, static-only insertion, overflow, update, editing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import render as rnd
from spatia import scenes

from .conftest import H, W


@pytest.mark.parametrize("voxel", [0.05, 0.13])
def test_voxel_downsample_equals_numpy_reference(rng, voxel):
    n = 4000
    xyz = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    rgb = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    valid = rng.uniform(size=n) > 0.2
    oxyz, orgb, ow, ovalid, nv = mem_lib.voxel_downsample(xyz, rgb, valid, voxel)
    rx, rc = mem_lib.voxel_downsample_reference(xyz[valid], rgb[valid], voxel)
    nv = int(nv)
    assert nv == len(rx) and int(ovalid.sum()) == nv and nv < valid.sum()
    np.testing.assert_allclose(np.asarray(oxyz[:nv]), rx, atol=1e-6)
    np.testing.assert_allclose(np.asarray(orgb[:nv]), rc, atol=1e-6)
    assert float(ow.sum()) == valid.sum()  # every valid point counted once


def test_voxel_downsample_huge_extent_uses_the_multi_key_sort(rng):
    # > 2^31 occupied cells in the index box: the packed one-key sort cannot be used
    cells = rng.integers(-(2**20), 2**20, (4000, 3))
    cells[2000:] = cells[:2000]  # every voxel holds two points
    pts = ((cells + rng.choice([0.25, 0.5, 0.75], (4000, 3))) * 0.5).astype(
        np.float32
    )  # exact in float32
    rx, rc = mem_lib.voxel_downsample_reference(pts, pts[:, ::-1], 0.5, origin=np.zeros(3))
    oxyz, orgb, _, _, nv = mem_lib.voxel_downsample(
        pts, pts[:, ::-1], None, 0.5, origin=np.zeros(3)
    )
    assert int(nv) == len(rx) == 2000
    np.testing.assert_array_equal(np.asarray(oxyz[:2000]), rx)
    np.testing.assert_array_equal(np.asarray(orgb[:2000]), rc)


def test_voxel_downsample_matches_open3d(rng):
    o3d = pytest.importorskip("open3d")
    voxel = 0.1
    # keep points away from voxel faces so float32 (ours) and float64 (Open3D) agree on the cell
    cells = rng.integers(1, 12, (3000, 3))
    xyz = ((cells + rng.uniform(0.05, 0.95, (3000, 3))) * voxel).astype(np.float32)
    xyz[0] = 0.5 * voxel  # the minimum in every axis: Open3D's origin min_bound - voxel/2 is then 0
    rgb = rng.uniform(0, 1, (3000, 3)).astype(np.float32)
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(xyz.astype(np.float64))
    pc.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64))
    down = pc.voxel_down_sample(voxel)
    px, pcol = np.asarray(down.points), np.asarray(down.colors)
    order = np.lexsort(np.floor(px / voxel).astype(int).T[::-1])
    oxyz, orgb, _, _, nv = mem_lib.voxel_downsample(xyz, rgb, None, voxel)
    assert int(nv) == len(px)
    np.testing.assert_allclose(np.asarray(oxyz[: int(nv)]), px[order], atol=1e-6)
    np.testing.assert_allclose(np.asarray(orgb[: int(nv)]), pcol[order], atol=1e-6)


def test_dynamic_pixels_never_enter_memory(small_scene):
    fr, w2c, intr, scene = (
        small_scene["frames"],
        small_scene["w2c"],
        small_scene["intr"],
        small_scene["scene"],
    )
    # make sure movers are in view: add frames looking at them
    cams = jnp.stack(
        [geo.look_at([0.0, 0.0, 1.4], c) for c in np.asarray(scenes.dynamic_positions(scene, 0.0))]
    )
    fd = scenes.raycast_views(scene, cams, intr, H, W, jnp.zeros(2))
    rgb = jnp.concatenate([fr.rgb, fd.rgb])
    depth = jnp.concatenate([fr.depth, fd.depth])
    dyn = jnp.concatenate([fr.dynamic, fd.dynamic])
    poses = jnp.concatenate([w2c, cams])
    assert int(dyn.sum()) > 50
    mem, stats = mem_lib.build_memory(rgb, depth, poses, intr, dyn, capacity=20000, voxel=None)
    assert stats.n_points == int((~dyn).sum()) == mem.count()
    key = np.asarray(scenes.colour_key_mask(mem.rgb[: mem.count()]))
    assert not key.any()
    # control: without the mask the movers' colours do enter (the check can fail)
    mem2, _ = mem_lib.build_memory(rgb, depth, poses, intr, None, capacity=20000, voxel=None)
    assert np.asarray(scenes.colour_key_mask(mem2.rgb[: mem2.count()])).sum() == int(dyn.sum())


def test_single_frame_memory_renders_back_the_frame(small_scene):
    fr, w2c, intr = small_scene["frames"], small_scene["w2c"], small_scene["intr"]
    mem, _ = mem_lib.build_memory(
        fr.rgb[:1], fr.depth[:1], w2c[:1], intr, fr.dynamic[:1], capacity=H * W, voxel=None
    )
    out = rnd.render(mem.xyz, mem.rgb, mem.valid, w2c[0], intr, height=H, width=W)
    static = ~np.asarray(fr.dynamic[0])
    np.testing.assert_array_equal(np.asarray(out.rgb)[static], np.asarray(fr.rgb[0])[static])
    np.testing.assert_array_equal(np.asarray(out.hole), ~static)


def test_overflow_raises_or_reports(small_scene):
    fr, w2c, intr = small_scene["frames"], small_scene["w2c"], small_scene["intr"]
    with pytest.raises(mem_lib.MemoryOverflowError, match="would be dropped"):
        mem_lib.build_memory(fr.rgb, fr.depth, w2c, intr, fr.dynamic, capacity=500, voxel=0.05)
    mem, stats = mem_lib.build_memory(
        fr.rgb, fr.depth, w2c, intr, fr.dynamic, capacity=500, voxel=0.05, on_overflow="report"
    )
    assert stats.n_points > 500 and stats.n_overflow == stats.n_points - 500 and mem.count() == 500
    ok, ok_stats = mem_lib.build_memory(
        fr.rgb, fr.depth, w2c, intr, fr.dynamic, capacity=20000, voxel=0.05
    )
    assert ok_stats.n_overflow == 0 and ok.count() == stats.n_points
    # the 500 kept are exactly the first 500 of the full result (voxel order), nothing reshuffled
    np.testing.assert_array_equal(np.asarray(mem.xyz), np.asarray(ok.xyz[:500]))


def test_incremental_update_equals_rebuild(small_scene):
    fr, w2c, intr = small_scene["frames"], small_scene["w2c"], small_scene["intr"]
    full, _ = mem_lib.build_memory(
        fr.rgb, fr.depth, w2c, intr, fr.dynamic, capacity=20000, voxel=0.05
    )
    part, _ = mem_lib.build_memory(
        fr.rgb[:3], fr.depth[:3], w2c[:3], intr, fr.dynamic[:3], capacity=20000, voxel=0.05
    )
    inc, _ = mem_lib.update_memory(
        part, fr.rgb[3:], fr.depth[3:], w2c[3:], intr, fr.dynamic[3:], voxel=0.05
    )
    assert inc.count() == full.count() > part.count()
    np.testing.assert_allclose(np.asarray(inc.xyz), np.asarray(full.xyz), atol=2e-6)
    np.testing.assert_allclose(np.asarray(inc.rgb), np.asarray(full.rgb), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(inc.weight), np.asarray(full.weight))


@pytest.fixture(scope="module")
def memory(small_scene):
    fr, w2c, intr = small_scene["frames"], small_scene["w2c"], small_scene["intr"]
    return mem_lib.build_memory(
        fr.rgb, fr.depth, w2c, intr, fr.dynamic, capacity=20000, voxel=0.05
    )[0]


def _rows(x, valid):
    a = np.asarray(x)[np.asarray(valid)]
    return a[np.lexsort(a.T[::-1])]


def test_delete_box_removes_exactly_the_selection(memory):
    pts = np.asarray(memory.xyz)[np.asarray(memory.valid)]
    mid = np.median(pts, 0)
    lo, hi = mid - [0.6, 0.6, 0.5], mid + [0.6, 0.6, 0.5]
    sel = np.asarray(mem_lib.box_mask(memory, lo, hi))
    inside = np.all((pts >= lo) & (pts <= hi), 1)
    assert inside.sum() == sel.sum() > 20 and (~inside).sum() > 20
    out = mem_lib.delete(memory, sel)
    assert out.count() == memory.count() - sel.sum()
    np.testing.assert_array_equal(_rows(out.xyz, out.valid), _rows(memory.xyz, memory.valid & ~sel))
    # oriented box: the same box rotated about z by 90 deg, expressed through box_from_world
    rot = geo.se3_exp(jnp.array([0, 0, np.pi / 2, 0, 0, 0]))
    sel_rot = np.asarray(mem_lib.box_mask(memory, lo, hi, box_from_world=rot))
    p_box = np.asarray(geo.transform_points(rot, memory.xyz))
    np.testing.assert_array_equal(
        sel_rot, np.asarray(memory.valid) & np.all((p_box >= lo) & (p_box <= hi), 1)
    )


def test_recolour_transform_and_splice(memory):
    sel = mem_lib.box_mask(memory, [-9, -9, 0.0], [9, 9, 0.02])  # the floor
    rec = mem_lib.recolour(memory, sel, [1.0, 0.0, 1.0])
    s = np.asarray(sel)
    np.testing.assert_array_equal(np.asarray(rec.rgb)[s], np.tile([1.0, 0.0, 1.0], (s.sum(), 1)))
    np.testing.assert_array_equal(np.asarray(rec.rgb)[~s], np.asarray(memory.rgb)[~s])
    lift = geo.se3_exp(jnp.array([0, 0, 0, 0, 0, 0.5]))
    moved = mem_lib.transform_selection(memory, sel, lift)
    np.testing.assert_allclose(
        np.asarray(moved.xyz)[s, 2], np.asarray(memory.xyz)[s, 2] + 0.5, atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(moved.xyz)[~s], np.asarray(memory.xyz)[~s])
    extra = np.random.default_rng(0).uniform(0, 1, (100, 3)).astype(np.float32)
    sp, stats = mem_lib.splice(memory, extra, extra, tmat=lift)
    assert sp.count() == memory.count() + 100 and stats.n_overflow == 0
    np.testing.assert_allclose(
        np.asarray(sp.xyz[memory.count() : memory.count() + 100]), extra + [0, 0, 0.5], atol=1e-6
    )
    with pytest.raises(mem_lib.MemoryOverflowError):
        mem_lib.splice(memory, np.zeros((memory.capacity, 3)), np.zeros((memory.capacity, 3)))


def test_view_mask_selection(memory, small_scene):
    w2c, intr = small_scene["w2c"][0], small_scene["intr"]
    mask = np.zeros((H, W), bool)
    mask[8:20, 10:30] = True
    sel = np.asarray(mem_lib.view_mask_selection(memory, mask, w2c, intr))
    uv, z = geo.project(memory.xyz, w2c, intr)
    uv = np.floor(np.asarray(uv)).astype(int)
    inside = (
        np.asarray(memory.valid)
        & (np.asarray(z) > 0)
        & (uv[:, 0] >= 10)
        & (uv[:, 0] < 30)
        & (uv[:, 1] >= 8)
        & (uv[:, 1] < 20)
    )
    assert sel.sum() > 20 and not (sel & ~inside).any()
    # only front-most points: deleting them and re-rendering leaves the masked pixels changed
    out = rnd.render(memory.xyz, memory.rgb, memory.valid, w2c, intr, height=H, width=W)
    idx = np.asarray(out.index)[mask]
    assert set(idx[idx < memory.capacity].tolist()) <= set(np.nonzero(sel)[0].tolist())


def test_frame_points_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must agree"):
        mem_lib.frame_points(np.zeros((4, 5, 3)), np.zeros((4, 6)), np.eye(4), np.ones(4))
    with pytest.raises(ValueError, match="capacity"):
        mem_lib.empty_memory(0)
    with jax.default_device(jax.devices("cpu")[0]):
        assert mem_lib.empty_memory(3).count() == 0
