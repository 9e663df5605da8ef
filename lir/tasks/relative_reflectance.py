"""Relative reflectance (analogue of MID / BLINK-IIW): which of two points has the darker
surface colour (albedo), or are they about the same?

One image = piecewise-constant albedo (Voronoi regions of palette colours scaled in
brightness) times a smooth shading field; marker A (pure red) and marker B (pure green) sit
on two spatially separated points in different regions. With luminance Y of the albedo and
``rel = |Y_A - Y_B| / max(Y_A, Y_B)``: rel <= 0.1 -> (C) about the same, otherwise (A) A is
darker or (B) B is darker (LIVR App. A). Sampled gaps keep a margin: same-class pairs have
rel <= 0.07, others rel >= 0.2. Class C is sampled 25% of the time (docs/lir.md D16), A and B 37.5%
each: uniform guessing gives 1/3, always answering the majority class gives 0.375.
Needs vision and discounting a nuisance: the shading field makes the brighter-looking pixel
the darker albedo in many examples, so comparing raw pixel brightness is not enough.
Train shading: a linear ramp; test shading: a point light (radial falloff).
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks._points import far_points
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "relative_reflectance"
N_IMAGES = 1
CHOICES = LETTER_IDS[:3]
CHANCE = 1 / 3
CLASS_WEIGHTS = (0.375, 0.375, 0.25)
LUMA = np.array([0.2126, 0.7152, 0.0722])


def luminance(rgb01) -> np.ndarray:
    """Luminance of linear RGB in [0, 1], shape [..., 3] -> [...]."""
    return np.asarray(rgb01) @ LUMA


def _shading(rng, size, split):
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    lo = rng.uniform(0.3, 0.5)
    if split == "train":
        a = rng.uniform(0, 2 * np.pi)
        t = (yy - 0.5) * np.sin(a) + (xx - 0.5) * np.cos(a)
        t = (t - t.min()) / np.ptp(t)
        return lo + (1 - lo) * t
    cy, cx = rng.uniform(0, 1, 2)
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return lo + (1 - lo) / (1 + d2 / rng.uniform(0.05, 0.15))


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    margin = render.marker_side(size)
    for _ in retries():
        seeds = rng.uniform(0, size, (int(rng.integers(5, 8)), 2))
        yy, xx = np.mgrid[:size, :size] + 0.5
        region = np.argmin(
            (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1
        )
        pa, pb = far_points(rng, 2, size, margin + 1, size / 3)
        ra, rb = region[tuple(pa)], region[tuple(pb)]
        if ra != rb:
            break
    base = render.PALETTE[rng.integers(len(render.PALETTE), size=len(seeds))] / 255.0
    y_target = rng.uniform(0.15, 0.7, len(seeds))
    ya = rng.uniform(0.25, 0.6)
    if target == 2:
        yb = ya * rng.uniform(0.93, 1.07)
    elif target == 0:  # A darker
        yb = ya / rng.uniform(0.55, 0.8)
    else:
        yb = ya * rng.uniform(0.55, 0.8)
    y_target[ra], y_target[rb] = ya, yb
    scale = y_target / luminance(base)
    albedo_regions = base * scale[:, None]
    # brightness targets above what a colour allows fall back to a grey of that luminance
    over = albedo_regions.max(axis=1) > 1
    albedo_regions[over] = y_target[over, None]
    albedo = albedo_regions[region]
    img = np.clip(albedo * _shading(rng, size, split)[..., None] * 235 + 10, 0, 245)
    img = img.astype(np.uint8)
    render.draw_marker(img, *pa, "A")
    render.draw_marker(img, *pb, "B")
    prompt = encode(f"reflectance which point darker ? {options(3)}")
    return Record(
        NAME,
        img[None],
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"albedo": albedo.astype(np.float32), "points": np.stack([pa, pb])},
    )
