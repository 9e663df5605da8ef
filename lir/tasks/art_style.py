"""Art style (analogue of ArtBench / BLINK): which of two "paintings" shares the reference's
style?

Eight procedural styles, each a texture family with its own pattern (stripes, checks, blobs,
dots, rings, smooth noise), orientation, spatial frequency and two-colour palette. A
painting is one random instance of a style (random phase, small orientation and frequency
jitter, pixel noise). Three images: the reference, a different instance of the same style,
and an instance of another style, in random A/B order. 2-way, chance 1/2 (targets balanced).
Needs vision: style statistics compared across images; the prompt names no style.
Train instances: jitter of orientation +-0.15 rad and frequency x[0.9, 1.1]; test: +-0.3 rad,
x[0.8, 1.25] and darker palettes (x0.8).
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "art_style"
N_IMAGES = 3
CHOICES = LETTER_IDS[:2]
CHANCE = 1 / 2
# (pattern, orientation rad, cycles per image, palette indices)
STYLES = (
    ("stripes", 0.0, 4, (0, 3)),
    ("stripes", np.pi / 2, 7, (2, 4)),
    ("stripes", np.pi / 4, 5, (5, 7)),
    ("checks", 0.0, 3, (6, 2)),
    ("blobs", 0.0, 0, (1, 5)),
    ("dots", 0.0, 5, (3, 2)),
    ("rings", 0.0, 4, (0, 4)),
    ("noise", 0.0, 0, (6, 1)),
)


def painting(rng: np.random.Generator, size: int, style: int, split: str) -> np.ndarray:
    """One instance of ``style``: uint8[size, size, 3]."""
    pattern, ori, freq, pal = STYLES[style]
    oj, (flo, fhi) = (0.15, (0.9, 1.1)) if split == "train" else (0.3, (0.8, 1.25))
    ori = ori + rng.uniform(-oj, oj)
    freq = freq * rng.uniform(flo, fhi)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    u = yy * np.sin(ori) + xx * np.cos(ori)
    v = yy * np.cos(ori) - xx * np.sin(ori)
    ph = rng.uniform(0, 2 * np.pi, 2)
    if pattern == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + ph[0])
    elif pattern == "checks":
        t = (np.sin(2 * np.pi * freq * u + ph[0]) * np.sin(2 * np.pi * freq * v + ph[1]) > 0) * 1.0
    elif pattern == "dots":
        t = (
            (np.sin(2 * np.pi * freq * u + ph[0]) > 0.6)
            & (np.sin(2 * np.pi * freq * v + ph[1]) > 0.6)
        ) * 1.0
    elif pattern == "rings":
        cy, cx = rng.uniform(0.2, 0.8, 2)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(yy - cy, xx - cx) + ph[0])
    elif pattern == "blobs":
        t = np.zeros((size, size))
        for _ in range(int(rng.integers(3, 6))):
            cy, cx = rng.uniform(0, 1, 2)
            t = np.maximum(t, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.005, 0.02)))
    else:  # smooth noise: blurred random field
        field = rng.normal(size=(size, size, 1)).astype(np.float32)
        t = render.box_blur(render.box_blur(field, 5), 5)[..., 0]
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
    c0, c1 = render.PALETTE[pal[0]].astype(float), render.PALETTE[pal[1]].astype(float)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if split == "test":
        img = img * 0.8
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 20, 235).astype(np.uint8)


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    style = int(rng.integers(len(STYLES)))
    other = int(rng.choice([s for s in range(len(STYLES)) if s != style]))
    ref, pos, neg = (painting(rng, size, s, split) for s in (style, style, other))
    cands = [pos, neg] if target == 0 else [neg, pos]
    prompt = encode(f"artstyle which image same style first ? {options(2)}")
    styles = (style, other) if target == 0 else (other, style)
    return Record(
        NAME,
        np.stack([ref] + cands),
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"ref_style": style, "candidate_styles": styles},
    )
