"""Visual similarity (analogue of NIGHTS / BLINK): which of two perturbed copies is closer to
the reference?

Three images: a reference scene and two candidates, each the reference under random
perturbations of different strengths. The label is fixed by a metric instead of human
judgement: L2 distance between 3x3 box-blurred images (``blurred_l2``). Examples whose two
distances differ by less than a factor 1.5 are resampled, so the label is unambiguous.
2-way, chance 1/2 (targets balanced).
Needs vision: a global perceptual comparison across three images.
Train perturbations: colour gain + pixel noise + circular shift; test: colour gain + blur +
shift (no noise).
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split, retries
from lir.tasks.vocab import LETTER_IDS, encode, options

NAME = "visual_similarity"
N_IMAGES = 3
CHOICES = LETTER_IDS[:2]
CHANCE = 1 / 2
MIN_RATIO = 1.5


def blurred_l2(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance between 3x3 box-blurred uint8 images [H, W, 3]."""
    return float(np.sqrt(np.mean((render.box_blur(a) - render.box_blur(b)) ** 2)))


def perturb(rng: np.random.Generator, img: np.ndarray, strength: float, split: str):
    """Perturb uint8[H, W, 3] with overall ``strength`` in [0, 1]."""
    x = img.astype(np.float32) * (1 + strength * rng.uniform(-0.5, 0.5, 3))
    shift = int(round(strength * rng.uniform(0, 3)))
    x = np.roll(x, (shift * rng.choice([-1, 1]), shift * rng.choice([-1, 1])), axis=(0, 1))
    if split == "train":
        x = x + rng.normal(0, 40 * strength, x.shape)
    elif strength > 0.3:
        x = render.box_blur(x, 3 if strength < 0.7 else 5)
    return np.clip(x, 20, 235).astype(np.uint8)


def make(rng: np.random.Generator, split: str, size: int, target: int) -> Record:
    check_split(split)
    check_size(size)
    ref = render.textured_scene(rng, size, n_shapes=7, gradient=True)
    for _ in retries():
        s = np.sort(rng.uniform(0.05, 1.0, 2))
        near, far = perturb(rng, ref, s[0], split), perturb(rng, ref, s[1], split)
        dn, df = blurred_l2(ref, near), blurred_l2(ref, far)
        if df >= MIN_RATIO * max(dn, 1e-6):
            break
    cands = [near, far] if target == 0 else [far, near]
    prompt = encode(f"vissim which image similar first ? {options(2)}")
    return Record(
        NAME,
        np.stack([ref] + cands),
        prompt,
        CHOICES[[target]],
        CHOICES,
        int(target),
        {"distances": (dn, df) if target == 0 else (df, dn)},
    )
