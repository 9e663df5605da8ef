"""Deterministic synthetic 3D worlds and an analytic ray caster (docs/spatia.md D12).

World frame: metres, **z up**, floor at z = 0, room centred on the origin in x and y.

* `make_scene(seed)` -> `Scene`: an axis-aligned room of 4-8 m x 4-8 m x 2.5-3 m (floor, ceiling,
  4 walls) plus 4-10 static props (yawed boxes, spheres, vertical cylinders) in a ring near the
  walls, each surface with its own procedural texture (stripes / checker / value noise, random
  colours, frequency and orientation), and 0-2 moving objects (sphere or cube) in **reserved
  colours** that no static texture can produce (static colours stay inside [0.05, 0.85] per
  channel; reserved colours have every channel exactly 0 or 1). Moving objects are unshaded, so
  `colour_key_mask` (exact match with a reserved colour) equals the object-id mask.
* `raycast(scene, w2c, intr, height, width, time)` -> `Frame`: per-pixel nearest hit through the
  pixel centre: RGB (view-independent Lambert shading), metric z-depth, object id, dynamic mask.
* Camera trajectories through these rooms are in `spatia.trajectories`.

Object ids: 1 floor, 2 ceiling, 3-6 walls (-x, +x, -y, +y), 7.. static props (slot i -> 7 + i),
`DYNAMIC_ID0` + d for moving object d. Everything is pure JAX with static shapes (props and
moving objects live in fixed slots with validity masks), jit- and vmap-able.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spatia import geometry as geo

__all__ = [
    "MAX_PROPS",
    "MAX_DYNAMIC",
    "PROP_ID0",
    "DYNAMIC_ID0",
    "RESERVED_COLOURS",
    "FREE_RADIUS",
    "Scene",
    "Frame",
    "make_scene",
    "dynamic_positions",
    "raycast",
    "raycast_views",
    "colour_key_mask",
]

MAX_PROPS = 10
MAX_DYNAMIC = 2
PROP_ID0 = 7
N_STATIC_IDS = PROP_ID0 + MAX_PROPS  # 17: ids 0..16 (0 unused)
DYNAMIC_ID0 = 100
# choice: reserved colours with channels in {0, 1}; static colours are confined to [0.05, 0.85]
RESERVED_COLOURS = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)
FREE_RADIUS = 0.9  # cameras stay within this distance of the room's vertical axis
_LIGHT = np.array([0.35, -0.5, 0.79], np.float32) / np.linalg.norm([0.35, -0.5, 0.79])
_EPS = 1e-4
_BIG = 1e9


@struct.dataclass
class Scene:
    """A synthetic room. Shapes are fixed: props in `MAX_PROPS` slots, movers in `MAX_DYNAMIC`."""

    room_lo: jnp.ndarray  # [3]
    room_hi: jnp.ndarray  # [3]
    prop_type: jnp.ndarray  # [P] int32: 0 box, 1 sphere, 2 cylinder
    prop_valid: jnp.ndarray  # [P] bool
    prop_center: jnp.ndarray  # [P, 3] box centre / sphere centre / cylinder base centre
    prop_size: jnp.ndarray  # [P, 3] box half-extents / (r, r, r) / (r, r, height)
    prop_yaw: jnp.ndarray  # [P] box yaw (radians)
    tex_colour1: jnp.ndarray  # [N_STATIC_IDS, 3]
    tex_colour2: jnp.ndarray  # [N_STATIC_IDS, 3]
    tex_kind: jnp.ndarray  # [N_STATIC_IDS] int32: 0 stripes, 1 checker, 2 value noise
    tex_freq: jnp.ndarray  # [N_STATIC_IDS] cycles per metre
    tex_angle: jnp.ndarray  # [N_STATIC_IDS]
    tex_seed: jnp.ndarray  # [N_STATIC_IDS] int32
    dyn_valid: jnp.ndarray  # [D] bool
    dyn_kind: jnp.ndarray  # [D] int32: 0 sphere, 1 cube (axis-aligned)
    dyn_size: jnp.ndarray  # [D] radius / half-extent
    dyn_colour: jnp.ndarray  # [D, 3] reserved colours
    dyn_path: jnp.ndarray  # [D] int32: 0 linear oscillation, 1 circle
    dyn_center: jnp.ndarray  # [D, 3]
    dyn_axis: jnp.ndarray  # [D, 3] amplitude vector (linear) / (radius, 0, 0) (circle)
    dyn_omega: jnp.ndarray  # [D] radians per unit time
    dyn_phase: jnp.ndarray  # [D]


class Frame(NamedTuple):
    """Ray-caster output. rgb [H, W, 3] f32 in [0, 1]; depth [H, W] f32 metric z;
    obj_id [H, W] int32; dynamic [H, W] bool (pixel shows a moving object)."""

    rgb: jnp.ndarray
    depth: jnp.ndarray
    obj_id: jnp.ndarray
    dynamic: jnp.ndarray


# --------------------------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------------------------


class _Draws:
    """Slices of one uniform draw: a single threefry call keeps the compile small."""

    def __init__(self, key, n):
        self.u = jax.random.uniform(key, (n,))
        self.i = 0

    def uniform(self, shape=(), minval=0.0, maxval=1.0):
        size = int(np.prod(shape))
        x = self.u[self.i : self.i + size].reshape(shape)
        self.i += size
        return minval + (jnp.asarray(maxval) - minval) * x

    def randint(self, shape, lo, hi):
        return jnp.minimum(jnp.floor(self.uniform(shape, lo, hi)), hi - 1).astype(jnp.int32)


@jax.jit
def _make_scene(key, n_dynamic):
    r = _Draws(key, 512)
    half = r.uniform((2,), 2.0, 4.0)
    height = r.uniform((), 2.5, 3.0)
    room_lo = jnp.array([-half[0], -half[1], 0.0])
    room_hi = jnp.array([half[0], half[1], height])

    n_props = r.randint((), 4, MAX_PROPS + 1)
    prop_valid = jnp.arange(MAX_PROPS) < n_props
    prop_type = r.randint((MAX_PROPS,), 0, 3)
    # sizes
    box_half = r.uniform(
        (MAX_PROPS, 3), jnp.array([0.15, 0.15, 0.15]), jnp.array([0.45, 0.45, 0.6])
    )
    sph_r = r.uniform((MAX_PROPS,), 0.15, 0.4)
    cyl_r = r.uniform((MAX_PROPS,), 0.1, 0.3)
    cyl_h = r.uniform((MAX_PROPS,), 0.4, 1.8)
    footprint = jnp.select(
        [prop_type == 0, prop_type == 1], [jnp.linalg.norm(box_half[:, :2], axis=-1), sph_r], cyl_r
    )
    # positions: a ring between the free centre region and the walls, spread in angle
    base_angle = r.uniform((), 0.0, 2 * jnp.pi)
    ang = base_angle + 2 * jnp.pi * (
        jnp.arange(MAX_PROPS) + 0.35 * r.uniform((MAX_PROPS,))
    ) / jnp.maximum(n_props, 1)
    dirs = jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    to_wall = jnp.min(
        half[None] / jnp.maximum(jnp.abs(dirs), 1e-6), -1
    )  # distance to the wall along dirs
    dmin = FREE_RADIUS + 0.35 + footprint
    dmax = jnp.maximum(to_wall - footprint - 0.05, dmin)
    dist = dmin + r.uniform((MAX_PROPS,)) * (dmax - dmin)
    xy = dirs * dist[:, None]
    sph_lift = r.uniform((MAX_PROPS,), 0.0, 1.2) * (r.uniform((MAX_PROPS,)) < 0.5)
    cz = jnp.select([prop_type == 0, prop_type == 1], [box_half[:, 2], sph_r + sph_lift], 0.0)
    prop_center = jnp.concatenate([xy, cz[:, None]], -1)
    prop_size = jnp.select(
        [prop_type[:, None] == 0, prop_type[:, None] == 1],
        [box_half, jnp.repeat(sph_r[:, None], 3, 1)],
        jnp.stack([cyl_r, cyl_r, cyl_h], -1),
    )
    prop_yaw = r.uniform((MAX_PROPS,), 0.0, jnp.pi)

    tex_colour1 = r.uniform((N_STATIC_IDS, 3), 0.1, 0.85)
    tex_colour2 = r.uniform((N_STATIC_IDS, 3), 0.1, 0.85)
    tex_kind = r.randint((N_STATIC_IDS,), 0, 3)
    tex_freq = r.uniform((N_STATIC_IDS,), 1.5, 5.0)
    tex_angle = r.uniform((N_STATIC_IDS,), 0.0, jnp.pi)
    tex_seed = r.randint((N_STATIC_IDS,), 0, 1 << 20)

    d = jnp.arange(MAX_DYNAMIC)
    dyn_valid = d < n_dynamic
    dyn_kind = r.randint((MAX_DYNAMIC,), 0, 2)
    dyn_size = r.uniform((MAX_DYNAMIC,), 0.15, 0.3)
    dyn_colour = jnp.asarray(RESERVED_COLOURS[np.arange(MAX_DYNAMIC) % len(RESERVED_COLOURS)])
    dyn_path = r.randint((MAX_DYNAMIC,), 0, 2)
    # movers live in the ring between the camera region and the props
    dang = base_angle + jnp.pi / MAX_DYNAMIC + 2 * jnp.pi * d / MAX_DYNAMIC
    dcen_r = FREE_RADIUS + 0.55
    dz = r.uniform((MAX_DYNAMIC,), 0.4, 1.4)
    dyn_center = jnp.stack([dcen_r * jnp.cos(dang), dcen_r * jnp.sin(dang), dz], -1)
    tangent = jnp.stack([-jnp.sin(dang), jnp.cos(dang), jnp.zeros_like(dang)], -1)
    dyn_axis = jnp.where(dyn_path[:, None] == 0, 0.5 * tangent, jnp.array([0.35, 0.0, 0.0]))
    dyn_omega = r.uniform((MAX_DYNAMIC,), 0.08, 0.2)
    dyn_phase = r.uniform((MAX_DYNAMIC,), 0.0, 2 * jnp.pi)
    assert r.i <= r.u.shape[0]
    return Scene(
        room_lo,
        room_hi,
        prop_type,
        prop_valid,
        prop_center,
        prop_size,
        prop_yaw,
        tex_colour1,
        tex_colour2,
        tex_kind,
        tex_freq,
        tex_angle,
        tex_seed,
        dyn_valid,
        dyn_kind,
        dyn_size,
        dyn_colour,
        dyn_path,
        dyn_center,
        dyn_axis,
        dyn_omega,
        dyn_phase,
    )


def make_scene(seed, n_dynamic: int = 0) -> Scene:
    """A deterministic room from an int seed (or a PRNG key) with ``n_dynamic`` (0-2) movers."""
    if not 0 <= n_dynamic <= MAX_DYNAMIC:
        raise ValueError(f"n_dynamic must be in [0, {MAX_DYNAMIC}], got {n_dynamic}")
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    return _make_scene(key, jnp.asarray(n_dynamic, jnp.int32))


def dynamic_positions(scene: Scene, time) -> jnp.ndarray:
    """Centres [D, 3] of the moving objects at ``time`` (frame index units)."""
    ph = scene.dyn_omega * time + scene.dyn_phase
    lin = scene.dyn_center + scene.dyn_axis * jnp.sin(ph)[:, None]
    rad = scene.dyn_axis[:, 0:1]
    circ = scene.dyn_center + jnp.stack(
        [rad[:, 0] * jnp.cos(ph), rad[:, 0] * jnp.sin(ph), jnp.zeros_like(ph)], -1
    )
    return jnp.where(scene.dyn_path[:, None] == 0, lin, circ)


# --------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------


def _safe(d):
    return jnp.where(jnp.abs(d) < 1e-12, jnp.where(d < 0, -1e-12, 1e-12), d)


def _slab(o, d, lo, hi):
    """Ray/box slabs. o, d [R, 1, 3] (broadcast), lo, hi [M, 3] -> (tnear [R,M], tfar, near_axis)."""
    inv = 1.0 / _safe(d)
    t1 = (lo - o) * inv
    t2 = (hi - o) * inv
    tmin = jnp.minimum(t1, t2)
    tmax = jnp.maximum(t1, t2)
    return tmin.max(-1), tmax.min(-1), jnp.argmax(tmin, -1)


def _rot_z(v, ang):
    """Rotate [..., 3] vectors by ``ang`` about z (ang broadcasts against v[..., 0])."""
    c, s = jnp.cos(ang), jnp.sin(ang)
    return jnp.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1], v[..., 2]], -1)


def _hash2(ix, iy, seed):
    u32 = jnp.uint32
    h = (
        ix.astype(u32) * u32(374761393)
        + iy.astype(u32) * u32(668265263)
        + seed.astype(u32) * u32(2246822519)
    )
    h = (h ^ (h >> 13)) * jnp.uint32(1274126177)
    h = h ^ (h >> 16)
    return (h & jnp.uint32(0xFFFFFF)).astype(jnp.float32) / float(0xFFFFFF)


def _value_noise(a, b, seed):
    ia, ib = jnp.floor(a), jnp.floor(b)
    fa, fb = a - ia, b - ib
    ia, ib = ia.astype(jnp.int32), ib.astype(jnp.int32)
    sa, sb = fa * fa * (3 - 2 * fa), fb * fb * (3 - 2 * fb)
    n00, n10 = _hash2(ia, ib, seed), _hash2(ia + 1, ib, seed)
    n01, n11 = _hash2(ia, ib + 1, seed), _hash2(ia + 1, ib + 1, seed)
    return (n00 * (1 - sa) + n10 * sa) * (1 - sb) + (n01 * (1 - sa) + n11 * sa) * sb


def _texture(scene: Scene, oid, a, b):
    """Procedural colour [R, 3] for static ids ``oid`` [R] at surface coords (a, b) in metres."""
    oid = jnp.clip(oid, 0, N_STATIC_IDS - 1)
    kind, freq, ang = scene.tex_kind[oid], scene.tex_freq[oid], scene.tex_angle[oid]
    ra = jnp.cos(ang) * a + jnp.sin(ang) * b
    rb = -jnp.sin(ang) * a + jnp.cos(ang) * b
    stripes = 0.5 + 0.5 * jnp.sin(2 * jnp.pi * freq * ra)
    checker = jnp.mod(jnp.floor(freq * ra) + jnp.floor(freq * rb), 2.0)
    seed = scene.tex_seed[oid]
    noise = 0.65 * _value_noise(2 * freq * ra, 2 * freq * rb, seed) + 0.35 * _value_noise(
        5 * freq * ra, 5 * freq * rb, seed + 7
    )
    m = jnp.select([kind == 0, kind == 1], [stripes, checker], noise)
    c1, c2 = scene.tex_colour1[oid], scene.tex_colour2[oid]
    return c1 + (c2 - c1) * m[:, None]


def _cast_rays(scene: Scene, o, d, time):
    """Nearest hits of rays o [3], d [R, 3] (d_cam z = 1, so t = z-depth).

    Returns (rgb [R, 3], t [R], obj_id [R] int32).
    """
    r = d.shape[0]
    o3 = o[None, None, :]
    d3 = d[:, None, :]
    # room (from inside): exit distance
    inv = 1.0 / _safe(d)
    t_lo = (scene.room_lo - o) * inv
    t_hi = (scene.room_hi - o) * inv
    t_exit_ax = jnp.maximum(t_lo, t_hi)  # [R, 3]
    ax = jnp.argmin(t_exit_ax, -1)
    t_room = jnp.min(t_exit_ax, -1)
    pos_side = jnp.take_along_axis(t_hi > t_lo, ax[:, None], -1)[:, 0]
    # ids: z- floor 1, z+ ceiling 2, x- 3, x+ 4, y- 5, y+ 6
    room_id = jnp.select(
        [ax == 2, ax == 0],
        [jnp.where(pos_side, 2, 1), jnp.where(pos_side, 4, 3)],
        jnp.where(pos_side, 6, 5),
    )

    # props: evaluate all three shapes per slot, keep the slot's type
    cen, size, yaw = scene.prop_center, scene.prop_size, scene.prop_yaw
    # boxes in their local (un-yawed) frame
    ol = _rot_z(o3 - cen[None], -yaw[None])  # [1, P, 3]
    dl = _rot_z(jnp.broadcast_to(d3, (r, MAX_PROPS, 3)), -yaw[None])  # [R, P, 3]
    inv_l = 1.0 / _safe(dl)
    b1 = (-size[None] - ol) * inv_l
    b2 = (size[None] - ol) * inv_l
    bmin, bmax = jnp.minimum(b1, b2), jnp.maximum(b1, b2)
    tn, tf = bmin.max(-1), bmax.min(-1)
    t_box = jnp.where((tf >= tn) & (tn > _EPS), tn, _BIG)
    # spheres
    oc = o3 - cen[None]
    qa = jnp.sum(d3 * d3, -1)
    qb = 2 * jnp.sum(d3 * oc, -1)
    qc = jnp.sum(oc * oc, -1) - size[None, :, 0] ** 2
    disc = qb * qb - 4 * qa * qc
    t_sph = (-qb - jnp.sqrt(jnp.maximum(disc, 0))) / (2 * qa)
    t_sph = jnp.where((disc >= 0) & (t_sph > _EPS), t_sph, _BIG)
    # vertical cylinders: side + caps
    ca = d3[..., 0] ** 2 + d3[..., 1] ** 2
    cb = 2 * (d3[..., 0] * oc[..., 0] + d3[..., 1] * oc[..., 1])
    cc = oc[..., 0] ** 2 + oc[..., 1] ** 2 - size[None, :, 0] ** 2
    cdisc = cb * cb - 4 * ca * cc
    t_side = (-cb - jnp.sqrt(jnp.maximum(cdisc, 0))) / (2 * jnp.maximum(ca, 1e-12))
    z_side = o[2] + t_side * d3[..., 2]
    ok_side = (
        (cdisc >= 0)
        & (t_side > _EPS)
        & (z_side >= cen[None, :, 2])
        & (z_side <= cen[None, :, 2] + size[None, :, 2])
    )
    t_side = jnp.where(ok_side, t_side, _BIG)
    dz = _safe(d3[..., 2])
    caps = []
    for zc in (cen[None, :, 2], cen[None, :, 2] + size[None, :, 2]):
        tc = (zc - o[2]) / dz
        px = oc[..., 0] + tc * d3[..., 0]
        py = oc[..., 1] + tc * d3[..., 1]
        caps.append(jnp.where((tc > _EPS) & (px * px + py * py <= size[None, :, 0] ** 2), tc, _BIG))
    t_cyl = jnp.minimum(t_side, jnp.minimum(*caps))
    pt = scene.prop_type[None]
    t_prop = jnp.select([pt == 0, pt == 1], [t_box, t_sph], t_cyl)
    t_prop = jnp.where(scene.prop_valid[None], t_prop, _BIG)  # [R, P]
    slot = jnp.argmin(t_prop, -1)
    t_prop_min = jnp.min(t_prop, -1)

    # moving objects
    dcen = dynamic_positions(scene, time)
    doc = o3 - dcen[None]
    dr = scene.dyn_size
    qc2 = jnp.sum(doc * doc, -1) - dr[None] ** 2
    qb2 = 2 * jnp.sum(d3 * doc, -1)
    disc2 = qb2 * qb2 - 4 * qa[:, :1] * qc2
    t_dsph = (-qb2 - jnp.sqrt(jnp.maximum(disc2, 0))) / (2 * qa[:, :1])
    t_dsph = jnp.where((disc2 >= 0) & (t_dsph > _EPS), t_dsph, _BIG)
    dtn, dtf, _ = _slab(o3, d3, dcen - dr[:, None], dcen + dr[:, None])
    t_dcube = jnp.where((dtf >= dtn) & (dtn > _EPS), dtn, _BIG)
    t_dyn = jnp.where(scene.dyn_kind[None] == 0, t_dsph, t_dcube)
    t_dyn = jnp.where(scene.dyn_valid[None], t_dyn, _BIG)
    dslot = jnp.argmin(t_dyn, -1)
    t_dyn_min = jnp.min(t_dyn, -1)

    # nearest overall (room is always hit from inside)
    cat = jnp.argmin(jnp.stack([t_room, t_prop_min, t_dyn_min], -1), -1)  # 0 room, 1 prop, 2 dyn
    t = jnp.select([cat == 0, cat == 1], [t_room, t_prop_min], t_dyn_min)
    p = o[None] + t[:, None] * d  # [R, 3]

    # surface coords and normals of the hit
    # room
    room_a = jnp.select([ax == 2, ax == 0], [p[:, 0], p[:, 1]], p[:, 0])
    room_b = jnp.select([ax == 2, ax == 0], [p[:, 1], p[:, 2]], p[:, 2])
    room_n = -jnp.where(pos_side[:, None], 1.0, -1.0) * jax.nn.one_hot(ax, 3)
    # props
    s_type = scene.prop_type[slot]
    s_cen, s_size, s_yaw = cen[slot], size[slot], yaw[slot]
    lp = _rot_z(p - s_cen, -s_yaw)  # local (box)
    rel = lp / jnp.maximum(s_size, 1e-6)
    bax = jnp.argmax(jnp.abs(rel), -1)
    box_n = _rot_z(
        jax.nn.one_hot(bax, 3) * jnp.sign(jnp.take_along_axis(rel, bax[:, None], -1)), s_yaw
    )
    box_a = jnp.select([bax == 0, bax == 1], [lp[:, 1], lp[:, 0]], lp[:, 0])
    box_b = jnp.select([bax == 0, bax == 1], [lp[:, 2], lp[:, 2]], lp[:, 1])
    q = p - s_cen
    rr = jnp.maximum(s_size[:, 0], 1e-6)
    sph_n = q / rr[:, None]
    sph_a = rr * jnp.arctan2(q[:, 1], q[:, 0])
    sph_b = rr * jnp.arcsin(jnp.clip(q[:, 2] / rr, -1, 1))
    on_cap = (jnp.abs(q[:, 2]) < 1e-4) | (jnp.abs(q[:, 2] - s_size[:, 2]) < 1e-4)
    on_cap = on_cap & (q[:, 0] ** 2 + q[:, 1] ** 2 < (rr - 1e-4) ** 2)
    cyl_n = jnp.where(
        on_cap[:, None],
        jnp.where(q[:, 2:3] > 0.5 * s_size[:, 2:3], 1.0, -1.0) * jnp.array([0.0, 0.0, 1.0]),
        jnp.stack([q[:, 0], q[:, 1], jnp.zeros_like(q[:, 0])], -1) / rr[:, None],
    )
    cyl_a = jnp.where(on_cap, q[:, 0], rr * jnp.arctan2(q[:, 1], q[:, 0]))
    cyl_b = jnp.where(on_cap, q[:, 1], q[:, 2])
    prop_a = jnp.select([s_type == 0, s_type == 1], [box_a, sph_a], cyl_a)
    prop_b = jnp.select([s_type == 0, s_type == 1], [box_b, sph_b], cyl_b)
    prop_n = jnp.select([s_type[:, None] == 0, s_type[:, None] == 1], [box_n, sph_n], cyl_n)

    static_id = jnp.where(cat == 0, room_id, PROP_ID0 + slot)
    sa = jnp.where(cat == 0, room_a, prop_a)
    sb = jnp.where(cat == 0, room_b, prop_b)
    sn = jnp.where((cat == 0)[:, None], room_n, prop_n)
    tex = _texture(scene, static_id, sa, sb)
    shade = 0.75 + 0.25 * jnp.abs(sn @ jnp.asarray(_LIGHT))
    static_rgb = jnp.clip(tex * shade[:, None], 0.05, 0.85)
    rgb = jnp.where((cat == 2)[:, None], scene.dyn_colour[dslot], static_rgb)
    oid = jnp.where(cat == 2, DYNAMIC_ID0 + dslot, static_id).astype(jnp.int32)
    return rgb, t, oid


@functools.partial(jax.jit, static_argnames=("height", "width"))
def raycast(scene: Scene, w2c, intr, height: int, width: int, time=0.0) -> Frame:
    """Render ground truth through pixel centres. w2c [4, 4], intr [4] -> `Frame` of [H, W] maps."""
    w2c = jnp.asarray(w2c, jnp.float32)
    intr = jnp.asarray(intr, jnp.float32)
    uv = geo.pixel_centers(height, width).reshape(-1, 2)
    d_cam = jnp.stack(
        [(uv[:, 0] - intr[2]) / intr[0], (uv[:, 1] - intr[3]) / intr[1], jnp.ones(uv.shape[0])], -1
    )
    rot = w2c[:3, :3]
    d_world = d_cam @ rot  # R^T d (a matmul over [R,3]x[3,3] is fine at these sizes)
    o = geo.camera_centers(w2c)
    rgb, t, oid = _cast_rays(scene, o, d_world, jnp.asarray(time, jnp.float32))
    return Frame(
        rgb.reshape(height, width, 3),
        t.reshape(height, width),
        oid.reshape(height, width),
        (oid >= DYNAMIC_ID0).reshape(height, width),
    )


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _raycast_batch(scene: Scene, w2c, intr, times, height: int, width: int) -> Frame:
    return jax.vmap(lambda w, k, tt: raycast(scene, w, k, height, width, tt))(w2c, intr, times)


def raycast_views(
    scene: Scene, w2c, intr, height: int, width: int, times=None, *, batch: int = 8
) -> Frame:
    """`raycast` over w2c [T, 4, 4] (intr [4] or [T, 4]; times [T], default = frame index).

    Frames are vmapped ``batch`` at a time (the last batch padded), so any T reuses one compiled
    function per image size; use a smaller ``batch`` for large images.
    """
    w2c = jnp.asarray(w2c, jnp.float32)
    t_n = w2c.shape[0]
    times = jnp.arange(t_n, dtype=jnp.float32) if times is None else jnp.asarray(times, jnp.float32)
    intr = jnp.broadcast_to(jnp.asarray(intr, jnp.float32), (t_n, 4))
    pad = -t_n % batch
    w2c_p = jnp.concatenate([w2c, jnp.broadcast_to(w2c[-1:], (pad, 4, 4))])
    intr_p = jnp.concatenate([intr, jnp.broadcast_to(intr[-1:], (pad, 4))])
    times_p = jnp.concatenate([times, jnp.broadcast_to(times[-1:], (pad,))])
    outs = [
        _raycast_batch(
            scene,
            w2c_p[i : i + batch],
            intr_p[i : i + batch],
            times_p[i : i + batch],
            height,
            width,
        )
        for i in range(0, t_n + pad, batch)
    ]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:t_n], *outs)


def colour_key_mask(rgb) -> jnp.ndarray:
    """Dynamic mask by colour key: pixels exactly equal to a reserved colour. rgb [..., 3] -> [...]."""
    rgb = jnp.asarray(rgb)
    hits = [jnp.all(jnp.abs(rgb - c) < 1e-6, -1) for c in RESERVED_COLOURS]
    return functools.reduce(jnp.logical_or, hits)
