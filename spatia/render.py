"""Z-buffer point renderer in pure JAX (docs/spatia.md D5).

Stages:

1. **Projection** (per chunk of points): ``Xc = R x + t``; points with ``z <= near``, non-finite
   coordinates or an integer pixel ``(floor(v), floor(u))`` outside the image are *invalid* and go
   to a dump slot ``H*W`` -- never a branch, never boolean indexing.
2. **Depth test by two integer scatter-mins.** Positive float32 depths are bit-cast to int32
   (non-negative IEEE floats order like their bit patterns), pass 1 scatter-mins them into a
   ``[H*W + 1]`` buffer, pass 2 scatter-mins the point ids of the fragments whose depth equals the
   buffer: the winner of a pixel is the nearest point, ties broken by the smallest point id.
   Both passes are order-independent, so the result is deterministic on every backend.
3. **Splats wider than a pixel** (integer-grid disk ``S_r = {(dx, dy): dx^2 + dy^2 <= r^2}``):
   ``"footprint"`` replicates every point to the pixels of its disk and runs stage 2 on those
   fragments; ``"minfilter"`` runs stage 2 at 1 px and then takes, per pixel, the
   (depth, id)-lexicographic minimum over the disk. The two are *exactly equal*: the footprint
   winner of a pixel is also the 1-px winner of its own centre pixel (it is nearest among a
   superset), so the min-filter finds it. Points whose centre pixel is off-screen are dropped in
   both modes (their disks do not reach in from outside the image).
   ``"soft"`` is a top-K compositor like PyTorch3D's ``PointsRasterizer + AlphaCompositor``:
   continuous disks of radius ``radius`` px around the projected position, the K nearest points
   per pixel found by K rounds of lexicographic peeling with the same two scatter-mins, weights
   ``alpha = 1 - d^2/r^2`` composited front to back. ``"soft_minfilter"`` is its screen-space
   approximation (like the min-filter for hard splats): candidates are only the 1-px winners of
   the neighbouring pixels, so the cost is ~H*W*S instead of ~N*S*K (for clouds much denser than
   the image).
4. **Scaling**: points are processed in chunks by ``lax.scan`` (the z-buffer is the carry, so the
   working set is ``chunk x fragments`` plus the ``H*W`` buffers); views are batched by ``vmap``
   in groups of ``view_chunk`` (one compiled function for any number of views).

Outputs (`Render`): RGB (or any C-channel feature) image, z-depth (0 where empty), hole mask
(True / 1.0 where no point covers the pixel), the winning point index per pixel (N where empty),
and the per-point 1-px visibility used by retrieval: a valid point is visible iff
``z <= zbuf[its pixel] + vis_eps`` (the rule of the official ``frustum_frontmost_mask``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Render",
    "MODES",
    "render",
    "render_views",
    "disk_offsets",
    "soft_offsets",
    "pytorch3d_radius_to_pixels",
]

MODES = ("point", "minfilter", "footprint", "soft", "soft_minfilter")
_IMAX = np.iinfo(np.int32).max


class Render(NamedTuple):
    """Renderer output for one view (a leading view axis is added by `render_views`).

    rgb [H, W, C] float32; depth [H, W] float32 (0 where empty); hole [H, W] (bool for hard modes,
    float32 ``1 - sum(weights)`` for ``"soft"``); index [H, W] int32 (nearest point, N where empty);
    visible [N] bool (1-px front-most visibility).
    """

    rgb: jnp.ndarray
    depth: jnp.ndarray
    hole: jnp.ndarray
    index: jnp.ndarray
    visible: jnp.ndarray


def disk_offsets(radius: float) -> np.ndarray:
    """Integer pixel offsets [S, 2] = (dx, dy) with dx^2 + dy^2 <= radius^2, sorted."""
    r = int(np.floor(radius))
    offs = [
        (dx, dy)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if dx * dx + dy * dy <= radius * radius
    ]
    return np.asarray(offs, np.int32).reshape(-1, 2)


def soft_offsets(radius: float) -> np.ndarray:
    """Offsets [S, 2] from a point's pixel to every pixel whose centre can lie within ``radius``
    of the point (the point sits anywhere in its pixel): a(d)^2 + a(e)^2 < r^2, a(d) = max(|d| - 0.5, 0)."""
    r = int(np.ceil(radius + 0.5))
    a = lambda d: max(abs(d) - 0.5, 0.0)
    offs = [
        (dx, dy)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if a(dx) ** 2 + a(dy) ** 2 < radius * radius
    ]
    return np.asarray(offs, np.int32).reshape(-1, 2)


def pytorch3d_radius_to_pixels(radius_ndc: float, height: int, width: int) -> float:
    """PyTorch3D point radius (NDC, shorter side spans [-1, 1]) -> pixels: r * min(H, W) / 2."""
    return float(radius_ndc) * min(height, width) / 2.0


# --------------------------------------------------------------------------------------------
# Fragments: (linear pixel, depth bits, point id) for a chunk of points
# --------------------------------------------------------------------------------------------


def _project_chunk(xyz, valid, w2c, intr, near):
    """xyz [n, 3] -> (u, v, z, ok) for one camera (float32)."""
    # elementwise, not `xyz @ R.T`: a K=3 matmul is ~20x slower than this on XLA:CPU
    x, y, zw = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    xc0, xc1, z = (w2c[i, 0] * x + w2c[i, 1] * y + w2c[i, 2] * zw + w2c[i, 3] for i in range(3))
    ok = valid & (z > near) & jnp.isfinite(xc0) & jnp.isfinite(xc1) & jnp.isfinite(z)
    zs = jnp.where(ok, z, 1.0)
    u = intr[0] * (xc0 / zs) + intr[2]
    v = intr[1] * (xc1 / zs) + intr[3]
    ok = ok & jnp.isfinite(u) & jnp.isfinite(v)
    return u, v, z, ok


def _center_fragments(xyz, valid, ids, w2c, intr, h, w, near):
    """1-px fragments: one per point at its integer pixel; invalid -> dump slot h*w."""
    u, v, z, ok = _project_chunk(xyz, valid, w2c, intr, near)
    ok = ok & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    ui = jnp.floor(jnp.where(ok, u, 0.0)).astype(jnp.int32)
    vi = jnp.floor(jnp.where(ok, v, 0.0)).astype(jnp.int32)
    lin = jnp.where(ok, vi * w + ui, h * w)
    zb = jnp.where(ok, lax.bitcast_convert_type(z, jnp.int32), _IMAX)
    return lin, zb, ids, ok, z


def _footprint_fragments(xyz, valid, ids, w2c, intr, h, w, near, offsets):
    """Integer-disk fragments: each on-screen point replicated to centre + offsets [S, 2]."""
    lin, zb, ids, ok, _ = _center_fragments(xyz, valid, ids, w2c, intr, h, w, near)
    ui, vi = lin % w, lin // w
    du, dv = jnp.asarray(offsets[:, 0]), jnp.asarray(offsets[:, 1])
    uu, vv = ui[:, None] + du[None], vi[:, None] + dv[None]
    okk = ok[:, None] & (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
    lin_s = jnp.where(okk, vv * w + uu, h * w).reshape(-1)
    zb_s = jnp.where(okk, zb[:, None], _IMAX).reshape(-1)
    ids_s = jnp.broadcast_to(ids[:, None], okk.shape).reshape(-1)
    return lin_s, zb_s, ids_s


def _soft_fragments(xyz, valid, ids, w2c, intr, h, w, near, radius, offsets):
    """Continuous-disk fragments: pixel centres within ``radius`` px of the projected point."""
    u, v, z, ok = _project_chunk(xyz, valid, w2c, intr, near)
    pad = float(np.ceil(radius)) + 2.0
    ok = ok & (u > -pad) & (u < w + pad) & (v > -pad) & (v < h + pad)
    uc, vc = jnp.where(ok, u, 0.0), jnp.where(ok, v, 0.0)
    ui, vi = jnp.floor(uc).astype(jnp.int32), jnp.floor(vc).astype(jnp.int32)
    du, dv = jnp.asarray(offsets[:, 0]), jnp.asarray(offsets[:, 1])
    uu, vv = ui[:, None] + du[None], vi[:, None] + dv[None]
    d2 = (uu + 0.5 - uc[:, None]) ** 2 + (vv + 0.5 - vc[:, None]) ** 2
    okk = ok[:, None] & (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h) & (d2 < radius * radius)
    lin_s = jnp.where(okk, vv * w + uu, h * w).reshape(-1)
    zb = lax.bitcast_convert_type(jnp.where(ok, z, 1.0), jnp.int32)
    zb_s = jnp.where(okk, zb[:, None], _IMAX).reshape(-1)
    ids_s = jnp.broadcast_to(ids[:, None], okk.shape).reshape(-1)
    return lin_s, zb_s, ids_s


# --------------------------------------------------------------------------------------------
# Depth test: two scatter-mins per layer, scanned over point chunks
# --------------------------------------------------------------------------------------------


def _zbuffer_layer(frag_fn, xyz_c, valid_c, ids_c, n_pix, n_ids, prev_z, prev_i):
    """One (depth, id)-lexicographic layer above (prev_z, prev_i) per pixel.

    xyz_c [n_chunks, chunk, 3] etc.; prev_* [n_pix + 1] int32 or None (first layer).
    Returns zbuf, ibuf [n_pix + 1] int32 (``_IMAX`` / ``n_ids`` where empty).
    """

    def above(lin, zb, ids):
        if prev_z is None:
            return zb < _IMAX
        pz, pi = prev_z[lin], prev_i[lin]
        return (zb < _IMAX) & ((zb > pz) | ((zb == pz) & (ids > pi)))

    if xyz_c.shape[0] == 1:  # one chunk: no scan, fragments computed once (XLA CSEs repeats)
        lin, zb, ids = frag_fn(xyz_c[0], valid_c[0], ids_c[0])
        ab = above(lin, zb, ids)
        zbuf = jnp.full((n_pix + 1,), _IMAX, jnp.int32).at[lin].min(jnp.where(ab, zb, _IMAX))
        win = ab & (zb == zbuf[lin])
        ibuf = jnp.full((n_pix + 1,), n_ids, jnp.int32).at[lin].min(jnp.where(win, ids, n_ids))
        return zbuf, ibuf

    def pass1(zbuf, chunk):
        lin, zb, ids = frag_fn(*chunk)
        zb = jnp.where(above(lin, zb, ids), zb, _IMAX)
        return zbuf.at[lin].min(zb), None

    zbuf, _ = lax.scan(pass1, jnp.full((n_pix + 1,), _IMAX, jnp.int32), (xyz_c, valid_c, ids_c))

    def pass2(ibuf, chunk):
        lin, zb, ids = frag_fn(*chunk)
        win = above(lin, zb, ids) & (zb == zbuf[lin])
        return ibuf.at[lin].min(jnp.where(win, ids, n_ids)), None

    ibuf, _ = lax.scan(pass2, jnp.full((n_pix + 1,), n_ids, jnp.int32), (xyz_c, valid_c, ids_c))
    return zbuf, ibuf


def _minfilter(zimg, iimg, offsets, n_ids):
    """Lexicographic (depth bits, id) minimum over an integer disk. [H, W] int32 each."""
    h, w = zimg.shape
    r = int(np.abs(offsets).max()) if len(offsets) else 0
    zp = jnp.pad(zimg, r, constant_values=_IMAX)
    ip = jnp.pad(iimg, r, constant_values=n_ids)
    bz, bi = zimg, iimg
    for dx, dy in offsets:  # static, <= ~50 offsets: unrolled shifted minima
        if dx == 0 and dy == 0:
            continue
        # a point at pixel q - (dx, dy) covers q
        sz = zp[r - dy : r - dy + h, r - dx : r - dx + w]
        si = ip[r - dy : r - dy + h, r - dx : r - dx + w]
        better = (sz < bz) | ((sz == bz) & (si < bi))
        bz, bi = jnp.where(better, sz, bz), jnp.where(better, si, bi)
    return bz, bi


def _composite(has, d2, cols, radius, bgv):
    """Front-to-back alpha compositing of K layers: has/d2 [P, K], cols [P, K, C] -> rgb, hole."""
    alpha = jnp.where(has, jnp.clip(1.0 - d2 / (radius * radius), 0.0, 1.0), 0.0)
    trans = jnp.cumprod(
        jnp.concatenate([jnp.ones_like(alpha[..., :1]), 1.0 - alpha[..., :-1]], -1), -1
    )
    wts = alpha * trans
    rgb = jnp.einsum("...k,...kc->...c", wts, cols)
    return jnp.where(has[..., :1], rgb, bgv), 1.0 - wts.sum(-1)


def _soft_minfilter(zimg, iimg, xyz, feats, w2c, intr, radius, k, near, bgv, band=16):
    """Top-K soft compositing from the 1-px winners only (cost ~ H*W*S, independent of N).

    A pixel's candidates are the front-most points of the pixels whose points can reach it
    (`soft_offsets`); the K nearest of those within ``radius`` are composited. Differs from the
    exact "soft" mode only by ignoring points hidden at their own pixel. Row bands of ``band``
    rows bound memory to band * W * S.
    """
    h, w = zimg.shape
    n = feats.shape[0]
    offs = soft_offsets(radius)
    r = int(np.abs(offs).max())
    win = jnp.minimum(iimg, n - 1)
    u, v, _, _ = _project_chunk(xyz[win.reshape(-1)], jnp.ones(h * w, bool), w2c, intr, near)
    hp = -(-h // band) * band
    pads = ((r, r + hp - h), (r, r))
    zf = jnp.pad(
        jnp.where(iimg < n, _bits_to_depth(zimg)[0], jnp.inf), pads, constant_values=jnp.inf
    )
    ip = jnp.pad(iimg, pads, constant_values=n)
    up = jnp.pad(u.reshape(h, w), pads)
    vp = jnp.pad(v.reshape(h, w), pads)

    def one_band(b):
        zr, ir, ur, vr = (
            lax.dynamic_slice(a, (b * band, 0), (band + 2 * r, w + 2 * r)) for a in (zf, ip, up, vp)
        )
        pu = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
        pv = (b * band + jnp.arange(band, dtype=jnp.float32))[:, None] + 0.5
        keys, ids_s, d2_s = [], [], []
        for dx, dy in offs:  # static: shifted views of the 1-px winners
            sl = (slice(r - dy, r - dy + band), slice(r - dx, r - dx + w))
            d2o = (ur[sl] - pu) ** 2 + (vr[sl] - pv) ** 2
            keys.append(jnp.where((ir[sl] < n) & (d2o < radius * radius), -zr[sl], -jnp.inf))
            ids_s.append(ir[sl])
            d2_s.append(d2o)
        neg, sel = lax.top_k(jnp.stack(keys, -1), k)  # K nearest (ties: offset order)
        has = jnp.isfinite(neg)
        ids = jnp.where(has, jnp.take_along_axis(jnp.stack(ids_s, -1), sel, -1), n)
        d2k = jnp.take_along_axis(jnp.stack(d2_s, -1), sel, -1)
        rgb, hole = _composite(has, d2k, feats[jnp.minimum(ids, n - 1)], radius, bgv)
        return rgb, hole, jnp.where(has[..., 0], -neg[..., 0], 0.0), ids[..., 0]

    rgb, hole, depth, index = lax.map(one_band, jnp.arange(hp // band))
    fix = lambda a: a.reshape((hp,) + a.shape[2:])[:h]
    return fix(rgb), fix(hole), fix(depth), fix(index)


def _bits_to_depth(zbits):
    empty = zbits == _IMAX
    return jnp.where(
        empty, 0.0, lax.bitcast_convert_type(jnp.where(empty, 0, zbits), jnp.float32)
    ), empty


def _render_one(
    xyz_c, valid_c, ids_c, feats, w2c, intr, *, h, w, mode, radius, k, near, bg, vis_eps
):
    """Render one view from chunked points. Returns `Render` with visible [n_chunks * chunk]."""
    n = feats.shape[0]  # real point count (ids >= n are padding)
    n_pix = h * w
    w2c = w2c.astype(jnp.float32)
    intr = intr.astype(jnp.float32)

    def center(xyz, valid, ids):
        lin, zb, ids, _, _ = _center_fragments(xyz, valid, ids, w2c, intr, h, w, near)
        return lin, zb, ids

    zbuf0, ibuf0 = _zbuffer_layer(center, xyz_c, valid_c, ids_c, n_pix, n, None, None)

    # per-point 1-px visibility (official rule: z <= zbuf + eps)
    zmin = _bits_to_depth(zbuf0)[0]

    def vis_fn(xyz, valid, ids):
        lin, _, _, ok, z = _center_fragments(xyz, valid, ids, w2c, intr, h, w, near)
        return ok & (z <= zmin[lin] + vis_eps)

    visible = jax.vmap(vis_fn)(xyz_c, valid_c, ids_c).reshape(-1)

    bgv = jnp.broadcast_to(jnp.asarray(bg, jnp.float32), (feats.shape[1],))
    if mode == "soft":
        offsets = soft_offsets(radius)

        def frag(xyz, valid, ids):
            return _soft_fragments(xyz, valid, ids, w2c, intr, h, w, near, radius, offsets)

        zs, is_ = [], []
        pz = pi = None
        for _ in range(k):  # static K layers of peeling
            pz, pi = _zbuffer_layer(frag, xyz_c, valid_c, ids_c, n_pix, n, pz, pi)
            zs.append(pz[:n_pix])
            is_.append(pi[:n_pix])
        zl = jnp.stack(zs, -1)  # [HW, K]
        il = jnp.stack(is_, -1)
        has = il < n
        # recompute the distance of each layer's point to the pixel centre
        xyz_flat = xyz_c.reshape(-1, 3)
        pts = xyz_flat[jnp.minimum(il, n - 1)]  # [HW, K, 3]
        u, v, _, _ = _project_chunk(
            pts.reshape(-1, 3), jnp.ones(pts.shape[0] * k, bool), w2c, intr, near
        )
        pix = jnp.arange(n_pix)
        pu = (pix % w).astype(jnp.float32)[:, None] + 0.5
        pv = (pix // w).astype(jnp.float32)[:, None] + 0.5
        d2 = (u.reshape(n_pix, k) - pu) ** 2 + (v.reshape(n_pix, k) - pv) ** 2
        rgb, hole = _composite(has, d2, feats[jnp.minimum(il, n - 1)], radius, bgv)
        depth, _ = _bits_to_depth(zl[:, 0])
        return Render(
            rgb.reshape(h, w, -1),
            depth.reshape(h, w),
            hole.reshape(h, w),
            il[:, 0].reshape(h, w),
            visible,
        )

    if mode == "soft_minfilter":
        rgb, hole, depth, index = _soft_minfilter(
            zbuf0[:n_pix].reshape(h, w),
            ibuf0[:n_pix].reshape(h, w),
            xyz_c.reshape(-1, 3),
            feats,
            w2c,
            intr,
            radius,
            k,
            near,
            bgv,
        )
        return Render(rgb, depth, hole, index, visible)

    if mode == "point":
        zimg, iimg = zbuf0[:n_pix], ibuf0[:n_pix]
    elif mode == "minfilter":
        zimg, iimg = _minfilter(
            zbuf0[:n_pix].reshape(h, w), ibuf0[:n_pix].reshape(h, w), disk_offsets(radius), n
        )
        zimg, iimg = zimg.reshape(-1), iimg.reshape(-1)
    elif mode == "footprint":
        offsets = disk_offsets(radius)

        def frag(xyz, valid, ids):
            return _footprint_fragments(xyz, valid, ids, w2c, intr, h, w, near, offsets)

        zb, ib = _zbuffer_layer(frag, xyz_c, valid_c, ids_c, n_pix, n, None, None)
        zimg, iimg = zb[:n_pix], ib[:n_pix]
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    hole = iimg >= n
    depth, _ = _bits_to_depth(zimg)
    rgb = jnp.where(hole[:, None], bgv, feats[jnp.minimum(iimg, n - 1)])
    return Render(
        rgb.reshape(h, w, -1), depth.reshape(h, w), hole.reshape(h, w), iimg.reshape(h, w), visible
    )


def _chunked(xyz, valid, chunk):
    n = xyz.shape[0]
    chunk = n if (chunk is None or chunk >= n) else int(chunk)
    n_pad = -(-n // chunk) * chunk
    pad = n_pad - n
    xyz_p = jnp.pad(xyz.astype(jnp.float32), ((0, pad), (0, 0)))
    valid_p = jnp.pad(valid.astype(bool), (0, pad))
    ids = jnp.arange(n_pad, dtype=jnp.int32)
    nc = n_pad // chunk
    return xyz_p.reshape(nc, chunk, 3), valid_p.reshape(nc, chunk), ids.reshape(nc, chunk)


def _check(xyz, feats, valid, mode, radius, k):
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be [N, 3], got {xyz.shape}")
    if feats.ndim != 2 or feats.shape[0] != xyz.shape[0]:
        raise ValueError(f"rgb must be [N, C] with N = {xyz.shape[0]}, got {feats.shape}")
    if valid is not None and valid.shape != (xyz.shape[0],):
        raise ValueError(f"valid must be [N] = [{xyz.shape[0]}], got {valid.shape}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "point" and radius <= 0:
        raise ValueError(f"mode {mode!r} needs radius > 0 (pixels), got {radius}")
    if mode.startswith("soft") and k < 1:
        raise ValueError(f"soft mode needs k >= 1, got {k}")
    if xyz.shape[0] == 0:
        raise ValueError("cannot render an empty point array (pad with valid=False instead)")


_STATIC = ("height", "width", "mode", "radius", "k", "near", "chunk", "vis_eps")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _render_jit(
    xyz, rgb, valid, w2c, intr, bg, *, height, width, mode, radius, k, near, chunk, vis_eps
):
    n = xyz.shape[0]
    xyz_c, valid_c, ids_c = _chunked(xyz, valid, chunk)
    out = _render_one(
        xyz_c,
        valid_c,
        ids_c,
        rgb.astype(jnp.float32),
        w2c,
        intr,
        h=height,
        w=width,
        mode=mode,
        radius=radius,
        k=k,
        near=near,
        bg=bg,
        vis_eps=vis_eps,
    )
    return out._replace(visible=out.visible[:n])


def render(
    xyz,
    rgb,
    valid,
    w2c,
    intr,
    *,
    height: int,
    width: int,
    mode: str = "point",
    radius: float = 0.0,
    k: int = 5,
    near: float = 1e-4,
    chunk: int | None = None,
    bg=0.0,
    vis_eps: float = 1e-6,
) -> Render:
    """Render a point cloud to one camera.

    Args:
      xyz: [N, 3] float world points. rgb: [N, C] float features (colours). valid: [N] bool or None.
      w2c: [4, 4] OpenCV world-to-camera. intr: [4] pixel (fx, fy, cx, cy).
      height, width: image size. mode: "point" | "minfilter" | "footprint" | "soft" | "soft_minfilter".
      radius: splat radius in pixels (integer-grid disk for minfilter/footprint, continuous for
        soft). k: layers for "soft". near: points with z <= near are culled.
      chunk: points per scan step (None = all at once); memory is O(chunk * fragments + H*W).
      bg: background value (scalar or [C]). vis_eps: visibility tolerance in metres.
    Returns: `Render` (see its docstring).
    """
    xyz = jnp.asarray(xyz)
    rgb = jnp.asarray(rgb)
    valid = jnp.ones(xyz.shape[:1], bool) if valid is None else jnp.asarray(valid)
    _check(xyz, rgb, valid, mode, radius, k)
    return _render_jit(
        xyz,
        rgb,
        valid,
        jnp.asarray(w2c),
        jnp.asarray(intr),
        jnp.asarray(bg, jnp.float32),
        height=height,
        width=width,
        mode=mode,
        radius=float(radius),
        k=int(k),
        near=float(near),
        chunk=chunk,
        vis_eps=float(vis_eps),
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _render_views_jit(
    xyz, rgb, valid, w2c, intr, bg, *, height, width, mode, radius, k, near, chunk, vis_eps
):
    n = xyz.shape[0]
    xyz_c, valid_c, ids_c = _chunked(xyz, valid, chunk)
    feats = rgb.astype(jnp.float32)

    def one(w2c_i, intr_i):
        return _render_one(
            xyz_c,
            valid_c,
            ids_c,
            feats,
            w2c_i,
            intr_i,
            h=height,
            w=width,
            mode=mode,
            radius=radius,
            k=k,
            near=near,
            bg=bg,
            vis_eps=vis_eps,
        )

    out = jax.vmap(one)(w2c, intr)
    return out._replace(visible=out.visible[:, :n])


def render_views(
    xyz,
    rgb,
    valid,
    w2c,
    intr,
    *,
    height: int,
    width: int,
    mode: str = "point",
    radius: float = 0.0,
    k: int = 5,
    near: float = 1e-4,
    chunk: int | None = None,
    view_chunk: int = 8,
    bg=0.0,
    vis_eps: float = 1e-6,
) -> Render:
    """Render one cloud to T cameras: w2c [T, 4, 4], intr [T, 4] or [4].

    Views are vmapped ``view_chunk`` at a time (the last group padded with copies), so peak
    memory is ``view_chunk x (chunk x fragments + H*W)`` and any T reuses one compiled function.
    Returns `Render` with a leading T axis on every field (visible is [T, N]). Other arguments as
    in `render`.
    """
    xyz = jnp.asarray(xyz)
    rgb = jnp.asarray(rgb)
    valid = jnp.ones(xyz.shape[:1], bool) if valid is None else jnp.asarray(valid)
    _check(xyz, rgb, valid, mode, radius, k)
    w2c = jnp.asarray(w2c, jnp.float32)
    if w2c.ndim != 3 or w2c.shape[1:] != (4, 4):
        raise ValueError(f"w2c must be [T, 4, 4], got {w2c.shape}")
    if view_chunk < 1:
        raise ValueError(f"view_chunk must be >= 1, got {view_chunk}")
    t_n = w2c.shape[0]
    intr = jnp.broadcast_to(jnp.asarray(intr, jnp.float32), (t_n, 4))
    pad = -t_n % view_chunk
    w2c = jnp.concatenate([w2c, jnp.broadcast_to(w2c[-1:], (pad, 4, 4))])
    intr = jnp.concatenate([intr, jnp.broadcast_to(intr[-1:], (pad, 4))])
    kw = dict(
        height=height,
        width=width,
        mode=mode,
        radius=float(radius),
        k=int(k),
        near=float(near),
        chunk=chunk,
        vis_eps=float(vis_eps),
    )
    bg = jnp.asarray(bg, jnp.float32)
    outs = [
        _render_views_jit(
            xyz, rgb, valid, w2c[i : i + view_chunk], intr[i : i + view_chunk], bg, **kw
        )
        for i in range(0, t_n + pad, view_chunk)
    ]
    return Render(*(jnp.concatenate(f)[:t_n] for f in zip(*outs, strict=True)))
