"""Sampling of well-separated marker positions (shared by the correspondence tasks)."""

from __future__ import annotations

import numpy as np


def far_points(
    rng: np.random.Generator,
    n: int,
    size: int,
    margin: int,
    min_dist: float,
    avoid=(),
    tries: int = 2000,
) -> np.ndarray:
    """n integer points (y, x) in [margin, size - margin) that are >= min_dist apart from
    each other and from every point of ``avoid``. int[n, 2]; raises if the budget runs out."""
    pts: list[np.ndarray] = []
    fixed = [np.asarray(p, float) for p in avoid]
    for _ in range(tries):
        p = rng.integers(margin, size - margin, 2)
        if all(np.hypot(*(p - q)) >= min_dist for q in fixed + pts):
            pts.append(p)
            if len(pts) == n:
                return np.array(pts, dtype=int)
    raise RuntimeError(f"could not place {n} points {min_dist} px apart in a {size} px image")
