"""Pinhole cameras, SE(3) and the camera-file format of the official Spatia code.

Conventions (used by every module of `spatia`):

* **Extrinsics** are OpenCV world-to-camera matrices ``w2c`` of shape ``[4, 4]`` (float32):
  camera x right, y down, z forward; ``x_cam = R @ x_world + t``.
* **Intrinsics** are pixel-space ``intr = [fx, fy, cx, cy]`` of shape ``[4]``. The official code's
  *normalised* intrinsics ``[fx/W, fy/H, cx/W, cy/H]`` convert with `normalize_intrinsics` /
  `denormalize_intrinsics`.
* **Pixels**: continuous image coordinates ``(u, v)``; pixel ``(row i, col j)`` covers
  ``u in [j, j+1), v in [i, i+1)`` and its centre is ``(j + 0.5, i + 0.5)``. The integer pixel of a
  projected point is ``(floor(v), floor(u))`` (as in `spatia.render`, docs/spatia.md D5).
* **se(3) vectors** are ``xi = [omega, v]`` (rotation first, 6 floats); `se3_exp` maps them to 4x4
  matrices, `se3_log` back. A left perturbation ``exp(xi) @ T`` moves a point ``p`` to
  ``p + omega x p + v`` to first order, which is what the ICP Jacobian in `spatia.slam` assumes.

All array functions are pure JAX (jit/vmap-able); the file readers and writers are host code.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CameraFileError",
    "skew",
    "so3_exp",
    "so3_log",
    "se3_exp",
    "se3_log",
    "se3_inverse",
    "make_pose",
    "transform_points",
    "world_to_camera",
    "project",
    "unproject",
    "pixel_centers",
    "depth_to_points",
    "camera_centers",
    "look_at",
    "intrinsics_from_fov",
    "normalize_intrinsics",
    "denormalize_intrinsics",
    "scale_intrinsics",
    "rotation_angle_deg",
    "read_w2c_file",
    "write_w2c_file",
    "read_intrinsics_file",
    "write_intrinsics_file",
]


class CameraFileError(ValueError):
    """A camera file (extrinsics or intrinsics) is malformed; the message names file and line."""


# --------------------------------------------------------------------------------------------
# SO(3) / SE(3)
# --------------------------------------------------------------------------------------------


@jax.jit
def skew(w: jnp.ndarray) -> jnp.ndarray:
    """Cross-product matrix. w: [..., 3] -> [..., 3, 3] with skew(w) @ x == cross(w, x)."""
    w = jnp.asarray(w)
    z = jnp.zeros_like(w[..., 0])
    wx, wy, wz = w[..., 0], w[..., 1], w[..., 2]
    return jnp.stack(
        [
            jnp.stack([z, -wz, wy], -1),
            jnp.stack([wz, z, -wx], -1),
            jnp.stack([-wy, wx, z], -1),
        ],
        -2,
    )


_SERIES = 0.25  # theta^2 below which Taylor series replace the closed forms (float32 cancellation)


def _exp_coeffs(theta2):
    """A = sin t / t, B = (1 - cos t) / t^2, C = (t - sin t) / t^3, D = (1 - A / (2 B)) / t^2.

    Series for t < 0.5 (truncation < 1e-12); the closed forms lose digits to cancellation there.
    """
    x = theta2
    small = x < _SERIES
    t2 = jnp.where(small, 1.0, x)
    t = jnp.sqrt(t2)
    a = jnp.where(small, 1 - x / 6 + x**2 / 120 - x**3 / 5040 + x**4 / 362880, jnp.sin(t) / t)
    half = jnp.sin(t / 2)
    b = jnp.where(
        small, 0.5 - x / 24 + x**2 / 720 - x**3 / 40320 + x**4 / 3628800, 2 * half * half / t2
    )
    c = jnp.where(
        small,
        1 / 6 - x / 120 + x**2 / 5040 - x**3 / 362880 + x**4 / 39916800,
        (t - jnp.sin(t)) / (t2 * t),
    )
    d = jnp.where(small, 1 / 12 + x / 720 + x**2 / 30240 + x**3 / 1209600, (1 - a / (2 * b)) / t2)
    return a, b, c, d


@jax.jit
def so3_exp(w: jnp.ndarray) -> jnp.ndarray:
    """Rodrigues' formula. w: [..., 3] axis-angle (radians) -> rotation [..., 3, 3]."""
    w = jnp.asarray(w, jnp.float32)
    k = skew(w)
    a, b, _, _ = _exp_coeffs(jnp.sum(w * w, -1))
    eye = jnp.eye(3, dtype=w.dtype)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def _rot_to_quat(r):
    """Shepperd's method, branch-free. r: [..., 3, 3] -> (w, x, y, z) [..., 4] with w >= 0."""
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    tr = m00 + m11 + m22
    cands = []
    # case 0: w largest
    s0 = jnp.sqrt(jnp.maximum(1.0 + tr, 1e-12)) * 2.0
    cands.append(
        jnp.stack(
            [
                0.25 * s0,
                (r[..., 2, 1] - r[..., 1, 2]) / s0,
                (r[..., 0, 2] - r[..., 2, 0]) / s0,
                (r[..., 1, 0] - r[..., 0, 1]) / s0,
            ],
            -1,
        )
    )
    s1 = jnp.sqrt(jnp.maximum(1.0 + m00 - m11 - m22, 1e-12)) * 2.0
    cands.append(
        jnp.stack(
            [
                (r[..., 2, 1] - r[..., 1, 2]) / s1,
                0.25 * s1,
                (r[..., 0, 1] + r[..., 1, 0]) / s1,
                (r[..., 0, 2] + r[..., 2, 0]) / s1,
            ],
            -1,
        )
    )
    s2 = jnp.sqrt(jnp.maximum(1.0 - m00 + m11 - m22, 1e-12)) * 2.0
    cands.append(
        jnp.stack(
            [
                (r[..., 0, 2] - r[..., 2, 0]) / s2,
                (r[..., 0, 1] + r[..., 1, 0]) / s2,
                0.25 * s2,
                (r[..., 1, 2] + r[..., 2, 1]) / s2,
            ],
            -1,
        )
    )
    s3 = jnp.sqrt(jnp.maximum(1.0 - m00 - m11 + m22, 1e-12)) * 2.0
    cands.append(
        jnp.stack(
            [
                (r[..., 1, 0] - r[..., 0, 1]) / s3,
                (r[..., 0, 2] + r[..., 2, 0]) / s3,
                (r[..., 1, 2] + r[..., 2, 1]) / s3,
                0.25 * s3,
            ],
            -1,
        )
    )
    which = jnp.argmax(jnp.stack([tr, m00, m11, m22], -1), -1)
    q = jnp.take_along_axis(jnp.stack(cands, -2), which[..., None, None], -2)[..., 0, :]
    q = jnp.where(q[..., :1] < 0, -q, q)
    return q / jnp.linalg.norm(q, axis=-1, keepdims=True)


@jax.jit
def so3_log(r: jnp.ndarray) -> jnp.ndarray:
    """Inverse of `so3_exp` for angles in [0, pi]. r: [..., 3, 3] -> axis-angle [..., 3].

    Goes through a unit quaternion, so it is accurate near 0 and near pi alike.
    """
    q = _rot_to_quat(jnp.asarray(r, jnp.float32))
    qw, qv = q[..., 0], q[..., 1:]
    n = jnp.linalg.norm(qv, axis=-1)
    angle = 2.0 * jnp.arctan2(n, qw)
    small = n < 1e-7
    scale = jnp.where(small, 2.0 / jnp.maximum(qw, 1e-12), angle / jnp.where(small, 1.0, n))
    return qv * scale[..., None]


@jax.jit
def make_pose(r: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Assemble [..., 4, 4] from rotation [..., 3, 3] and translation [..., 3]."""
    r = jnp.asarray(r, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    top = jnp.concatenate([r, t[..., :, None]], -1)
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32), top.shape[:-2] + (1, 4))
    return jnp.concatenate([top, bottom], -2)


@jax.jit
def se3_exp(xi: jnp.ndarray) -> jnp.ndarray:
    """se(3) -> SE(3). xi: [..., 6] = [omega, v] -> [..., 4, 4]."""
    xi = jnp.asarray(xi, jnp.float32)
    w, v = xi[..., :3], xi[..., 3:]
    k = skew(w)
    a, b, c, _ = _exp_coeffs(jnp.sum(w * w, -1))
    eye = jnp.eye(3, dtype=xi.dtype)
    rot = eye + a[..., None, None] * k + b[..., None, None] * (k @ k)
    vmat = eye + b[..., None, None] * k + c[..., None, None] * (k @ k)
    return make_pose(rot, jnp.einsum("...ij,...j->...i", vmat, v))


@jax.jit
def se3_log(tmat: jnp.ndarray) -> jnp.ndarray:
    """SE(3) -> se(3). tmat: [..., 4, 4] -> xi [..., 6] = [omega, v] (rotation angle < pi)."""
    tmat = jnp.asarray(tmat, jnp.float32)
    w = so3_log(tmat[..., :3, :3])
    _, _, _, d = _exp_coeffs(jnp.sum(w * w, -1))
    k = skew(w)
    eye = jnp.eye(3, dtype=tmat.dtype)
    vinv = eye - 0.5 * k + d[..., None, None] * (k @ k)
    v = jnp.einsum("...ij,...j->...i", vinv, tmat[..., :3, 3])
    return jnp.concatenate([w, v], -1)


@jax.jit
def se3_inverse(tmat: jnp.ndarray) -> jnp.ndarray:
    """Closed-form inverse of rigid transforms. [..., 4, 4] -> [..., 4, 4]."""
    tmat = jnp.asarray(tmat, jnp.float32)
    rt = jnp.swapaxes(tmat[..., :3, :3], -1, -2)
    return make_pose(rt, -jnp.einsum("...ij,...j->...i", rt, tmat[..., :3, 3]))


@jax.jit
def rotation_angle_deg(r: jnp.ndarray) -> jnp.ndarray:
    """Angle of a rotation (or of the rotation block of a pose) in degrees. [..., 3|4, 3|4] -> [...]."""
    r = jnp.asarray(r)[..., :3, :3]
    return jnp.degrees(jnp.linalg.norm(so3_log(r), axis=-1))


# --------------------------------------------------------------------------------------------
# Points and cameras
# --------------------------------------------------------------------------------------------


@jax.jit
def transform_points(tmat: jnp.ndarray, pts: jnp.ndarray) -> jnp.ndarray:
    """Apply a [4, 4] rigid transform to points [..., 3] (float32)."""
    tmat = jnp.asarray(tmat, jnp.float32)
    pts = jnp.asarray(pts, jnp.float32)
    # elementwise: a K=3 matmul is ~20x slower than this on XLA:CPU
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    return jnp.stack(
        [tmat[i, 0] * x + tmat[i, 1] * y + tmat[i, 2] * z + tmat[i, 3] for i in range(3)], -1
    )


@jax.jit
def world_to_camera(pts: jnp.ndarray, w2c: jnp.ndarray) -> jnp.ndarray:
    """World points [..., 3] -> camera-frame points [..., 3] for one w2c [4, 4]."""
    return transform_points(w2c, pts)


@jax.jit
def project(pts: jnp.ndarray, w2c: jnp.ndarray, intr: jnp.ndarray):
    """Project world points. pts [..., 3], w2c [4, 4], intr [4] -> (uv [..., 2], z [...]).

    ``uv`` is undefined (but finite) where ``z <= 0``; callers mask with ``z``.
    """
    xc = world_to_camera(pts, w2c)
    z = xc[..., 2]
    zs = jnp.where(jnp.abs(z) > 1e-12, z, 1e-12)
    intr = jnp.asarray(intr, jnp.float32)
    u = intr[0] * (xc[..., 0] / zs) + intr[2]
    v = intr[1] * (xc[..., 1] / zs) + intr[3]
    return jnp.stack([u, v], -1), z


@jax.jit
def unproject(uv: jnp.ndarray, z: jnp.ndarray, w2c: jnp.ndarray, intr: jnp.ndarray) -> jnp.ndarray:
    """Inverse of `project`: uv [..., 2] and depth z [...] -> world points [..., 3]."""
    intr = jnp.asarray(intr, jnp.float32)
    z = jnp.asarray(z, jnp.float32)
    x = (uv[..., 0] - intr[2]) / intr[0] * z
    y = (uv[..., 1] - intr[3]) / intr[1] * z
    xc = jnp.stack([x, y, z], -1)
    return transform_points(se3_inverse(w2c), xc)


@functools.partial(jax.jit, static_argnums=(0, 1))
def pixel_centers(height: int, width: int) -> jnp.ndarray:
    """Pixel-centre coordinates [H, W, 2] = (j + 0.5, i + 0.5)."""
    j, i = jnp.meshgrid(jnp.arange(width, dtype=jnp.float32), jnp.arange(height, dtype=jnp.float32))
    return jnp.stack([j + 0.5, i + 0.5], -1)


@jax.jit
def depth_to_points(depth: jnp.ndarray, w2c: jnp.ndarray, intr: jnp.ndarray) -> jnp.ndarray:
    """Back-project a metric z-depth map [H, W] through pixel centres -> world points [H, W, 3]."""
    h, w = depth.shape
    return unproject(pixel_centers(h, w), depth, w2c, intr)


@jax.jit
def camera_centers(w2c: jnp.ndarray) -> jnp.ndarray:
    """Camera centres in world coordinates. w2c [..., 4, 4] -> [..., 3]."""
    w2c = jnp.asarray(w2c, jnp.float32)
    return -jnp.einsum("...ji,...j->...i", w2c[..., :3, :3], w2c[..., :3, 3])


@jax.jit
def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> jnp.ndarray:
    """OpenCV w2c [4, 4] of a camera at ``eye`` looking at ``target`` (world up = ``up``)."""
    eye = jnp.asarray(eye, jnp.float32)
    fwd = jnp.asarray(target, jnp.float32) - eye
    fwd = fwd / jnp.linalg.norm(fwd)
    right = jnp.cross(fwd, jnp.asarray(up, jnp.float32))
    right = right / jnp.linalg.norm(right)
    down = jnp.cross(fwd, right)
    rot = jnp.stack([right, down, fwd], 0)
    return make_pose(rot, -rot @ eye)


def intrinsics_from_fov(height: int, width: int, fov_x_deg: float = 70.0) -> jnp.ndarray:
    """Square-pixel intrinsics [4] with the principal point at the image centre."""
    fx = (width / 2.0) / np.tan(np.radians(fov_x_deg) / 2.0)
    return jnp.array([fx, fx, width / 2.0, height / 2.0], jnp.float32)


def normalize_intrinsics(intr, height: int, width: int):
    """Pixel [fx, fy, cx, cy] -> the official code's normalised [fx/W, fy/H, cx/W, cy/H]."""
    intr = np.asarray(intr, np.float64) if isinstance(intr, (list, tuple, np.ndarray)) else intr
    return intr / np.array([width, height, width, height], np.float64)


def denormalize_intrinsics(nintr, height: int, width: int):
    """Normalised [fx/W, fy/H, cx/W, cy/H] -> pixel [fx, fy, cx, cy] for an H x W image."""
    nintr = np.asarray(nintr, np.float64) if isinstance(nintr, (list, tuple, np.ndarray)) else nintr
    return nintr * np.array([width, height, width, height], np.float64)


def scale_intrinsics(intr: jnp.ndarray, factor: float) -> jnp.ndarray:
    """Intrinsics for an image resized by ``factor`` (pixel-edge convention: every entry scales)."""
    return jnp.asarray(intr, jnp.float32) * factor


# --------------------------------------------------------------------------------------------
# Camera files (format of the official code: test_cases/*/w2c.txt and intrinsics.txt)
# --------------------------------------------------------------------------------------------


def _parse_numbers(text: str, where: str) -> list[float]:
    """Numbers of one line in any of: nested Python list, commas, whitespace."""
    s = text.strip()
    if s.startswith("["):
        try:
            obj = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            obj = None
        if obj is not None:
            flat = np.asarray(obj, dtype=object).ravel().tolist()
            try:
                return [float(x) for x in flat]
            except (TypeError, ValueError) as e:
                raise CameraFileError(f"{where}: non-numeric entry ({e})") from None
        s = s.replace("[", " ").replace("]", " ")
    tokens = s.replace(",", " ").split()
    out = []
    for tok in tokens:
        try:
            out.append(float(tok))
        except ValueError:
            raise CameraFileError(f"{where}: cannot parse {tok!r} as a number") from None
    return out


def read_w2c_file(path: str | os.PathLike, *, rot_tol: float = 1e-3) -> np.ndarray:
    """Read world-to-camera matrices, one per line, as written by the official code.

    Each non-empty line (``#`` starts a comment) holds a 3x4 or 4x4 matrix as a nested list
    (``[[r00, r01, r02, t0], ...]``) or as 12 / 16 whitespace- or comma-separated numbers.
    Returns float64 ``[T, 4, 4]``. Raises `CameraFileError` naming the file and line when a line
    has another count of numbers, a non-number, a non-finite value, a 4x4 bottom row other than
    ``0 0 0 1``, or a rotation block that is not orthonormal with determinant +1 (within ``rot_tol``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CameraFileError(f"camera file {path!r} does not exist")
    mats = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            nums = _parse_numbers(line, where)
            if len(nums) not in (12, 16):
                raise CameraFileError(
                    f"{where}: expected a 3x4 or 4x4 world-to-camera matrix (12 or 16 numbers), "
                    f"got {len(nums)} numbers"
                )
            m = np.eye(4)
            m[: len(nums) // 4] = np.asarray(nums, np.float64).reshape(-1, 4)
            if not np.all(np.isfinite(m)):
                raise CameraFileError(f"{where}: matrix contains NaN or Inf")
            if len(nums) == 16 and not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
                raise CameraFileError(
                    f"{where}: bottom row of a 4x4 matrix must be [0, 0, 0, 1], got {m[3].tolist()}"
                )
            rot = m[:3, :3]
            err = np.abs(rot @ rot.T - np.eye(3)).max()
            if err > rot_tol or np.linalg.det(rot) < 0:
                raise CameraFileError(
                    f"{where}: rotation block is not a proper rotation "
                    f"(max |R R^T - I| = {err:.2e}, det = {np.linalg.det(rot):.3f})"
                )
            mats.append(m)
    if not mats:
        raise CameraFileError(f"camera file {path!r} contains no matrices")
    return np.stack(mats)


def write_w2c_file(path: str | os.PathLike, w2c, *, rows: int = 4) -> None:
    """Write ``[T, 4, 4]`` (or ``[T, 3, 4]``) matrices one per line as nested lists (official format).

    ``rows`` = 4 writes 4x4 matrices, 3 writes the 3x4 top block.
    """
    w2c = np.asarray(w2c, np.float64)
    if w2c.ndim != 3 or w2c.shape[1:] not in ((4, 4), (3, 4)):
        raise ValueError(f"w2c must be [T, 4, 4] or [T, 3, 4], got shape {w2c.shape}")
    if rows not in (3, 4):
        raise ValueError(f"rows must be 3 or 4, got {rows}")
    full = np.tile(np.eye(4), (w2c.shape[0], 1, 1))
    full[:, : w2c.shape[1]] = w2c
    with open(path, "w", encoding="utf-8") as f:
        for m in full:
            f.write(f"{m[:rows].tolist()}\n")


def read_intrinsics_file(path: str | os.PathLike) -> np.ndarray:
    """Read normalised intrinsics ``[fx/W fy/H cx/W cy/H]`` (official format) -> float64 ``[4]``.

    Raises `CameraFileError` unless the file holds exactly 4 finite positive numbers.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CameraFileError(f"intrinsics file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [ln.split("#", 1)[0].strip() for ln in f]
    nums: list[float] = []
    for lineno, line in enumerate(lines, 1):
        if line:
            nums += _parse_numbers(line, f"{path}:{lineno}")
    if len(nums) != 4:
        raise CameraFileError(
            f"{path}: expected 4 normalised intrinsics [fx/W fy/H cx/W cy/H], got {len(nums)} numbers"
        )
    arr = np.asarray(nums, np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr[:2] <= 0):
        raise CameraFileError(
            f"{path}: intrinsics must be finite with fx, fy > 0, got {arr.tolist()}"
        )
    return arr


def write_intrinsics_file(path: str | os.PathLike, nintr: Sequence[float]) -> None:
    """Write normalised intrinsics as ``[fx/W fy/H cx/W cy/H]`` (official format)."""
    arr = np.asarray(nintr, np.float64).ravel()
    if arr.shape != (4,):
        raise ValueError(f"intrinsics must have 4 entries, got {arr.shape}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("[" + " ".join(repr(float(x)) for x in arr) + "]")
