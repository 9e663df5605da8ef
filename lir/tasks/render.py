"""NumPy drawing primitives for the procedural tasks (uint8 RGB canvases, in place).

Scene colours (``PALETTE``) are muted (every channel in [40, 230]); marker colours
(``MARKERS``) are pure white and saturated primaries, so a marker can never be confused with
a scene surface. Markers are hollow squares: the pixels inside the ring keep the surface
colour, so the colour *under* a marker stays visible (docs/lir.md D16: markers are coloured squares
because letters are illegible at this resolution).
"""

from __future__ import annotations

import numpy as np

from lir.tasks.vocab import COLOURS

PALETTE = np.array(
    [
        (200, 60, 60),  # red
        (60, 170, 70),  # green
        (60, 90, 210),  # blue
        (220, 200, 60),  # yellow
        (60, 190, 200),  # cyan
        (190, 70, 190),  # magenta
        (230, 130, 40),  # orange
        (150, 150, 150),  # grey
    ],
    dtype=np.uint8,
)
assert len(PALETTE) == len(COLOURS)

MARKERS = {
    "REF": np.array((255, 255, 255), np.uint8),
    "A": np.array((255, 0, 0), np.uint8),
    "B": np.array((0, 255, 0), np.uint8),
    "C": np.array((0, 0, 255), np.uint8),
    "D": np.array((255, 255, 0), np.uint8),
}
LETTER_MARKERS = ("A", "B", "C", "D")
BACKGROUND = np.array((25, 25, 25), np.uint8)


def canvas(size: int, colour=BACKGROUND) -> np.ndarray:
    """uint8[size, size, 3] filled with ``colour``."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = colour
    return img


def marker_side(size: int) -> int:
    """Marker edge length in pixels for an image of ``size`` pixels (4 at 32 px, 6 at 48 px)."""
    return max(4, int(round(size / 8)))


def fill_rect(img, y0, x0, y1, x1, colour) -> None:
    """Fill rows [y0, y1) and columns [x0, x1), clipped to the canvas."""
    h, w = img.shape[:2]
    img[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = colour


def disk_mask(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


def fill_disk(img, cy, cx, r, colour) -> None:
    img[disk_mask(img.shape[0], cy, cx, r)] = colour


def fill_triangle(img, cy, cx, r, colour) -> None:
    """Upward isosceles triangle inscribed in the box of half-size r centred at (cy, cx)."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]] + 0.5
    t = (yy - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
    inside = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    img[inside] = colour


def box_outline(img, y0, x0, y1, x1, colour) -> None:
    """One-pixel outline of the box with inclusive corners (y0, x0) and (y1, x1)."""
    h, w = img.shape[:2]
    y0c, y1c, x0c, x1c = max(y0, 0), min(y1, h - 1), max(x0, 0), min(x1, w - 1)
    if 0 <= y0 < h:
        img[y0, x0c : x1c + 1] = colour
    if 0 <= y1 < h:
        img[y1, x0c : x1c + 1] = colour
    if 0 <= x0 < w:
        img[y0c : y1c + 1, x0] = colour
    if 0 <= x1 < w:
        img[y0c : y1c + 1, x1] = colour


def draw_marker(img, cy: int, cx: int, name: str) -> tuple[int, int, int, int]:
    """Hollow square marker of colour ``MARKERS[name]`` centred near (cy, cx).

    Returns the inclusive box (y0, x0, y1, x1) of the ring.
    """
    side = marker_side(img.shape[0])
    y0, x0 = cy - side // 2, cx - side // 2
    y1, x1 = y0 + side - 1, x0 + side - 1
    box_outline(img, y0, x0, y1, x1, MARKERS[name])
    return y0, x0, y1, x1


def find_marker(img, name: str) -> tuple[float, float] | None:
    """Centre (y, x) of the pixels with marker colour ``name`` (None if absent)."""
    hit = np.all(img == MARKERS[name], axis=-1)
    if not hit.any():
        return None
    ys, xs = np.nonzero(hit)
    return float(ys.mean()), float(xs.mean())


def textured_scene(
    rng: np.random.Generator, size: int, n_shapes: int = 6, gradient: bool = True
) -> np.ndarray:
    """A random scene of palette-coloured rectangles and disks over a shaded background.

    uint8[size, size, 3]; every channel stays inside the muted palette range (no marker
    colours can appear).
    """
    img = canvas(size, PALETTE[rng.integers(len(PALETTE))] // 2 + 20)
    for _ in range(n_shapes):
        col = PALETTE[rng.integers(len(PALETTE))]
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 10, size / 4)
        if rng.random() < 0.5:
            fill_disk(img, cy, cx, r, col)
        else:
            h, w = rng.uniform(0.5, 1.5, 2) * r
            fill_rect(img, int(cy - h), int(cx - w), int(cy + h), int(cx + w), col)
    if gradient:
        yy, xx = np.mgrid[:size, :size] / size
        a, b = rng.uniform(-0.25, 0.25, 2)
        shade = 1.0 + a * (yy - 0.5) + b * (xx - 0.5)
        img = np.clip(img * shade[..., None], 20, 235).astype(np.uint8)
    return img


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8[h, w, 3] by an integer factor."""
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def box_blur(img: np.ndarray, k: int = 3) -> np.ndarray:
    """float32 box blur of [H, W, C] with an odd window k (edge padding)."""
    pad = k // 2
    x = np.pad(img.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    c = np.cumsum(np.cumsum(x, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    h, w = img.shape[:2]
    s = c[k : k + h, k : k + w] - c[:h, k : k + w] - c[k : k + h, :w] + c[:h, :w]
    return s / (k * k)
