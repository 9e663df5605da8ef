"""Pose refinement and memory update from (generated) frames: the stand-in for MapAnything
(docs/spatia.md D3).

`icp_refine` is frame-to-model point-to-plane ICP in the KinectFusion style:

* the memory is rendered (1-px z-buffer, `spatia.render`) at the current pose estimate, giving a
  model vertex map (the winning memory point per pixel) and normals from central differences of
  that vertex map (rejected across depth jumps and where the two tangents are near parallel);
* projective data association: each frame pixel's back-projected point ``q`` (world frame, under
  the current estimate) is projected into the model render; pairs with a depth gap above
  ``gate * depth`` are rejected;
* residual ``r = n^T (q - m)``, Jacobian ``[(q x n)^T, n^T]`` for a left perturbation
  ``exp([omega, v])`` of the camera-to-world pose, Huber weights (delta = 1 cm), damped 6x6 normal
  equations solved with ``jnp.linalg.solve``, update by the SE(3) exponential map;
* coarse-to-fine: ``levels`` pyramid levels (image size halved per level), ``iters[l]`` Gauss-Newton
  steps each, as a ``lax.fori_loop``. Everything is fixed-shape and vmappable over frames.

`update_from_frames` inserts the static pixels of frames into the memory with the given poses or
with poses refined by ICP against the memory first (docs/spatia.md D3: the official code rebuilds
from all frames with known poses; pose refinement is the optional extra).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import render as rnd

__all__ = [
    "ICPConfig",
    "ICPResult",
    "model_maps",
    "frame_normals",
    "icp_core",
    "icp_refine",
    "icp_refine_batch",
    "update_from_frames",
    "pose_error",
]


class ICPConfig(NamedTuple):
    """Point-to-plane ICP settings. iters[l] is for level l (0 = full resolution); the coarsest
    level runs first."""

    levels: int = 2
    iters: tuple = (8, 8)
    huber: float = 0.01  # metres
    gate: float = 0.05  # reject pairs whose depth differs by more than gate * depth
    max_residual: float = 0.1  # metres
    jump_frac: float = (
        0.25  # normal neighbours must agree in depth to this fraction (x level scale)
    )
    planarity: float = 0.15  # neighbours must lie this close (sine) to the tangent plane
    damping: float = 1e-6
    symmetric: bool = True  # residual along n_model + n_frame (exact on spheres/cylinders/planes)
    min_normal_dot: float = 0.7  # pairs whose normals disagree more are rejected


DEFAULT_ICP = ICPConfig()


class ICPResult(NamedTuple):
    """w2c [4, 4] refined pose; n_pairs: inliers at the last step; rmse: their RMS residual (m)."""

    w2c: jnp.ndarray
    n_pairs: jnp.ndarray
    rmse: jnp.ndarray


def _normals(vert, has, depth, eye, jump_frac, planarity):
    """Central-difference normals of a vertex map [H, W, 3] (any frame), facing ``eye`` [3].

    A normal is kept where all 4 neighbours exist, no neighbour's depth differs by more than
    ``jump_frac * depth``, the tangents are not near parallel, and every neighbour lies within
    ``planarity`` (sine of the angle) of the tangent plane: this rejects folds and occlusion edges
    but keeps grazing planes, whose depth changes fast from pixel to pixel.
    """
    pv = jnp.pad(vert, ((1, 1), (1, 1), (0, 0)))
    ph = jnp.pad(has, 1)
    pz = jnp.pad(depth, 1)
    nbs = [pv[1:-1, :-2], pv[1:-1, 2:], pv[:-2, 1:-1], pv[2:, 1:-1]]  # left, right, up, down
    nb_ok = ph[1:-1, :-2] & ph[1:-1, 2:] & ph[:-2, 1:-1] & ph[2:, 1:-1]
    jump = jnp.maximum(
        jnp.maximum(jnp.abs(pz[1:-1, :-2] - depth), jnp.abs(pz[1:-1, 2:] - depth)),
        jnp.maximum(jnp.abs(pz[:-2, 1:-1] - depth), jnp.abs(pz[2:, 1:-1] - depth)),
    )
    dx, dy = nbs[1] - nbs[0], nbs[3] - nbs[2]
    nrm = jnp.cross(dx, dy)
    nn = jnp.linalg.norm(nrm, axis=-1)
    sin_ang = nn / jnp.maximum(jnp.linalg.norm(dx, axis=-1) * jnp.linalg.norm(dy, axis=-1), 1e-12)
    nrm = nrm / jnp.maximum(nn, 1e-12)[..., None]
    nrm = jnp.where((jnp.sum(nrm * (eye - vert), -1) < 0)[..., None], -nrm, nrm)
    flat = jnp.ones_like(has)
    for nb in nbs:
        e = nb - vert
        flat = flat & (
            jnp.abs(jnp.sum(nrm * e, -1)) <= planarity * jnp.linalg.norm(e, axis=-1) + 1e-9
        )
    ok = has & nb_ok & (jump < jump_frac * depth) & (sin_ang > 0.2) & flat
    return nrm, ok


def model_maps(
    xyz, valid, w2c, intr, height: int, width: int, jump_frac: float = 0.25, planarity: float = 0.15
):
    """Render the memory and derive vertex and normal maps at one camera.

    Returns (vertex [H, W, 3] world (the winning memory point per pixel), normal [H, W, 3] world
    (facing the camera), ok [H, W] bool, depth [H, W]).
    """
    n = xyz.shape[0]
    out = rnd.render(
        xyz, jnp.zeros((n, 1), jnp.float32), valid, w2c, intr, height=height, width=width
    )
    vert = xyz[jnp.minimum(out.index, n - 1)]
    nrm, ok = _normals(vert, ~out.hole, out.depth, geo.camera_centers(w2c), jump_frac, planarity)
    return vert, nrm, ok, out.depth


def frame_normals(depth, intr, jump_frac: float = 0.25, planarity: float = 0.15):
    """Camera-frame vertex and normal maps of a depth map [H, W] (back-projected pixel centres).

    Returns (vertex [H, W, 3], normal [H, W, 3] facing the camera, ok [H, W])."""
    uv = geo.pixel_centers(*depth.shape)
    x = (uv[..., 0] - intr[2]) / intr[0] * depth
    y = (uv[..., 1] - intr[3]) / intr[1] * depth
    vert = jnp.stack([x, y, depth], -1)
    has = (depth > 0) & jnp.isfinite(depth)
    nrm, ok = _normals(vert, has, depth, jnp.zeros(3), jump_frac, planarity)
    return vert, nrm, ok


def _gn_step(c2w, q_cam, q_n, q_ok, xyz, valid, intr_l, h, w, scale, cfg: ICPConfig):
    """One Gauss-Newton step at one level. q_cam [M, 3] frame points (camera frame), q_n their normals."""
    w2c = geo.se3_inverse(c2w)
    vert, nrm, ok, _ = model_maps(
        xyz, valid, w2c, intr_l, h, w, cfg.jump_frac * scale, cfg.planarity
    )
    q = geo.transform_points(c2w, q_cam)  # world
    uv, z = geo.project(q, w2c, intr_l)
    ui = jnp.floor(uv[:, 0]).astype(jnp.int32)
    vi = jnp.floor(uv[:, 1]).astype(jnp.int32)
    inb = q_ok & (z > 1e-4) & (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    ui, vi = jnp.clip(ui, 0, w - 1), jnp.clip(vi, 0, h - 1)
    m, nm, okm = vert[vi, ui], nrm[vi, ui], ok[vi, ui]
    zm = jnp.sum(
        (m - geo.camera_centers(w2c)) * (w2c[2, :3]), -1
    )  # model point depth along the axis
    qn = geo.transform_points(c2w, q_n) - c2w[:3, 3]  # rotate the frame normals to world
    agree = jnp.sum(nm * qn, -1) > cfg.min_normal_dot
    if cfg.symmetric:  # Rusinkiewicz's symmetric objective, normal frozen within a step
        nm = nm + qn
        nm = nm / jnp.maximum(jnp.linalg.norm(nm, axis=-1, keepdims=True), 1e-12)
    r = jnp.sum(nm * (q - m), -1)
    pair = inb & okm & agree & (jnp.abs(zm - z) < cfg.gate * z) & (jnp.abs(r) < cfg.max_residual)
    wt = jnp.where(
        pair,
        jnp.where(jnp.abs(r) <= cfg.huber, 1.0, cfg.huber / jnp.maximum(jnp.abs(r), 1e-12)),
        0.0,
    )
    jac = jnp.concatenate([jnp.cross(q, nm), nm], -1)  # [M, 6]
    a = jnp.einsum("m,mi,mj->ij", wt, jac, jac, precision="highest") + cfg.damping * jnp.eye(6)
    b = jnp.einsum("m,mi,m->i", wt, jac, r, precision="highest")
    delta = -jnp.linalg.solve(a, b)
    enough = jnp.sum(pair) >= 12
    new = jnp.where(enough, geo.se3_exp(delta) @ c2w, c2w)
    rmse = jnp.sqrt(jnp.sum(jnp.where(pair, r * r, 0.0)) / jnp.maximum(jnp.sum(pair), 1))
    return new, jnp.sum(pair), rmse


@functools.partial(jax.jit, static_argnames=("height", "width", "cfg"))
def icp_core(xyz, valid, depth, dyn, w2c0, intr, *, height, width, cfg):
    """Pure ICP: xyz [N, 3], valid [N], depth [H, W], dyn [H, W], w2c0 [4, 4], intr [4] -> ICPResult."""
    c2w = geo.se3_inverse(w2c0)
    n_pairs = jnp.zeros((), jnp.int32)
    rmse = jnp.zeros((), jnp.float32)
    vert, nrm, fok = frame_normals(depth, intr, cfg.jump_frac, cfg.planarity)
    fok = fok & ~dyn
    for lvl in reversed(range(cfg.levels)):  # static: coarsest first
        s = 2**lvl
        # frame points of every s-th pixel (back-projected at full resolution)
        q_cam = vert[::s, ::s].reshape(-1, 3)
        q_n = nrm[::s, ::s].reshape(-1, 3)
        q_ok = fok[::s, ::s].reshape(-1)
        h_l, w_l = -(-height // s), -(-width // s)
        intr_l = geo.scale_intrinsics(intr, 1.0 / s)

        def body(_, carry, q_cam=q_cam, q_n=q_n, q_ok=q_ok, intr_l=intr_l, h_l=h_l, w_l=w_l, s=s):
            c, _, _ = carry
            return _gn_step(c, q_cam, q_n, q_ok, xyz, valid, intr_l, h_l, w_l, s, cfg)

        c2w, n_pairs, rmse = lax.fori_loop(0, cfg.iters[lvl], body, (c2w, n_pairs, rmse))
    return ICPResult(geo.se3_inverse(c2w), n_pairs, rmse)


def icp_refine(
    memory: mem_lib.PointMemory, depth, w2c_init, intr, dynamic=None, cfg: ICPConfig = DEFAULT_ICP
) -> ICPResult:
    """Refine one frame's pose against the memory.

    depth [H, W] metric z of the frame, w2c_init [4, 4], intr [4], dynamic [H, W] bool (pixels
    excluded) -> `ICPResult` (w2c [4, 4], n_pairs, rmse).
    """
    depth = jnp.asarray(depth, jnp.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {depth.shape}")
    if len(cfg.iters) != cfg.levels:
        raise ValueError(f"cfg.iters needs one entry per level ({cfg.levels}), got {cfg.iters}")
    h, w = depth.shape
    dyn = jnp.zeros((h, w), bool) if dynamic is None else jnp.asarray(dynamic, bool)
    return icp_core(
        memory.xyz,
        memory.valid,
        depth,
        dyn,
        jnp.asarray(w2c_init, jnp.float32),
        jnp.asarray(intr, jnp.float32),
        height=h,
        width=w,
        cfg=cfg,
    )


def icp_refine_batch(
    memory: mem_lib.PointMemory, depth, w2c_init, intr, dynamic=None, cfg: ICPConfig = DEFAULT_ICP
) -> ICPResult:
    """`icp_refine` for T frames, each against the same memory: depth [T, H, W], w2c_init
    [T, 4, 4], intr [4] or [T, 4], dynamic [T, H, W] or None. Frames run one after another through
    one compiled function (`icp_core` is pure and can be ``jax.vmap``-ed instead)."""
    depth = jnp.asarray(depth, jnp.float32)
    t = depth.shape[0]
    intr = jnp.broadcast_to(jnp.asarray(intr, jnp.float32), (t, 4))
    outs = [
        icp_refine(
            memory, depth[i], w2c_init[i], intr[i], None if dynamic is None else dynamic[i], cfg
        )
        for i in range(t)
    ]
    return ICPResult(*(jnp.stack(f) for f in zip(*outs, strict=True)))


def update_from_frames(
    memory: mem_lib.PointMemory,
    rgb,
    depth,
    w2c,
    intr,
    dynamic=None,
    *,
    voxel: float | None,
    refine: bool = False,
    cfg: ICPConfig = DEFAULT_ICP,
    rebuild: bool = False,
    origin="world",
    on_overflow: str = "raise",
):
    """Memory update from T frames (rgb [T, H, W, 3], depth [T, H, W], w2c [T, 4, 4]).

    ``refine`` first aligns every frame to the current memory with `icp_refine_batch` (a frame
    with too few ICP pairs keeps its given pose). ``rebuild`` starts from an empty memory of the
    same capacity (the official per-round rebuild; then pass *all* frames so far), otherwise the
    frames are added incrementally. Returns (memory, InsertStats, w2c_used [T, 4, 4]).
    """
    w2c = jnp.asarray(w2c, jnp.float32)
    if refine:
        res = icp_refine_batch(memory, depth, w2c, intr, dynamic, cfg)
        w2c = jnp.where((res.n_pairs >= 12)[:, None, None], res.w2c, w2c)
    base = mem_lib.empty_memory(memory.capacity) if rebuild else memory
    new_mem, stats = mem_lib.update_memory(
        base, rgb, depth, w2c, intr, dynamic, voxel=voxel, origin=origin, on_overflow=on_overflow
    )
    return new_mem, stats, w2c


def pose_error(w2c_a, w2c_b):
    """(rotation error in degrees, camera-centre distance in metres) between two w2c [..., 4, 4]."""
    rel = jnp.asarray(w2c_a, jnp.float32)[..., :3, :3] @ jnp.swapaxes(
        jnp.asarray(w2c_b, jnp.float32)[..., :3, :3], -1, -2
    )
    ang = geo.rotation_angle_deg(rel)
    dist = jnp.linalg.norm(geo.camera_centers(w2c_a) - geo.camera_centers(w2c_b), axis=-1)
    return ang, dist
