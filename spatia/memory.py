"""Fixed-capacity point-cloud spatial memory (Spatia §3.1.1, §3.2; docs/spatia.md D2-D3).

`PointMemory` holds ``xyz [C, 3] f32``, ``rgb [C, 3] f32``, ``weight [C] f32`` (how many source
pixels were averaged into the point) and ``valid [C] bool``. The capacity ``C`` is static, so
every operation jits; valid points are kept packed at the front after every insertion.

* **Insertion** back-projects the *static* pixels of posed RGB-D frames (depth > 0, finite, not in
  the dynamic mask) -- dynamic pixels never enter memory (Spatia §3.1.1).
* **Voxel down-sampling** has Open3D's semantics: one point per occupied voxel, at the mean
  position and mean colour of the points inside (weighted by ``weight``, which is 1 for fresh
  pixels, so a single call equals Open3D's ``voxel_down_sample``). Voxel index =
  ``floor((p - origin) / voxel)``; Open3D's origin is ``min_bound - voxel / 2`` of the input
  (``origin="open3d"``). # choice: the memory itself uses a fixed world-anchored grid
  (``origin = 0``) so that an incremental update (old memory + new frames, weighted) equals a full
  rebuild from all frames; pass ``origin="open3d"`` to mimic the official rebuild exactly.
* **Overflow** is never silent: the jitted cores return the number of points that did not fit,
  and the host-level functions raise `MemoryOverflowError` (``on_overflow="raise"``, default) or
  return it in `InsertStats` (``"report"``). Points that do not fit are the last in voxel order.
* **Editing** (Spatia §1 (d), 3D-aware editing): select by a (possibly oriented) 3D box or by a
  2D mask in one view; delete, recolour, rigidly transform a selection; splice in another cloud.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from spatia import geometry as geo
from spatia import render as rnd

__all__ = [
    "PointMemory",
    "InsertStats",
    "MemoryOverflowError",
    "empty_memory",
    "frame_points",
    "frames_points",
    "voxel_downsample",
    "voxel_downsample_reference",
    "insert_points",
    "build_memory",
    "update_memory",
    "box_mask",
    "view_mask_selection",
    "delete",
    "recolour",
    "transform_selection",
    "splice",
    "compact",
    "bytes_per_point",
]


class MemoryOverflowError(RuntimeError):
    """More points than the memory's capacity; nothing is dropped silently."""


@struct.dataclass
class PointMemory:
    """Spatial memory with static capacity C. Valid points are packed first."""

    xyz: jnp.ndarray  # [C, 3] float32, metres, world frame
    rgb: jnp.ndarray  # [C, 3] float32 in [0, 1]
    weight: jnp.ndarray  # [C] float32, source pixels per point (0 where invalid)
    valid: jnp.ndarray  # [C] bool

    @property
    def capacity(self) -> int:
        return self.xyz.shape[0]

    def count(self) -> int:
        """Number of valid points (host int)."""
        return int(jnp.sum(self.valid))


class InsertStats(NamedTuple):
    """Result of an insertion: points that needed a slot, and how many of them did not fit."""

    n_points: int
    n_overflow: int


def bytes_per_point(rgb_uint8: bool = True) -> int:
    """Storage per point: xyz float32 (12 B) + rgb uint8 (3 B) as in a PLY file, or float32 (12 B)."""
    return 12 + (3 if rgb_uint8 else 12)


def empty_memory(capacity: int) -> PointMemory:
    """An empty memory with ``capacity`` slots."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    return PointMemory(
        jnp.zeros((capacity, 3), jnp.float32),
        jnp.zeros((capacity, 3), jnp.float32),
        jnp.zeros((capacity,), jnp.float32),
        jnp.zeros((capacity,), bool),
    )


# --------------------------------------------------------------------------------------------
# Frames -> points
# --------------------------------------------------------------------------------------------


def frame_points(rgb, depth, w2c, intr, dynamic=None):
    """Back-project one posed RGB-D frame through pixel centres.

    rgb [H, W, 3], depth [H, W] metric z (<= 0 or non-finite = no depth), w2c [4, 4], intr [4],
    dynamic [H, W] bool or None -> (xyz [H*W, 3], rgb [H*W, 3], valid [H*W]) with dynamic pixels
    invalid.
    """
    depth = jnp.asarray(depth, jnp.float32)
    if depth.ndim != 2 or jnp.shape(rgb)[:2] != depth.shape:
        raise ValueError(
            f"rgb [H, W, 3] and depth [H, W] must agree, got {jnp.shape(rgb)} and {depth.shape}"
        )
    ok = (depth > 0) & jnp.isfinite(depth)
    if dynamic is not None:
        ok = ok & ~jnp.asarray(dynamic, bool)
    pts = geo.depth_to_points(jnp.where(ok, depth, 1.0), w2c, intr)
    return pts.reshape(-1, 3), jnp.asarray(rgb, jnp.float32).reshape(-1, 3), ok.reshape(-1)


def frames_points(rgb, depth, w2c, intr, dynamic=None):
    """`frame_points` over T frames, flattened: rgb [T, H, W, 3], depth [T, H, W], w2c [T, 4, 4],
    intr [4] or [T, 4], dynamic [T, H, W] or None -> ([T*H*W, 3], [T*H*W, 3], [T*H*W])."""
    depth = jnp.asarray(depth, jnp.float32)
    t = depth.shape[0]
    intr = jnp.broadcast_to(jnp.asarray(intr, jnp.float32), (t, 4))
    dyn = jnp.zeros(depth.shape, bool) if dynamic is None else jnp.asarray(dynamic, bool)
    xyz, col, ok = jax.vmap(frame_points)(jnp.asarray(rgb), depth, jnp.asarray(w2c), intr, dyn)
    return xyz.reshape(-1, 3), col.reshape(-1, 3), ok.reshape(-1)


# --------------------------------------------------------------------------------------------
# Voxel down-sampling (Open3D semantics)
# --------------------------------------------------------------------------------------------


def _origin(xyz, valid, voxel, origin):
    if isinstance(origin, str):
        if origin != "open3d":
            raise ValueError(f"origin must be 'open3d' or a [3] array, got {origin!r}")
        lo = jnp.min(jnp.where(valid[:, None], xyz, jnp.inf), 0)
        return jnp.where(jnp.isfinite(lo), lo, 0.0) - voxel / 2
    return jnp.broadcast_to(jnp.asarray(origin, jnp.float32), (3,))


def _voxel_order(idx, valid):
    """Permutation sorting valid voxel indices [N, 3] lexicographically, invalid last (stable).

    When the occupied index box has < 2^31 cells the three indices are packed into one int32 key
    (one-key sort, ~2x faster on CPU); otherwise a 4-key sort."""
    n = idx.shape[0]
    perm = jnp.arange(n, dtype=jnp.int32)
    big = np.iinfo(np.int32).max
    lo = jnp.min(jnp.where(valid[:, None], idx, big), 0)
    hi = jnp.max(jnp.where(valid[:, None], idx, -big), 0)
    ext = jnp.maximum(hi - lo + 1, 1)
    fits = jnp.prod(ext.astype(jnp.float32)) < 2.0**31 - 2

    def packed(_):
        rel = jnp.where(valid[:, None], idx - lo, 0)
        key = jnp.where(valid, (rel[:, 0] * ext[1] + rel[:, 1]) * ext[2] + rel[:, 2], big)
        return lax.sort((key, perm), num_keys=1, is_stable=True)[1]

    def general(_):
        inv = (~valid).astype(jnp.int32)
        return lax.sort((inv, idx[:, 0], idx[:, 1], idx[:, 2], perm), num_keys=4, is_stable=True)[
            -1
        ]

    return lax.cond(fits, packed, general, None)


@jax.jit
def _voxel_core(xyz, rgb, weight, valid, voxel, origin):
    n = xyz.shape[0]
    valid = valid & jnp.all(jnp.isfinite(xyz), -1)
    idx = jnp.floor((xyz - origin) / voxel)
    idx = jnp.clip(jnp.where(valid[:, None], idx, 0), -(2.0**30), 2.0**30).astype(jnp.int32)
    perm = _voxel_order(idx, valid)
    ok_s = valid[perm]
    ix, iy, iz = idx[perm, 0], idx[perm, 1], idx[perm, 2]
    changed = (ix[1:] != ix[:-1]) | (iy[1:] != iy[:-1]) | (iz[1:] != iz[:-1])
    start = ok_s & jnp.concatenate([jnp.ones((1,), bool), changed])
    seg = jnp.where(ok_s, jnp.cumsum(start) - 1, n)
    w = jnp.where(ok_s, weight[perm], 0.0)
    sw = jax.ops.segment_sum(w, seg, num_segments=n + 1)[:n]
    sx = jax.ops.segment_sum(xyz[perm] * w[:, None], seg, num_segments=n + 1)[:n]
    sc = jax.ops.segment_sum(rgb[perm] * w[:, None], seg, num_segments=n + 1)[:n]
    n_vox = jnp.sum(start)
    out_valid = jnp.arange(n) < n_vox
    den = jnp.where(out_valid, sw, 1.0)[:, None]
    return (
        jnp.where(out_valid[:, None], sx / den, 0.0),
        jnp.where(out_valid[:, None], sc / den, 0.0),
        jnp.where(out_valid, sw, 0.0),
        out_valid,
        n_vox,
    )


def voxel_downsample(xyz, rgb, valid, voxel: float, *, weight=None, origin="open3d"):
    """Mean position and colour per occupied voxel (Open3D ``voxel_down_sample`` semantics).

    xyz [N, 3], rgb [N, C], valid [N] bool or None, voxel > 0 (metres); weight [N] (default 1) makes
    the means weighted; origin "open3d" (input min - voxel/2) or a [3] array.
    Returns (xyz [N, 3], rgb [N, C], weight [N] (summed), valid [N], n_voxels) with the n_voxels
    occupied voxels first, in lexicographic (ix, iy, iz) order. Pure and jit-compatible.
    """
    if not voxel > 0:
        raise ValueError(f"voxel must be > 0, got {voxel}")
    xyz = jnp.asarray(xyz, jnp.float32)
    rgb = jnp.asarray(rgb, jnp.float32)
    valid = jnp.ones(xyz.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
    weight = (
        jnp.ones(xyz.shape[:1], jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
    )
    v = jnp.asarray(voxel, jnp.float32)
    return _voxel_core(xyz, rgb, weight, valid, v, _origin(xyz, valid, v, origin))


def voxel_downsample_reference(xyz, rgb, voxel: float, origin="open3d"):
    """Numpy reference of `voxel_downsample` (unit weights): (xyz [M, 3], rgb [M, C]) in
    lexicographic voxel order; indices computed in float32 exactly like the JAX version."""
    xyz = np.asarray(xyz, np.float32)
    rgb = np.asarray(rgb, np.float32)
    v = np.float32(voxel)
    if isinstance(origin, str):
        o = xyz.min(0) - v / np.float32(2)
    else:
        o = np.asarray(origin, np.float32)
    idx = np.floor((xyz - o) / v).astype(np.int64)
    keys, inv = np.unique(idx, axis=0, return_inverse=True)
    inv = inv.ravel()
    cnt = np.bincount(inv, minlength=len(keys)).astype(np.float64)
    sx = np.zeros((len(keys), 3))
    sc = np.zeros((len(keys), rgb.shape[1]))
    np.add.at(sx, inv, xyz.astype(np.float64))
    np.add.at(sc, inv, rgb.astype(np.float64))
    return (sx / cnt[:, None]).astype(np.float32), (sc / cnt[:, None]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Insertion, rebuild, incremental update
# --------------------------------------------------------------------------------------------


def _pack(xyz, rgb, weight, valid, capacity):
    """Stable-compact valid entries into ``capacity`` slots. Returns (PointMemory, n_valid)."""
    pos = jnp.cumsum(valid) - 1
    n_valid = jnp.sum(valid)
    slot = jnp.where(valid & (pos < capacity), pos, capacity)  # overflow -> dump slot

    def put(x, fill):
        buf = jnp.full((capacity + 1,) + x.shape[1:], fill, x.dtype)
        return buf.at[slot].set(x, mode="drop", unique_indices=False)[:capacity]

    mem = PointMemory(
        put(xyz, 0.0),
        put(rgb, 0.0),
        put(jnp.where(valid, weight, 0.0), 0.0),
        jnp.arange(capacity) < jnp.minimum(n_valid, capacity),
    )
    return mem, n_valid


@functools.partial(jax.jit, static_argnames=("capacity", "downsample", "open3d_origin"))
def _insert_core(
    mem_xyz,
    mem_rgb,
    mem_w,
    mem_valid,
    xyz,
    rgb,
    valid,
    voxel,
    origin,
    *,
    capacity,
    downsample,
    open3d_origin,
):
    all_xyz = jnp.concatenate([mem_xyz, xyz.astype(jnp.float32)])
    all_rgb = jnp.concatenate([mem_rgb, rgb.astype(jnp.float32)])
    all_w = jnp.concatenate([mem_w, jnp.ones(xyz.shape[:1], jnp.float32)])
    all_valid = jnp.concatenate([mem_valid, valid & jnp.all(jnp.isfinite(xyz), -1)])
    if downsample:
        org = _origin(all_xyz, all_valid, voxel, "open3d") if open3d_origin else origin
        all_xyz, all_rgb, all_w, all_valid, _ = _voxel_core(
            all_xyz, all_rgb, all_w, all_valid, voxel, org
        )
    mem, n = _pack(all_xyz, all_rgb, all_w, all_valid, capacity)
    return mem, n, jnp.maximum(n - capacity, 0)


def _finish(mem, n, n_over, on_overflow, what):
    n, n_over = int(n), int(n_over)
    if n_over and on_overflow == "raise":
        raise MemoryOverflowError(
            f"{what}: {n} points need a slot but the memory holds {mem.capacity}; {n_over} would be "
            f"dropped. Increase the capacity or the voxel size, or pass on_overflow='report'."
        )
    return mem, InsertStats(n, n_over)


def insert_points(
    memory: PointMemory,
    xyz,
    rgb,
    valid=None,
    *,
    voxel: float | None = None,
    origin="world",
    on_overflow: str = "raise",
):
    """Add points [M, 3] / colours [M, 3] (valid [M]) to ``memory``.

    With ``voxel`` the union (old points weighted by their ``weight``) is voxel down-sampled;
    origin "world" = fixed grid at (0, 0, 0), "open3d" = data-dependent, or a [3] array.
    Returns (PointMemory, InsertStats). Overflow raises `MemoryOverflowError`
    (``on_overflow="raise"``) or is reported in the stats (``"report"``), never silent.
    """
    if on_overflow not in ("raise", "report"):
        raise ValueError(f"on_overflow must be 'raise' or 'report', got {on_overflow!r}")
    xyz = jnp.asarray(xyz, jnp.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be [M, 3], got {xyz.shape}")
    rgb = jnp.asarray(rgb, jnp.float32)
    if rgb.shape != xyz.shape:
        raise ValueError(f"rgb must be [M, 3] like xyz {xyz.shape}, got {rgb.shape}")
    valid = jnp.ones(xyz.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
    if voxel is not None and not voxel > 0:
        raise ValueError(f"voxel must be > 0 or None, got {voxel}")
    o3d = isinstance(origin, str) and origin == "open3d"
    if isinstance(origin, str) and origin not in ("world", "open3d"):
        raise ValueError(f"origin must be 'world', 'open3d' or a [3] array, got {origin!r}")
    org = jnp.zeros(3, jnp.float32) if isinstance(origin, str) else jnp.asarray(origin, jnp.float32)
    mem, n, n_over = _insert_core(
        memory.xyz,
        memory.rgb,
        memory.weight,
        memory.valid,
        xyz,
        rgb,
        valid,
        jnp.asarray(voxel or 1.0, jnp.float32),
        org,
        capacity=memory.capacity,
        downsample=voxel is not None,
        open3d_origin=o3d,
    )
    return _finish(mem, n, n_over, on_overflow, "insert_points")


def build_memory(
    rgb,
    depth,
    w2c,
    intr,
    dynamic=None,
    *,
    capacity: int,
    voxel: float | None,
    origin="world",
    on_overflow: str = "raise",
):
    """Rebuild a memory from T posed RGB-D frames (the official code's per-round rebuild).

    rgb [T, H, W, 3], depth [T, H, W], w2c [T, 4, 4], intr [4] or [T, 4], dynamic [T, H, W] or None.
    Static pixels of all frames are back-projected and voxel down-sampled (``voxel`` metres, None =
    keep every pixel). Returns (PointMemory, InsertStats).
    """
    xyz, col, ok = frames_points(rgb, depth, w2c, intr, dynamic)
    return insert_points(
        empty_memory(capacity), xyz, col, ok, voxel=voxel, origin=origin, on_overflow=on_overflow
    )


def update_memory(
    memory: PointMemory,
    rgb,
    depth,
    w2c,
    intr,
    dynamic=None,
    *,
    voxel: float | None,
    origin="world",
    on_overflow: str = "raise",
):
    """Incremental update: add the static pixels of new frames and re-voxelise (weighted), so
    ``update(build(A), B) == build(A + B)`` on a fixed grid. Arguments as in `build_memory`."""
    xyz, col, ok = frames_points(rgb, depth, w2c, intr, dynamic)
    return insert_points(memory, xyz, col, ok, voxel=voxel, origin=origin, on_overflow=on_overflow)


# --------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------


def box_mask(memory: PointMemory, lo, hi, box_from_world=None) -> jnp.ndarray:
    """Valid points inside the box ``lo <= p <= hi`` ([3] each). With ``box_from_world`` [4, 4]
    the points are first mapped into the box's frame (oriented boxes). Returns [C] bool."""
    p = memory.xyz if box_from_world is None else geo.transform_points(box_from_world, memory.xyz)
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    return memory.valid & jnp.all((p >= lo) & (p <= hi), -1)


def view_mask_selection(
    memory: PointMemory, mask, w2c, intr, *, visible_only: bool = True
) -> jnp.ndarray:
    """Points whose pixel in one view falls inside a 2D mask [H, W] (Spatia §1 (d): back-project a
    2D selection). ``visible_only`` keeps only the front-most points (1-px z-buffer).
    Returns [C] bool."""
    mask = jnp.asarray(mask, bool)
    h, w = mask.shape
    uv, z = geo.project(memory.xyz, w2c, intr)
    ui = jnp.floor(uv[:, 0]).astype(jnp.int32)
    vi = jnp.floor(uv[:, 1]).astype(jnp.int32)
    inb = memory.valid & (z > 1e-4) & (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    sel = inb & mask[jnp.clip(vi, 0, h - 1), jnp.clip(ui, 0, w - 1)]
    if visible_only:
        vis = rnd.render(memory.xyz, memory.rgb, memory.valid, w2c, intr, height=h, width=w).visible
        sel = sel & vis
    return sel


def delete(memory: PointMemory, mask) -> PointMemory:
    """Remove the selected points (mask [C]) and re-pack the rest in their original order."""
    keep = memory.valid & ~jnp.asarray(mask, bool)
    return _pack(memory.xyz, memory.rgb, memory.weight, keep, memory.capacity)[0]


def recolour(memory: PointMemory, mask, rgb) -> PointMemory:
    """Set the colour of the selected points to ``rgb`` ([3] or [C, 3])."""
    m = jnp.asarray(mask, bool)[:, None] & memory.valid[:, None]
    new = jnp.broadcast_to(jnp.asarray(rgb, jnp.float32), memory.rgb.shape)
    return memory.replace(rgb=jnp.where(m, new, memory.rgb))


def transform_selection(memory: PointMemory, mask, tmat) -> PointMemory:
    """Apply a rigid transform [4, 4] (world frame) to the selected points."""
    m = jnp.asarray(mask, bool)[:, None] & memory.valid[:, None]
    return memory.replace(xyz=jnp.where(m, geo.transform_points(tmat, memory.xyz), memory.xyz))


def splice(
    memory: PointMemory,
    xyz,
    rgb,
    valid=None,
    tmat=None,
    *,
    voxel: float | None = None,
    origin="world",
    on_overflow: str = "raise",
):
    """Insert another cloud (optionally moved by ``tmat`` [4, 4] first). Returns (memory, stats)."""
    xyz = jnp.asarray(xyz, jnp.float32)
    if tmat is not None:
        xyz = geo.transform_points(tmat, xyz)
    return insert_points(
        memory, xyz, rgb, valid, voxel=voxel, origin=origin, on_overflow=on_overflow
    )


def compact(memory: PointMemory) -> PointMemory:
    """Re-pack valid points to the front (order preserved)."""
    return _pack(memory.xyz, memory.rgb, memory.weight, memory.valid, memory.capacity)[0]
