"""Evaluation metrics of Spatia's synthetic protocol (Spatia Tables 3-7,
docs/spatia.md D16), pure JAX.

Image metrics take float images ``[..., H, W, C]`` (any leading batch axes) with a known
``data_range`` (1.0 for images in [0, 1]):

* `psnr`: ``10 log10(data_range^2 / MSE)`` over H, W, C; ``+inf`` for identical images.
* `ssim`: Gaussian-window SSIM of Wang et al. (2004) with scikit-image's defaults for
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5, data_range=...)``:
  separable Gaussian of sigma 1.5 truncated at 3.5 sigma (an 11-tap window), symmetric
  ("reflect" in scipy) borders, K1 = 0.01, K2 = 0.03, sample (co)variances scaled by
  ``NP / (NP - 1)`` with ``NP = 11^2`` (``sample_covariance=False`` gives Wang et al.'s
  population moments), the SSIM map cropped by 5 px at every border, averaged per channel
  and then over channels.
* `closed_loop_metrics`: PSNR_C / SSIM_C between the first and the last frame of a video whose
  camera returns to its start (Table 3).
* `revisited_frames` / `revisit_metrics`: PSNR / SSIM of every frame whose camera pose was
  already visited by an earlier clip, against the ground-truth render at that pose
  (docs/spatia.md D16).
* `match_accuracy`: the geometric stand-in for RoMa match accuracy (see its docstring).
* `camera_control_error` / `camera_score`: pose of generated frames estimated by point-to-plane
  ICP (`spatia.slam`) against a model of the scene, compared with the commanded pose, and a
  WorldScore-style 0-100 score (see `camera_score`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import slam

__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "mse",
    "psnr",
    "gaussian_window",
    "ssim",
    "closed_loop_metrics",
    "revisited_frames",
    "revisit_metrics",
    "covisible_pixels",
    "match_accuracy",
    "CameraError",
    "ROTATION_ERROR_MAX_DEG",
    "TRANSLATION_ERROR_MAX",
    "camera_score",
    "CAMERA_ICP",
    "camera_control_error",
    "scene_model",
]

SSIM_K1 = 0.01
SSIM_K2 = 0.03
# WorldScore's empirical maxima of the camera-control errors (its evaluation code, behind
# Spatia Table 1): 15 degrees, 0.5 units.
ROTATION_ERROR_MAX_DEG = 15.0
TRANSLATION_ERROR_MAX = 0.5
# Levenberg damping 1.0 instead of the memory update's 1e-6: views dominated by one or two planes
# make the point-to-plane normal equations near-singular, and float32 round-off in the residuals
# then slides an exact, already aligned frame along the unobservable directions (measured: up to
# metres on the test rooms). With ~10^2-10^3 pairs the observable eigenvalues are >> 1, so the
# damping only pins the directions that the geometry cannot measure to the commanded pose.
CAMERA_ICP = slam.ICPConfig(damping=1.0)


def _check_pair(a, b, name: str):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"{name}: images must be [..., H, W, C], got shape {a.shape}")
    return a, b


# --------------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------------


@jax.jit
def mse(a, b) -> jnp.ndarray:
    """Mean squared error over the last three axes. a, b [..., H, W, C] -> [...] float32."""
    a, b = _check_pair(a, b, "mse")
    return jnp.mean((a - b) ** 2, axis=(-3, -2, -1))


@functools.partial(jax.jit, static_argnames=("data_range",))
def psnr(a, b, *, data_range: float = 1.0) -> jnp.ndarray:
    """PSNR in dB. a, b [..., H, W, C] -> [...] float32; ``+inf`` where the images are equal."""
    err = mse(a, b)
    safe = jnp.where(err > 0, err, 1.0)
    return jnp.where(err > 0, 10.0 * jnp.log10(data_range**2 / safe), jnp.inf)


# --------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """1-D Gaussian taps of scipy's ``gaussian_filter``: radius ``int(truncate sigma + 0.5)``,
    normalised to sum 1. Returns float64 [2 radius + 1] (11 taps for sigma 1.5)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_axis(x, taps, axis):
    """Correlate x with the 1-D ``taps`` along ``axis`` with symmetric (scipy "reflect") borders."""
    r = (len(taps) - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    # a sum of shifted slices: the window is tiny and fixed, and this keeps it exact per tap
    out = jnp.zeros_like(x)
    for i, w in enumerate(taps):
        out = out + float(w) * jax.lax.slice_in_dim(xp, i, i + n, axis=axis)
    return out


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "sample_covariance", "reduce"))
def ssim(
    a,
    b,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    sample_covariance: bool = True,
    reduce: bool = True,
) -> jnp.ndarray:
    """Gaussian-window SSIM (scikit-image's ``gaussian_weights=True`` defaults; module docstring).

    a, b float [..., H, W, C] with H, W >= the window (11 for sigma 1.5).
    Returns [...] float32 (``reduce``) or the uncropped SSIM map [..., H, W, C].
    """
    a, b = _check_pair(a, b, "ssim")
    taps = gaussian_window(sigma)
    win = len(taps)
    h, w = a.shape[-3], a.shape[-2]
    if h < win or w < win:
        raise ValueError(f"ssim: images of {h}x{w} px are smaller than the {win}x{win} window")

    def blur(x):
        return _filter_axis(_filter_axis(x, taps, x.ndim - 3), taps, x.ndim - 2)

    n_p = win * win
    cov_norm = n_p / (n_p - 1.0) if sample_covariance else 1.0
    ux, uy = blur(a), blur(b)
    vx = cov_norm * (blur(a * a) - ux * ux)
    vy = cov_norm * (blur(b * b) - uy * uy)
    vxy = cov_norm * (blur(a * b) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    if not reduce:
        return smap
    p = (win - 1) // 2
    return jnp.mean(smap[..., p : h - p, p : w - p, :], axis=(-3, -2, -1))


# --------------------------------------------------------------------------------------------
# Closed loops and revisits
# --------------------------------------------------------------------------------------------


def closed_loop_metrics(video, *, data_range: float = 1.0) -> dict[str, float]:
    """PSNR_C and SSIM_C between the first and the last frame of a closed-loop video.

    video [T, H, W, C] float (T >= 2) -> {"psnr_c": dB, "ssim_c": in [-1, 1]} as host floats.
    """
    video = jnp.asarray(video, jnp.float32)
    if video.ndim != 4 or video.shape[0] < 2:
        raise ValueError(f"closed_loop_metrics: video must be [T >= 2, H, W, C], got {video.shape}")
    first, last = video[0], video[-1]
    return {
        "psnr_c": float(psnr(first, last, data_range=data_range)),
        "ssim_c": float(ssim(first, last, data_range=data_range)),
    }


def revisited_frames(
    w2c, clip_index, *, rot_tol_deg: float = 0.5, trans_tol: float = 0.01
) -> np.ndarray:
    """Frames whose camera pose was already visited by an earlier clip.

    w2c [T, 4, 4]; clip_index int [T] (the clip that produced each frame; the start frame may
    carry -1). Frame t is *revisited* iff some frame s with ``clip_index[s] < clip_index[t]`` has
    a pose within ``rot_tol_deg`` degrees and ``trans_tol`` metres (camera centres) of frame t's.
    For an exact out-and-back loop split into two clips this marks the whole return half.
    Returns bool [T] (host).
    """
    w2c = jnp.asarray(w2c, jnp.float32)
    clip_index = np.asarray(clip_index)
    if w2c.ndim != 3 or w2c.shape[1:] != (4, 4) or clip_index.shape != w2c.shape[:1]:
        raise ValueError(
            f"revisited_frames: need w2c [T, 4, 4] and clip_index [T], got {w2c.shape} "
            f"and {clip_index.shape}"
        )
    ang, dist = slam.pose_error(w2c[:, None], w2c[None, :])
    close = (np.asarray(ang) <= rot_tol_deg) & (np.asarray(dist) <= trans_tol)
    earlier = clip_index[None, :] < clip_index[:, None]
    return np.any(close & earlier, axis=1)


def revisit_metrics(video, ground_truth, revisited, *, data_range: float = 1.0) -> dict:
    """PSNR / SSIM of every frame against the ground-truth render at its pose.

    video, ground_truth [T, H, W, C]; revisited bool [T] (e.g. from `revisited_frames`).
    Returns {"psnr": [T] dB, "ssim": [T], "psnr_revisit" / "ssim_revisit": means over revisited
    frames (NaN if none), "n_revisit": int}. Infinite PSNRs (exact frames) enter the mean as
    infinity.
    """
    video, ground_truth = _check_pair(video, ground_truth, "revisit_metrics")
    revisited = np.asarray(revisited, bool)
    if revisited.shape != video.shape[:1]:
        raise ValueError(
            f"revisit_metrics: revisited must be [T={video.shape[0]}], got {revisited.shape}"
        )
    p = np.asarray(psnr(video, ground_truth, data_range=data_range), np.float64)
    s = np.asarray(ssim(video, ground_truth, data_range=data_range), np.float64)
    n = int(revisited.sum())
    return {
        "psnr": p,
        "ssim": s,
        "n_revisit": n,
        "psnr_revisit": float(p[revisited].mean()) if n else float("nan"),
        "ssim_revisit": float(s[revisited].mean()) if n else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# Match accuracy with known geometry
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("occlusion_tol",))
def covisible_pixels(depth_i, valid_i, w2c_i, depth_j, w2c_j, intr, occlusion_tol: float = 0.05):
    """Pixels of frame i that frame j sees, by true geometry (the first half of `match_accuracy`).

    depth_i [H, W] metric z, valid_i [H, W] bool, w2c_i [4, 4]; depth_j [H, W], w2c_j [4, 4];
    intr [4]. Returns (covisible [H, W] bool, row [H, W] int32, col [H, W] int32): the integer
    pixel of j that each pixel of i lands in (clipped into the image where not covisible).
    """
    h, w = depth_i.shape
    pts = geo.depth_to_points(jnp.where(valid_i, depth_i, 1.0), w2c_i, intr)
    uv, z = geo.project(pts, w2c_j, intr)
    col = jnp.floor(uv[..., 0]).astype(jnp.int32)
    row = jnp.floor(uv[..., 1]).astype(jnp.int32)
    inside = (z > 1e-4) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    rc, cc = jnp.clip(row, 0, h - 1), jnp.clip(col, 0, w - 1)
    dj = depth_j[rc, cc]
    unoccluded = (dj > 0) & (jnp.abs(dj - z) <= occlusion_tol * z)
    return valid_i & inside & unoccluded, rc, cc


@functools.partial(jax.jit, static_argnames=("colour_tol", "occlusion_tol"))
def _match_core(
    img_i, img_j, depth_i, depth_j, valid_i, w2c_i, w2c_j, intr, colour_tol, occlusion_tol
):
    covisible, rc, cc = covisible_pixels(
        depth_i, valid_i, w2c_i, depth_j, w2c_j, intr, occlusion_tol
    )
    diff = jnp.max(jnp.abs(img_i - img_j[rc, cc]), axis=-1)
    matched = covisible & (diff <= colour_tol)
    n_cov = jnp.sum(covisible)
    return jnp.sum(matched) / jnp.maximum(n_cov, 1), n_cov, matched


def match_accuracy(
    img_i,
    img_j,
    depth_i,
    depth_j,
    w2c_i,
    w2c_j,
    intr,
    *,
    valid_i=None,
    colour_tol: float = 0.1,
    occlusion_tol: float = 0.05,
):
    """Geometric match accuracy between two frames (stand-in for RoMa match accuracy,
    Spatia supp. §6; docs/spatia.md D16).

    Definition. Every pixel p of frame i with ground-truth depth ``depth_i[p] > 0`` (and
    ``valid_i[p]``, e.g. not dynamic) is back-projected through its centre with the *true* pose
    ``w2c_i`` and projected into frame j with the true pose ``w2c_j``; it lands in the integer
    pixel ``q = (floor(v), floor(u))``. p is *co-visible* if q is inside the image, the point is in
    front of camera j, and the true depth of j at q agrees with the point's depth in camera j to
    ``occlusion_tol`` (relative; rejects occluded points). p is *matched* if additionally the
    images agree in colour: ``max_c |img_i[p, c] - img_j[q, c]| <= colour_tol``.
    Accuracy = matched / co-visible (0 if nothing is co-visible).

    The images are the generated frames; depths and poses are the ground truth at the commanded
    cameras. RoMa's count is normalised by the matches of a frame with itself; here the
    co-visible count plays that role (for identical poses, ground truth against itself scores
    exactly 1).

    img_i, img_j [H, W, C]; depth_i, depth_j [H, W] metric z; w2c_i, w2c_j [4, 4]; intr [4];
    valid_i [H, W] bool or None. Returns (accuracy float, n_covisible int, matched [H, W] bool).
    """
    img_i, img_j = _check_pair(img_i, img_j, "match_accuracy")
    depth_i = jnp.asarray(depth_i, jnp.float32)
    depth_j = jnp.asarray(depth_j, jnp.float32)
    if depth_i.shape != img_i.shape[:2] or depth_j.shape != img_j.shape[:2]:
        raise ValueError(
            f"match_accuracy: depths must be [H, W] = {img_i.shape[:2]}, got "
            f"{depth_i.shape} and {depth_j.shape}"
        )
    ok = (depth_i > 0) & jnp.isfinite(depth_i)
    if valid_i is not None:
        ok = ok & jnp.asarray(valid_i, bool)
    acc, n_cov, matched = _match_core(
        img_i,
        img_j,
        depth_i,
        depth_j,
        ok,
        jnp.asarray(w2c_i, jnp.float32),
        jnp.asarray(w2c_j, jnp.float32),
        jnp.asarray(intr, jnp.float32),
        float(colour_tol),
        float(occlusion_tol),
    )
    return float(acc), int(n_cov), matched


# --------------------------------------------------------------------------------------------
# Camera control
# --------------------------------------------------------------------------------------------


class CameraError(NamedTuple):
    """Camera-control evaluation of T generated frames.

    rotation_deg [T]: angle of R_est R_cmd^T; translation [T]: distance of camera centres
    (after the optional scale alignment); estimated_w2c [T, 4, 4] (ICP result); n_pairs [T] ICP
    inliers; score: `camera_score` of the mean errors (0-100)."""

    rotation_deg: np.ndarray
    translation: np.ndarray
    estimated_w2c: np.ndarray
    n_pairs: np.ndarray
    score: float


def camera_score(
    rotation_deg,
    translation,
    *,
    rot_max: float = ROTATION_ERROR_MAX_DEG,
    trans_max: float = TRANSLATION_ERROR_MAX,
) -> float:
    """WorldScore-style camera-control score in [0, 100] (higher = better).

    Mapping: each mean error is normalised by WorldScore's empirical maximum (15 degrees, 0.5
    scene units; WorldScore's code) and clipped,
    ``s_x = 100 (1 - min(mean(err_x) / max_x, 1))``; the score is the mean of the rotation and
    translation scores. Zero errors give 100, errors at or beyond the maxima give 0. Scene units
    are metres here (the synthetic rooms are metric).
    """
    r = float(np.mean(np.asarray(rotation_deg, np.float64)))
    t = float(np.mean(np.asarray(translation, np.float64)))
    s_r = 100.0 * (1.0 - min(r / rot_max, 1.0))
    s_t = 100.0 * (1.0 - min(t / trans_max, 1.0))
    return 0.5 * (s_r + s_t)


def scene_model(rgb, depth, w2c, intr, dynamic=None, *, capacity: int, voxel: float | None = None):
    """A point model of the true scene for `camera_control_error`: the static pixels of ground-truth
    RGB-D renders (rgb [V, H, W, 3], depth [V, H, W], w2c [V, 4, 4]) fused into a memory
    (``voxel`` None keeps every pixel). Returns a `PointMemory`."""
    mem, _ = mem_lib.build_memory(rgb, depth, w2c, intr, dynamic, capacity=capacity, voxel=voxel)
    return mem


def camera_control_error(
    scene_memory: mem_lib.PointMemory,
    depth,
    commanded_w2c,
    intr,
    *,
    dynamic=None,
    init_w2c=None,
    align_scale: bool = False,
    icp: slam.ICPConfig = CAMERA_ICP,
) -> CameraError:
    """Camera-control error of generated frames (docs/spatia.md D16).

    The pose of every generated frame is estimated by point-to-plane ICP of its depth map (the
    generator's RGB-D output) against ``scene_memory`` (a model of the true scene, e.g.
    `scene_model` of ground-truth renders), starting from ``init_w2c`` (default: the commanded
    pose), and compared with the commanded pose. A frame generated from the commanded camera
    aligns where it starts (error ~ 0); a frame whose content shows another viewpoint is pulled
    to that viewpoint and the difference is the error (within ICP's convergence basin, a few
    degrees / centimetres per frame).

    depth [T, H, W] metric z of the generated frames; commanded_w2c [T, 4, 4]; intr [4];
    dynamic [T, H, W] bool (pixels ignored) or None. ``align_scale`` first rescales the estimated
    camera centres (relative to frame 0) by the least-squares factor onto the commanded ones, as
    WorldScore does for scale-free SLAM; ICP against a metric scene needs no alignment. Offsets
    along directions the geometry does not constrain (sliding along a lone wall) are not measured
    (see `CAMERA_ICP`). Returns `CameraError`.
    """
    depth = jnp.asarray(depth, jnp.float32)
    cmd = jnp.asarray(commanded_w2c, jnp.float32)
    if depth.ndim != 3 or cmd.shape != (depth.shape[0], 4, 4):
        raise ValueError(
            f"camera_control_error: need depth [T, H, W] and commanded_w2c [T, 4, 4], got "
            f"{depth.shape} and {cmd.shape}"
        )
    init = cmd if init_w2c is None else jnp.asarray(init_w2c, jnp.float32)
    res = slam.icp_refine_batch(scene_memory, depth, init, intr, dynamic, icp)
    est = jnp.where((res.n_pairs >= 12)[:, None, None], res.w2c, init)
    rot, _ = slam.pose_error(est, cmd)
    c_est = np.asarray(geo.camera_centers(est), np.float64)
    c_cmd = np.asarray(geo.camera_centers(cmd), np.float64)
    if align_scale:
        d_est, d_cmd = c_est - c_est[:1], c_cmd - c_cmd[:1]
        den = float(np.sum(d_est * d_est))
        s = float(np.sum(d_est * d_cmd)) / den if den > 0 else 1.0
        c_est = c_cmd[:1] + s * d_est
    trans = np.linalg.norm(c_est - c_cmd, axis=-1)
    rot = np.asarray(rot, np.float64)
    return CameraError(
        rot, trans, np.asarray(est), np.asarray(res.n_pairs), camera_score(rot, trans)
    )
