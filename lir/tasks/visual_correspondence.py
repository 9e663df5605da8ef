"""Visual correspondence (analogue of the HPatches task): which marked point in image 2 is
the REF point of image 1?

Image 1: a textured scene with a REF marker (white). Image 2: the same scene seen with a small
camera shift and a brightness change, with four candidate markers A-D (pure red, green, blue,
yellow): the true corresponding point plus three distractors far from it and from each other.
4-way, chance 1/4 (targets balanced).
Needs vision: local pattern matching across two images; nothing in the prompt refers to the
scene.
Train: shift <= size/8 px, brightness x[0.7, 1.2]; test: shift <= size/6, brightness x[0.6, 1.3].
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks._points import far_points
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "visual_correspondence"
N_IMAGES = 2
CHOICES = LETTER_IDS[:4]
CHANCE = 1 / 4


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    max_shift = size // 8 if split == "train" else size // 6
    lo, hi = (0.7, 1.2) if split == "train" else (0.6, 1.3)
    big = render.textured_scene(rng, size + 2 * max_shift, n_shapes=12, gradient=True)
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
    m = max_shift
    img1 = big[m : m + size, m : m + size].copy()
    img2 = big[m + dy : m + dy + size, m + dx : m + dx + size].astype(np.float32)
    img2 = np.clip(img2 * rng.uniform(lo, hi), 20, 235).astype(np.uint8)
    margin = render.marker_side(size)
    for _ in retries():
        ref = far_points(rng, 1, size, margin, 0)[0]
        true = ref - (dy, dx)  # scene point ref of image 1 sits at ref - shift in image 2
        if np.all(true >= margin) and np.all(true < size - margin):
            break
    distract = far_points(rng, 3, size, margin, size / 4, avoid=[true])
    pts = list(distract)
    pts.insert(int(target), true)
    render.draw_marker(img1, *ref, "REF")
    for name, p in zip(render.LETTER_MARKERS, pts, strict=True):
        render.draw_marker(img2, *p, name)
    prompt = encode(f"viscorr which point is ref ? {options(4)}")
    return Record(
        NAME,
        np.stack([img1, img2]),
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"ref": ref, "points": np.array(pts), "shift": (dy, dx)},
    )
