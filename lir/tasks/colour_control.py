"""Negative control (docs/lir.md D16): what colour is the circle?

One image with one disk of the answer colour and 0-3 distractor shapes of other colours.
Answer: the colour word, open-ended over the 8 palette colours; chance 1/8 (targets
balanced). A single-attribute lookup that direct attention already solves, so LIVR is
expected to give no gain here; it checks that the method does not simply help everywhere.
Train distractors are squares; test distractors are triangles.
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split
from lir.tasks.vocab import COLOUR_IDS, encode

NAME = "colour_control"
N_IMAGES = 1
CHOICES = COLOUR_IDS
CHANCE = 1 / 8


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    img = render.canvas(size)
    cell = size // 4  # 4x4 grid of cells, one shape per cell
    cells = rng.choice(16, size=1 + int(rng.integers(0, 4)), replace=False)
    others = rng.permutation([c for c in range(len(render.PALETTE)) if c != target])
    r = cell * 0.42
    centres = []
    for i, c in enumerate(cells):
        cy, cx = (c // 4 + 0.5) * cell, (c % 4 + 0.5) * cell
        centres.append((cy, cx))
        if i == 0:
            render.fill_disk(img, cy, cx, r, render.PALETTE[target])
        elif split == "train":
            col = render.PALETTE[others[i - 1]]
            render.fill_rect(img, int(cy - r), int(cx - r), int(cy + r), int(cx + r), col)
        else:
            render.fill_triangle(img, cy, cx, r, render.PALETTE[others[i - 1]])
    prompt = encode("colourof circle ?")
    return Record(
        NAME, img[None], prompt, CHOICES[[target]], CHOICES, int(target), {"centre": centres[0]}
    )
