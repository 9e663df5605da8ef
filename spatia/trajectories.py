"""Camera trajectories through the synthetic rooms of `spatia.scenes` (docs/spatia.md D12).

All poses are OpenCV world-to-camera matrices [T, 4, 4], world z up:

* `exploration_trajectory`: a Catmull-Rom spline through waypoints of the room's free centre
  region, looking at props.
* `loop_trajectory`: out-and-back; the return half is the outbound half mirrored, so the last
  pose *is* the first pose, bit for bit.
* `split_clips`: 2/4/6 clips with overlap frames; `step_sizes`: per-step rotation/translation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spatia import geometry as geo
from spatia.scenes import FREE_RADIUS, Scene

__all__ = [
    "pose_from_yaw_pitch",
    "exploration_trajectory",
    "loop_trajectory",
    "split_clips",
    "step_sizes",
]


def pose_from_yaw_pitch(pos, yaw, pitch) -> jnp.ndarray:
    """OpenCV w2c [..., 4, 4] of cameras at pos [..., 3] with yaw (about world z, 0 = +x) and pitch."""
    pos = jnp.asarray(pos, jnp.float32)
    yaw = jnp.asarray(yaw, jnp.float32)
    pitch = jnp.asarray(pitch, jnp.float32)
    cy, sy, cp, sp = jnp.cos(yaw), jnp.sin(yaw), jnp.cos(pitch), jnp.sin(pitch)
    fwd = jnp.stack([cp * cy, cp * sy, sp], -1)
    right = jnp.stack([sy, -cy, jnp.zeros_like(yaw)], -1)
    down = jnp.cross(fwd, right)
    rot = jnp.stack([right, down, fwd], -2)
    return geo.make_pose(rot, -jnp.einsum("...ij,...j->...i", rot, pos))


def _catmull_rom(pts, n):
    """Uniform Catmull-Rom spline through pts [K, D] sampled at n points (end points included)."""
    pts = np.asarray(pts, np.float64)
    ext = np.concatenate([2 * pts[:1] - pts[1:2], pts, 2 * pts[-1:] - pts[-2:-1]])
    k = len(pts)
    s = np.linspace(0, k - 1, n)
    seg = np.minimum(np.floor(s).astype(int), k - 2)
    u = (s - seg)[:, None]
    p0, p1, p2, p3 = ext[seg], ext[seg + 1], ext[seg + 2], ext[seg + 3]
    return 0.5 * (
        (2 * p1)
        + (-p0 + p2) * u
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2
        + (-p0 + 3 * p1 - 3 * p2 + p3) * u**3
    )


def _prop_targets(scene: Scene | None):
    if scene is None:
        return None
    valid = np.asarray(scene.prop_valid)
    return np.asarray(scene.prop_center)[valid]


def _aim(targets, pos, rng):
    """Yaw from pos [3] towards a random target (or a random yaw without targets)."""
    if targets is None or len(targets) == 0:
        return rng.uniform(0, 2 * np.pi)
    t = targets[rng.integers(len(targets))]
    return float(np.arctan2(t[1] - pos[1], t[0] - pos[0]))


def exploration_trajectory(
    seed: int,
    n_frames: int,
    *,
    scene: Scene | None = None,
    n_waypoints: int = 4,
    height=(1.2, 1.7),
    max_yaw_step_deg: float = 8.0,
    max_step_m: float = 0.12,
) -> np.ndarray:
    """Smooth exploration path in the free centre region -> w2c float32 [n_frames, 4, 4].

    Waypoints (3-5) are drawn inside `FREE_RADIUS`; position, yaw and pitch are Catmull-Rom
    splines. With a ``scene`` each waypoint looks at a random prop, otherwise the yaw wanders by up
    to +-90 deg between waypoints; pitch is in [-15, 0] deg. If the path is too fast for
    ``n_frames`` (``max_step_m`` / ``max_yaw_step_deg`` per frame), only its first part is used.
    """
    rng = np.random.default_rng(seed)
    ang = rng.uniform(0, 2 * np.pi, n_waypoints)
    rad = FREE_RADIUS * np.sqrt(rng.uniform(0.05, 0.9, n_waypoints))
    z = rng.uniform(*height, n_waypoints)
    way = np.stack([rad * np.cos(ang), rad * np.sin(ang), z], -1)
    targets = _prop_targets(scene)
    if targets is None:
        yaws = rng.uniform(0, 2 * np.pi) + np.cumsum(
            np.r_[0, rng.uniform(-np.pi / 2, np.pi / 2, n_waypoints - 1)]
        )
    else:
        yaws = np.array([_aim(targets, w, rng) for w in way])
        yaws = yaws[0] + np.cumsum(
            np.r_[0, (np.diff(yaws) + np.pi) % (2 * np.pi) - np.pi]
        )  # unwrap
    pitches = np.radians(rng.uniform(-15, 0, n_waypoints))
    ctrl = np.concatenate([way, yaws[:, None], pitches[:, None]], -1)
    path = _catmull_rom(ctrl, n_frames)
    step = np.linalg.norm(np.diff(path[:, :3], axis=0), axis=-1).max(initial=0)
    ystep = np.degrees(np.abs(np.diff(path[:, 3])).max(initial=0))
    factor = max(step / max_step_m, ystep / max_yaw_step_deg, 1.0)
    if factor > 1.0:  # too fast for n_frames: travel a proportionally shorter part of the path
        path = _catmull_rom(ctrl, int(np.ceil(n_frames * factor)))[:n_frames]
    # keep the camera inside the free disk (Catmull-Rom may overshoot a little)
    r_xy = np.linalg.norm(path[:, :2], axis=-1, keepdims=True)
    path[:, :2] *= np.minimum(1.0, FREE_RADIUS / np.maximum(r_xy, 1e-9))
    return np.asarray(pose_from_yaw_pitch(path[:, :3], path[:, 3], path[:, 4]), np.float32)


def loop_trajectory(
    seed: int,
    n_out: int,
    *,
    scene: Scene | None = None,
    kind: str = "yaw",
    yaw_deg: float = 40.0,
    dist_m: float = 0.6,
    pitch_deg: float = -10.0,
) -> np.ndarray:
    """Out-and-back loop of ``2 * n_out + 1`` poses -> w2c float32 [2 n_out + 1, 4, 4].

    kind: "yaw" (pan by ``yaw_deg`` and back, like the official case_2), "dolly" (translate by
    ``dist_m`` along a random horizontal direction and back), "orbit" (both at once). The return
    half is the outbound half reversed, so ``w2c[-1] == w2c[0]`` exactly and
    ``w2c[n_out + k] == w2c[n_out - k]``. With a ``scene`` the sweep is centred on a random prop.
    """
    if kind not in ("yaw", "dolly", "orbit"):
        raise ValueError(f"kind must be 'yaw', 'dolly' or 'orbit', got {kind!r}")
    if n_out < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    rng = np.random.default_rng(seed)
    start = np.r_[rng.uniform(-0.3, 0.3, 2), rng.uniform(1.3, 1.6)]
    sgn = rng.choice([-1.0, 1.0])
    yaw0 = _aim(_prop_targets(scene), start, rng)
    if kind in ("yaw", "orbit") and scene is not None:
        yaw0 -= sgn * np.radians(yaw_deg) / 2
    s = np.linspace(0, 1, n_out + 1)
    ease = 0.5 - 0.5 * np.cos(np.pi * s)  # smooth start/stop
    yaw = yaw0 + (np.radians(yaw_deg) * sgn * ease if kind in ("yaw", "orbit") else 0 * ease)
    mdir = rng.uniform(0, 2 * np.pi)
    step_dir = np.array([np.cos(mdir), np.sin(mdir), 0.0])
    dist = dist_m * ease if kind in ("dolly", "orbit") else 0 * ease
    # the free disk bounds the translation
    pos = start[None] + dist[:, None] * step_dir[None]
    r_xy = np.linalg.norm(pos[:, :2], axis=-1, keepdims=True)
    pos[:, :2] *= np.minimum(1.0, FREE_RADIUS / np.maximum(r_xy, 1e-9))
    out = np.asarray(
        pose_from_yaw_pitch(pos, yaw, np.full_like(yaw, np.radians(pitch_deg))), np.float32
    )
    return np.concatenate([out, out[-2::-1]], 0)


def split_clips(n_frames: int, n_clips: int, overlap: int = 1) -> list[np.ndarray]:
    """Split frame indices 0..n_frames-1 into ``n_clips`` consecutive clips.

    Clip r generates the frames ``[b_r, b_{r+1})`` with ``b_r = r (n_frames - 1) // n_clips + 1``
    for r > 0 (b_0 = 0, b_n = n_frames) and is prefixed by the last ``overlap`` frames of the
    previous clip (the "preceding" frames of the paper). For a loop of 2L + 1 frames and 2 clips,
    clip 0 is the outbound half 0..L and clip 1 the return half. Returns index arrays.
    """
    if n_clips < 1 or n_clips > n_frames:
        raise ValueError(f"n_clips must be in [1, {n_frames}], got {n_clips}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    b = [0] + [r * (n_frames - 1) // n_clips + 1 for r in range(1, n_clips)] + [n_frames]
    return [np.arange(max(0, b[r] - (overlap if r else 0)), b[r + 1]) for r in range(n_clips)]


def step_sizes(w2c) -> tuple[np.ndarray, np.ndarray]:
    """Per-step rotation (degrees) and camera-centre translation (metres) of a trajectory [T, 4, 4]."""
    w2c = np.asarray(w2c, np.float64)
    rel = np.einsum("tij,tkj->tik", w2c[1:, :3, :3], w2c[:-1, :3, :3])
    cosang = np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)
    centres = np.asarray(geo.camera_centers(jnp.asarray(w2c, jnp.float32)), np.float64)
    return np.degrees(np.arccos(cosang)), np.linalg.norm(np.diff(centres, axis=0), axis=-1)
