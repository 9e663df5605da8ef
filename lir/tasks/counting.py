"""Counting (analogue of PixMo-Count): how many objects of the queried colour are there?

One image with 2-10 small objects of the queried colour among distractors of other colours,
placed in distinct cells of an 8x8 grid (so objects never touch). Answer: the number token
("2".."10"), open-ended over 9 values. Chance 1/9 (targets are balanced over counts).
Needs vision: the prompt names only the colour; the count exists only in the pixels, and
it needs question-conditioned aggregation over many image tokens.
Train draws squares with 0-4 distractors; test draws disks with 2-6 distractors.
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split
from lir.tasks.vocab import COLOURS, NUMBER_IDS, encode

NAME = "counting"
N_IMAGES = 1
CHOICES = NUMBER_IDS[2:11]
CHANCE = 1 / 9


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    count = int(target) + 2
    colour = int(rng.integers(len(COLOURS)))
    lo, hi = (0, 4) if split == "train" else (2, 6)
    n_distract = int(rng.integers(lo, hi + 1))
    cell = size // 8
    cells = rng.choice(64, size=count + n_distract, replace=False)
    others = [c for c in range(len(COLOURS)) if c != colour]
    img = render.canvas(size)
    for i, c in enumerate(cells):
        col = colour if i < count else int(rng.choice(others))
        y0, x0 = (c // 8) * cell, (c % 8) * cell
        if split == "train":
            render.fill_rect(img, y0, x0, y0 + cell - 1, x0 + cell - 1, render.PALETTE[col])
        else:
            r = (cell - 1) / 2
            render.fill_disk(img, y0 + r, x0 + r, max(r, 1.2), render.PALETTE[col])
    prompt = encode(f"count how many {COLOURS[colour]} ?")
    return Record(
        NAME,
        img[None],
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"count": count, "colour": colour, "cells": cells[:count]},
    )
