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
    img = np.where(hole[..., None], np.broadcast_to(np.asarray(bg, np.float32), (rgb.shape[1],)),
                   rgb[np.minimum(ibuf, n - 1)])
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
    img = np.where(hole[..., None], np.broadcast_to(np.asarray(bg, np.float32), (rgb.shape[1],)),
                   rgb[np.minimum(ibuf, n - 1)])
    return dict(rgb=img, depth=np.where(hole, 0.0, zbuf), hole=hole, index=ibuf)
