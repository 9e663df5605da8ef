"""Jigsaw: which of two patches fills the blacked-out bottom-right quadrant of a scene?

Three images: the scene with its bottom-right quadrant blacked out, option A and option B
(patches of half the scene size, upscaled x2 to the common image size). The gold option is
the removed quadrant; the distractor is another crop of the same scene that does not overlap
the gold quadrant (its top-left corner lies on the top row or left column, so its centre is
at least half the scene away). 2-way, chance 1/2 (targets balanced).
Needs vision: both options look like the same scene; only edge and colour continuity across
the images decides, which is hard to verbalise.
Train scenes: 6 shapes with a shading gradient; test scenes: 9 smaller shapes, no gradient.
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "jigsaw"
N_IMAGES = 3
CHOICES = LETTER_IDS[:2]
CHANCE = 1 / 2


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    h = size // 2
    for _ in retries():
        if split == "train":
            scene = render.textured_scene(rng, size, n_shapes=6, gradient=True)
        else:
            scene = render.textured_scene(rng, size, n_shapes=9, gradient=False)
        gold = scene[h:, h:].copy()
        # the distractor's top-left corner lies on the top row (y = 0) or left column (x = 0)
        off = int(rng.integers(0, h + 1))
        y, x = (0, off) if rng.random() < 0.5 else (off, 0)
        distract = scene[y : y + h, x : x + h].copy()
        # options must differ visibly (flat scenes can repeat a patch)
        if np.abs(gold.astype(int) - distract.astype(int)).mean() > 8:
            break
    masked = scene.copy()
    masked[h:, h:] = 0
    opts = [gold, distract] if target == 0 else [distract, gold]
    images = np.stack([masked] + [render.upscale(o, 2) for o in opts])
    prompt = encode(f"jigsaw which image fits missing quadrant ? {options(2)}")
    return Record(
        NAME,
        images,
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"scene": scene, "distractor_yx": (y, x)},
    )
