"""Object localization: which of two boxes tightly encloses the object?

One image with one filled object (15-50% of the image area) and two one-pixel box outlines:
marker colour A (pure red) and B (pure green). The gold box sits one pixel outside the
object's extent; the distractor's corners are jittered until its IoU with the gold box is in
[0.2, 0.5]. The two outlines are drawn in random order. 2-way, chance 1/2 (targets balanced).
Needs vision: the prompt gives only the object's colour; deciding needs comparing box extent
with object extent.
Train objects are rectangles or ellipses; test objects are triangles or ellipses.
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.vocab import COLOURS, LETTER_IDS, encode, options

NAME = "localization"
N_IMAGES = 1
CHOICES = LETTER_IDS[:2]
CHANCE = 1 / 2


def iou(a, b) -> float:
    """IoU of inclusive integer boxes (y0, x0, y1, x1)."""
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iy * ix
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
    return inter / (area(a) + area(b) - inter)


def _object(rng, split, size):
    """Draw one object on a fresh canvas; returns (image, colour index, mask, gold box)."""
    for _ in retries():
        img = render.canvas(size)
        colour = int(rng.integers(len(COLOURS)))
        h, w = rng.integers(size // 3, int(size * 0.75), 2)
        cy = rng.uniform(h / 2 + 2, size - h / 2 - 2)
        cx = rng.uniform(w / 2 + 2, size - w / 2 - 2)
        kind = rng.integers(2)
        col = render.PALETTE[colour]
        if kind == 0 and split == "train":
            render.fill_rect(
                img, int(cy - h / 2), int(cx - w / 2), int(cy + h / 2), int(cx + w / 2), col
            )
        elif kind == 0:
            render.fill_triangle(img, cy, cx, min(h, w) / 2, col)
        else:
            yy, xx = np.mgrid[:size, :size] + 0.5
            img[((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1] = col
        obj = np.all(img == col, axis=-1)
        frac = obj.sum() / size**2
        ys, xs = np.nonzero(obj)
        inside = ys.min() >= 1 and xs.min() >= 1 and ys.max() <= size - 2 and xs.max() <= size - 2
        if 0.15 <= (np.ptp(ys) + 1) * (np.ptp(xs) + 1) / size**2 <= 0.5 and inside and frac > 0:
            return img, colour, obj, (ys.min() - 1, xs.min() - 1, ys.max() + 1, xs.max() + 1)


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    img, colour, obj, gold = _object(rng, split, size)
    gold = tuple(int(v) for v in gold)
    span = max(gold[2] - gold[0], gold[3] - gold[1])
    for _ in retries():
        d = rng.integers(-span // 2, span // 2 + 1, 4)
        cand = (gold[0] + d[0], gold[1] + d[1], gold[2] + d[2], gold[3] + d[3])
        cand = tuple(int(np.clip(v, 0, size - 1)) for v in cand)
        if cand[2] - cand[0] >= 3 and cand[3] - cand[1] >= 3 and 0.2 <= iou(gold, cand) <= 0.5:
            break
    boxes = {"A": gold, "B": cand} if target == 0 else {"A": cand, "B": gold}
    order = ["A", "B"] if rng.random() < 0.5 else ["B", "A"]
    for name in order:
        render.box_outline(img, *boxes[name], render.MARKERS[name])
    prompt = encode(f"localize which box fits object {COLOURS[colour]} ? {options(2)}")
    return Record(
        NAME,
        img[None],
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"boxes": boxes, "colour": colour, "object_mask": obj},
    )
