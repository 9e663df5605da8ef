"""Functional correspondence (analogue of FunKPoint / BLINK): which marked point on tool 2
serves the same function as the REF point on tool 1?

Two procedurally drawn tools of *different* categories (hammer, ladle, knife; the test split
adds spatula), each a handle plus a category-specific head, drawn along a random direction.
Every tool has five functional keypoints in the same order: grip end, handle middle, neck,
working part (head centre), head tip. REF marks keypoint k on tool 1; A-D mark keypoint k
and three other keypoints on tool 2. The prompt carries the action of keypoint k (``hold``
for the handle points, the category's action for the others), as FunKPoint's action labels.
4-way, chance 1/4 (targets balanced).
Unlike semantic correspondence, the two objects differ in category, so the match is by
function, not by appearance. Needs vision: the action word does not say which marker sits
on the corresponding point.
Train: three categories, directions within 30 degrees of horizontal (either way);
test: four categories, any direction.
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.semantic_correspondence import _segment, _separated
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "functional_correspondence"
N_IMAGES = 2
CHOICES = LETTER_IDS[:4]
CHANCE = 1 / 4
CATEGORIES = ("hammer", "ladle", "knife", "spatula")
ACTION = {"hammer": "strike", "ladle": "pour", "knife": "cut", "spatula": "strike"}
KEYPOINTS = ("grip_end", "handle_middle", "neck", "working_part", "head_tip")


def tool(rng: np.random.Generator, size: int, category: str, split: str):
    """Draw one tool; returns (uint8[size, size, 3], int[5, 2] keypoints (y, x))."""
    s = size / 32
    img = render.canvas(size)
    handle_c, head_c = rng.choice(len(render.PALETTE), 2, replace=False)
    if split == "train":
        ang = rng.uniform(-np.pi / 6, np.pi / 6) + np.pi * rng.integers(2)
    else:
        ang = rng.uniform(0, 2 * np.pi)
    u = np.array([np.sin(ang), np.cos(ang)])  # (y, x) unit vector along the tool
    v = np.array([u[1], -u[0]])  # perpendicular
    handle_len, head_len = rng.uniform(11, 13) * s, rng.uniform(10, 12) * s
    total = handle_len + head_len
    centre = np.array([size / 2, size / 2]) + rng.uniform(-1, 1, 2) * s
    grip = centre - u * total / 2
    neck = grip + u * handle_len
    tip = neck + u * head_len
    _segment(img, grip, neck, 2.2 * s, render.PALETTE[handle_c])
    head = render.PALETTE[head_c]
    mid = neck + u * head_len / 2
    if category == "hammer":  # a block across the axis
        w = rng.uniform(3, 4.5) * s
        _segment(img, mid - v * w, mid + v * w, head_len, head)
    elif category == "ladle":  # a round bowl
        render.fill_disk(img, mid[0], mid[1], head_len / 2, head)
    elif category == "knife":  # a blade tapering to the tip
        for t in np.linspace(0, 1, 12):
            _segment(
                img,
                neck + u * head_len * t,
                neck + u * head_len * t + v * 3 * s * (1 - t),
                1.5 * s,
                head,
            )
    else:  # spatula: a wide flat blade
        _segment(img, neck + u * 1.0 * s, tip, 5 * s, head)
    kps = np.stack([grip, grip + u * handle_len / 2, neck, mid, tip])
    return img, np.clip(np.round(kps - 0.5).astype(int), 2, size - 3)


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    cats = CATEGORIES[:3] if split == "train" else CATEGORIES
    c1, c2 = rng.choice(len(cats), 2, replace=False)
    k = int(rng.integers(len(KEYPOINTS)))
    shown = list(rng.choice([p for p in range(5) if p != k], 3, replace=False))
    shown.insert(int(target), k)
    for _ in retries():
        img1, kp1 = tool(rng, size, cats[c1], split)
        img2, kp2 = tool(rng, size, cats[c2], split)
        if _separated(kp2[shown], render.marker_side(size) + 1):
            break
    render.draw_marker(img1, *kp1[k], "REF")
    for name, p in zip(render.LETTER_MARKERS, kp2[shown], strict=True):
        render.draw_marker(img2, *p, name)
    action = "hold" if k < 2 else ACTION[cats[c1]]
    prompt = encode(f"funccorr which point {action} ? {options(4)}")
    return Record(
        NAME,
        np.stack([img1, img2]),
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {
            "keypoint": KEYPOINTS[k],
            "categories": (cats[c1], cats[c2]),
            "kp1": kp1,
            "kp2": kp2,
            "points": kp2[shown],
        },
    )
