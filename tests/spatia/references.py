"""Brute-force numpy references for the renderer tests: Python loops over points, float64 projection."""

import numpy as np

from spatia.render import disk_offsets

# --------------------------------------------------------------------------------------------


def np_project(xyz, w2c, intr, h, w, near):
    xyz = np.asarray(xyz, np.float64)
    w2c = np.asarray(w2c, np.float64)
    intr = np.asarray(intr, np.float64)
    xc = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    z = xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intr[0] * xc[:, 0] / z + intr[2]
        v = intr[1] * xc[:, 1] / z + intr[3]
    ok = (z > near) & np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    return u, v, z, ok


def reference_zbuffer(xyz, rgb, valid, w2c, intr, height, width, near=1e-4, bg=0.0, vis_eps=1e-6):
    """Brute-force 1-px z-buffer: a Python loop over points, float64 projection.

    Same rule as `render(mode="point")`: nearest depth wins, ties -> smallest point index.
    Returns dict(rgb [H,W,C], depth [H,W], hole [H,W], index [H,W], visible [N]).
    """
    n = len(xyz)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    u, v, z, ok = np_project(xyz, w2c, intr, height, width, near)
    ok &= valid
    zbuf = np.full((height, width), np.inf)
    ibuf = np.full((height, width), n, np.int64)
    for p in range(n):
        if not ok[p]:
            continue
        i, j = int(np.floor(v[p])), int(np.floor(u[p]))
        if z[p] < zbuf[i, j] or (z[p] == zbuf[i, j] and p < ibuf[i, j]):
            zbuf[i, j], ibuf[i, j] = z[p], p
    rgb = np.asarray(rgb, np.float32)
    hole = ibuf == n
    img = np.where(
        hole[..., None],
        np.broadcast_to(np.asarray(bg, np.float32), (rgb.shape[1],)),
        rgb[np.minimum(ibuf, n - 1)],
    )
    vis = np.zeros(n, bool)
    for p in np.nonzero(ok)[0]:
        i, j = int(np.floor(v[p])), int(np.floor(u[p]))
        vis[p] = z[p] <= zbuf[i, j] + vis_eps
    return dict(rgb=img, depth=np.where(hole, 0.0, zbuf), hole=hole, index=ibuf, visible=vis)


def reference_splat(xyz, rgb, valid, w2c, intr, height, width, radius, near=1e-4, bg=0.0):
    """Brute-force integer-disk footprint splatting (loop over points and disk offsets)."""
    n = len(xyz)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    u, v, z, ok = np_project(xyz, w2c, intr, height, width, near)
    ok &= valid
    zbuf = np.full((height, width), np.inf)
    ibuf = np.full((height, width), n, np.int64)
    offs = disk_offsets(radius)
    for p in np.nonzero(ok)[0]:
        ci, cj = int(np.floor(v[p])), int(np.floor(u[p]))
        for dx, dy in offs:
            i, j = ci + dy, cj + dx
            if 0 <= i < height and 0 <= j < width:
                if z[p] < zbuf[i, j] or (z[p] == zbuf[i, j] and p < ibuf[i, j]):
                    zbuf[i, j], ibuf[i, j] = z[p], p
    rgb = np.asarray(rgb, np.float32)
    hole = ibuf == n
    img = np.where(
        hole[..., None],
        np.broadcast_to(np.asarray(bg, np.float32), (rgb.shape[1],)),
        rgb[np.minimum(ibuf, n - 1)],
    )
    return dict(rgb=img, depth=np.where(hole, 0.0, zbuf), hole=hole, index=ibuf)


# --------------------------------------------------------------------------------------------
# Image metrics and geometric match accuracy (spatia.metrics)


def reference_psnr(a, b, data_range=1.0):
    """PSNR of one image pair in float64: 10 log10(range^2 / MSE), inf when equal."""
    err = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return np.inf if err == 0 else 10.0 * np.log10(data_range**2 / err)


def reference_ssim(a, b, data_range=1.0, sigma=1.5, truncate=3.5, sample_covariance=True):
    """Gaussian-window SSIM by explicit loops over pixels (float64), per channel then averaged.

    A 2-D window of taps exp(-d^2 / (2 sigma^2)) over a (2r+1)^2 square, r = int(truncate sigma +
    0.5), normalised to sum 1; borders mirrored (numpy "symmetric"); weighted moments at every
    pixel; SSIM map cropped by r on each side; K1 = 0.01, K2 = 0.03.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    r = int(truncate * sigma + 0.5)
    d = np.arange(-r, r + 1)
    win = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    win /= win.sum()
    n_p = (2 * r + 1) ** 2
    norm = n_p / (n_p - 1) if sample_covariance else 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w, n_c = a.shape
    per_channel = []
    for c in range(n_c):
        pa = np.pad(a[..., c], r, mode="symmetric")
        pb = np.pad(b[..., c], r, mode="symmetric")
        vals = []
        for i in range(r, h - r):
            for j in range(r, w - r):
                x = pa[i : i + 2 * r + 1, j : j + 2 * r + 1]
                y = pb[i : i + 2 * r + 1, j : j + 2 * r + 1]
                mx, my = np.sum(win * x), np.sum(win * y)
                vx = norm * (np.sum(win * x * x) - mx * mx)
                vy = norm * (np.sum(win * y * y) - my * my)
                vxy = norm * (np.sum(win * x * y) - mx * my)
                num = (2 * mx * my + c1) * (2 * vxy + c2)
                vals.append(num / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def reference_match_accuracy(
    img_i,
    img_j,
    depth_i,
    depth_j,
    w2c_i,
    w2c_j,
    intr,
    colour_tol=0.1,
    occlusion_tol=0.05,
    valid_i=None,
):
    """Loop over the pixels of frame i: back-project with the true depth, project into j, check
    bounds / occlusion (relative depth agreement) / max-channel colour difference (float64)."""
    img_i = np.asarray(img_i, np.float64)
    img_j = np.asarray(img_j, np.float64)
    w2c_i = np.asarray(w2c_i, np.float64)
    w2c_j = np.asarray(w2c_j, np.float64)
    fx, fy, cx, cy = np.asarray(intr, np.float64)
    h, w = depth_i.shape
    c2w_i = np.linalg.inv(w2c_i)
    n_cov = n_match = 0
    for i in range(h):
        for j in range(w):
            z = float(depth_i[i, j])
            if not (z > 0) or (valid_i is not None and not valid_i[i, j]):
                continue
            pc = np.array([(j + 0.5 - cx) / fx * z, (i + 0.5 - cy) / fy * z, z, 1.0])
            q = w2c_j @ (c2w_i @ pc)
            if q[2] <= 1e-4:
                continue
            u, v = fx * q[0] / q[2] + cx, fy * q[1] / q[2] + cy
            col, row = int(np.floor(u)), int(np.floor(v))
            if not (0 <= col < w and 0 <= row < h):
                continue
            dj = float(depth_j[row, col])
            if not (dj > 0 and abs(dj - q[2]) <= occlusion_tol * q[2]):
                continue
            n_cov += 1
            n_match += np.max(np.abs(img_i[i, j] - img_j[row, col])) <= colour_tol
    return (n_match / n_cov if n_cov else 0.0), n_cov
