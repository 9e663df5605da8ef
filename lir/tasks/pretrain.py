"""Phase-P skill generators (docs/lir.md D14): generic single-image QA used to pretrain the tiny
LMM before any fine-tuning. None of them is one of the target tasks; they teach the skills
that the target tasks recombine (docs/lir.md D18): reading the surface colour under a
marker (correspondence, reflectance), binding letter markers to places (every A-D task),
colour presence and size (counting, localization), coarse layout (jigsaw, similarity).

Each skill is one image, answer balanced over its choices; train and test splits come from
the same generator (the split argument only seeds a different stream).
"""

from __future__ import annotations

import numpy as np

from lir.tasks import render
from lir.tasks.base import Record, check_size, check_split
from lir.tasks.vocab import COLOUR_IDS, COLOURS, ID, LETTER_IDS, encode

YES_NO = np.array([ID["yes"], ID["no"]], np.int32)


def _regions(rng, size, n_colours):
    """A Voronoi map of distinct palette colours: (uint8 image, int[H, W] colour index)."""
    seeds = rng.uniform(0, size, (n_colours, 2))
    cols = rng.choice(len(COLOURS), n_colours, replace=False)
    yy, xx = np.mgrid[:size, :size] + 0.5
    region = np.argmin(
        (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1
    )
    colour = cols[region]
    return render.PALETTE[colour].copy(), colour


def _point_in(rng, colour_map, c, margin):
    ys, xs = np.nonzero(colour_map[margin:-margin, margin:-margin] == c)
    if len(ys) == 0:
        return None
    i = rng.integers(len(ys))
    return np.array([ys[i] + margin, xs[i] + margin])


def ref_colour(rng, split, size, target) -> Record:
    """Colour of the surface under the REF marker (8-way, chance 1/8)."""
    check_split(split)
    check_size(size)
    margin = render.marker_side(size)
    for _ in range(1000):
        img, cmap = _regions(rng, size, 5)
        if not (cmap == target).any():  # recolour one region so the target colour is present
            other = cmap[tuple(rng.integers(0, size, 2))]
            img[cmap == other] = render.PALETTE[target]
            cmap[cmap == other] = target
        p = _point_in(rng, cmap, target, margin)
        if p is not None:
            break
    else:
        raise RuntimeError("ref_colour: could not place the REF marker")
    render.draw_marker(img, *p, "REF")
    return Record(
        "ref_colour",
        img[None],
        encode("colour under ref ?"),
        COLOUR_IDS[[target]],
        COLOUR_IDS,
        int(target),
        {"point": p},
    )


def marker_on_colour(rng, split, size, target) -> Record:
    """Which of the markers A-D sits on the queried colour (4-way, chance 1/4)."""
    check_split(split)
    check_size(size)
    margin = render.marker_side(size)
    for _ in range(1000):
        img, cmap = _regions(rng, size, 4)
        cols = np.unique(cmap)
        if len(cols) < 4:
            continue
        order = rng.permutation(cols)
        pts = [_point_in(rng, cmap, c, margin) for c in order]
        if all(p is not None for p in pts) and _apart(pts, margin + 1):
            break
    else:
        raise RuntimeError("marker_on_colour: could not place four separated markers")
    for name, p in zip(render.LETTER_MARKERS, pts, strict=True):
        render.draw_marker(img, *p, name)
    queried = int(order[target])
    prompt = encode(f"which marker on {COLOURS[queried]} ?")
    return Record(
        "marker_on_colour",
        img[None],
        prompt,
        LETTER_IDS[[target]],
        LETTER_IDS,
        int(target),
        {"points": np.array(pts)},
    )


def _apart(pts, d):
    pts = np.asarray(pts, float)
    dist = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    return bool((dist[np.triu_indices(len(pts), 1)] >= d).all())


def is_there(rng, split, size, target) -> Record:
    """Is there an object of the queried colour? (yes / no, chance 1/2)."""
    check_split(split)
    check_size(size)
    img = render.canvas(size)
    colour = int(rng.integers(len(COLOURS)))
    others = [c for c in range(len(COLOURS)) if c != colour]
    n = int(rng.integers(1, 5))
    cols = list(rng.choice(others, n, replace=False))
    if target == 0:
        cols[0] = colour
    cell = size // 4
    for c, k in zip(cols, rng.choice(16, n, replace=False), strict=True):
        cy, cx = (k // 4 + 0.5) * cell, (k % 4 + 0.5) * cell
        render.fill_disk(img, cy, cx, cell * 0.42, render.PALETTE[c])
    return Record(
        "is_there",
        img[None],
        encode(f"is there {COLOURS[colour]} ?"),
        YES_NO[[target]],
        YES_NO,
        int(target),
        {},
    )


def largest_colour(rng, split, size, target) -> Record:
    """Colour of the largest of 2-4 squares (8-way, chance 1/8)."""
    check_split(split)
    check_size(size)
    img = render.canvas(size)
    n = int(rng.integers(2, 5))
    cols = [target] + list(rng.choice([c for c in range(8) if c != target], n - 1, replace=False))
    sides = np.sort(rng.choice(np.arange(size // 8, size // 2 + 1), n, replace=False))[::-1]
    half = size // 2
    for c, s, q in zip(cols, sides, rng.permutation(4)[:n], strict=True):
        y0, x0 = (q // 2) * half, (q % 2) * half
        oy, ox = rng.integers(0, half - s + 1, 2)
        render.fill_rect(img, y0 + oy, x0 + ox, y0 + oy + s, x0 + ox + s, render.PALETTE[c])
    return Record(
        "largest_colour",
        img[None],
        encode("colour largest object ?"),
        COLOUR_IDS[[target]],
        COLOUR_IDS,
        int(target),
        {"sides": sides},
    )


def quadrant_of_colour(rng, split, size, target) -> Record:
    """Which quadrant (A top-left, B top-right, C bottom-left, D bottom-right) has the
    queried colour (4-way, chance 1/4)."""
    check_split(split)
    check_size(size)
    cols = rng.choice(len(COLOURS), 4, replace=False)
    img = render.canvas(size)
    h = size // 2
    for q, c in enumerate(cols):
        render.fill_rect(
            img, (q // 2) * h, (q % 2) * h, (q // 2 + 1) * h, (q % 2 + 1) * h, render.PALETTE[c]
        )
    prompt = encode(f"quadrant on {COLOURS[int(cols[target])]} ?")
    return Record(
        "quadrant_of_colour",
        img[None],
        prompt,
        LETTER_IDS[[target]],
        LETTER_IDS,
        int(target),
        {"colours": cols},
    )


# name -> (make, choices, chance)
SKILLS = {
    "ref_colour": (ref_colour, COLOUR_IDS, 1 / 8),
    "marker_on_colour": (marker_on_colour, LETTER_IDS, 1 / 4),
    "is_there": (is_there, YES_NO, 1 / 2),
    "largest_colour": (largest_colour, COLOUR_IDS, 1 / 8),
    "quadrant_of_colour": (quadrant_of_colour, LETTER_IDS, 1 / 4),
}
