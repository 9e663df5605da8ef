"""Semantic correspondence (analogue of SPair-71k / BLINK): which marked part of creature 2
is the same part as the REF part of creature 1?

Two procedurally drawn "creatures" of one category (body ellipse, head disk, tail, front and
back leg) with independent random geometry, colours and placement. REF marks one of five
parts (head, body, tail tip, front foot, back foot) on creature 1; markers A-D mark that part
plus three other parts on creature 2. 4-way, chance 1/4 (targets balanced).
Needs vision: part semantics under shape and colour change; the prompt names no part.
Train: both creatures face right; test: each faces left with probability 1/2 (mirrored).
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "semantic_correspondence"
N_IMAGES = 2
CHOICES = LETTER_IDS[:4]
CHANCE = 1 / 4
PARTS = ("head", "body", "tail", "front_foot", "back_foot")


def _segment(img, p0, p1, width, colour):
    """Thick line from p0 to p1 (float (y, x) points)."""
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size] + 0.5
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
    dist = np.hypot(yy - p0[0] - t * d[0], xx - p0[1] - t * d[1])
    img[dist <= width / 2] = colour


def creature(rng: np.random.Generator, size: int, mirror: bool):
    """Draw one creature; returns (uint8[size, size, 3], {part: int[2] (y, x)})."""
    s = size / 32
    img = render.canvas(size)
    body_c, head_c, limb_c = rng.choice(len(render.PALETTE), 3, replace=False)
    bh, bw = rng.uniform(3, 5) * s, rng.uniform(6, 8.5) * s
    hr = rng.uniform(2.5, 4) * s
    leg = rng.uniform(5, 8) * s
    by = rng.uniform(size * 0.35, size * 0.5)
    bx = rng.uniform(size * 0.42, size * 0.58)
    head = np.array([by - bh * rng.uniform(0.3, 1.0), bx + bw + hr * 0.5])
    tail = np.array([by - bh - rng.uniform(3, 7) * s, bx - bw - rng.uniform(2, 5) * s])
    front = np.array([by + bh + leg, bx + bw * rng.uniform(0.45, 0.75)])
    back = np.array([by + bh + leg, bx - bw * rng.uniform(0.45, 0.75)])
    limb = render.PALETTE[limb_c]
    _segment(img, (by, bx - bw * 0.8), tail, 1.6 * s, limb)
    _segment(img, (by, front[1]), front, 1.8 * s, limb)
    _segment(img, (by, back[1]), back, 1.8 * s, limb)
    yy, xx = np.mgrid[:size, :size] + 0.5
    img[((yy - by) / bh) ** 2 + ((xx - bx) / bw) ** 2 <= 1] = render.PALETTE[body_c]
    render.fill_disk(img, head[0], head[1], hr, render.PALETTE[head_c])
    parts = {
        "head": head,
        "body": np.array([by, bx]),
        "tail": tail,
        "front_foot": front,
        "back_foot": back,
    }
    parts = {k: np.clip(np.round(v - 0.5).astype(int), 2, size - 3) for k, v in parts.items()}
    if mirror:
        img = img[:, ::-1].copy()
        parts = {k: np.array([v[0], size - 1 - v[1]]) for k, v in parts.items()}
    return img, parts


def _separated(points, min_dist) -> bool:
    pts = np.asarray(points, float)
    d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    return bool((d[np.triu_indices(len(pts), 1)] >= min_dist).all())


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    k = int(rng.integers(len(PARTS)))
    others = [p for p in range(len(PARTS)) if p != k]
    shown = list(rng.choice(others, 3, replace=False))
    shown.insert(int(target), k)
    for _ in retries():
        img1, parts1 = creature(rng, size, mirror=False)
        img2, parts2 = creature(rng, size, mirror=split == "test" and rng.random() < 0.5)
        pts = [parts2[PARTS[p]] for p in shown]
        if _separated(pts, render.marker_side(size) + 1):
            break
    render.draw_marker(img1, *parts1[PARTS[k]], "REF")
    for name, p in zip(render.LETTER_MARKERS, pts, strict=True):
        render.draw_marker(img2, *p, name)
    prompt = encode(f"semcorr which part is ref ? {options(4)}")
    return Record(
        NAME,
        np.stack([img1, img2]),
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {
            "part": PARTS[k],
            "shown": [PARTS[p] for p in shown],
            "parts1": parts1,
            "parts2": parts2,
            "points": np.array(pts),
        },
    )
