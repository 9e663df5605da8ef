"""Reference-frame retrieval by shared visible memory points (Spatia §3.1.2, Alg. 1;
docs/spatia.md D4).

A view's *visibility set* is the set of memory points that are front-most at their 1-px pixel
(``z <= zbuf + 1e-6``, the rule of the official ``frustum_frontmost_mask``). Candidate history
frames are scored against target views by the intersection count of these sets (a matmul of
boolean masks) and assigned one-to-one by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment`` on ``-intersection``, on the host, as in the official
``find_mask_matches``). `select_references` adds the paper's threshold (Algorithm 1: keep a pair
only if the IoU of the two sets exceeds epsilon) and keeps at most K references.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from spatia import render as rnd

__all__ = [
    "Selection",
    "visibility_sets",
    "intersection_matrix",
    "iou_matrix",
    "hungarian",
    "select_references",
    "official_view_indices",
]


class Selection(NamedTuple):
    """Chosen references: ``candidates[i]`` was matched to target view ``targets[i]``.

    All arrays have the same length (<= K): candidate index, target index, intersection count, IoU.
    """

    candidates: np.ndarray
    targets: np.ndarray
    intersection: np.ndarray
    iou: np.ndarray


def visibility_sets(
    xyz,
    valid,
    w2c,
    intr,
    *,
    height: int,
    width: int,
    chunk: int | None = None,
    view_chunk: int | None = 8,
    vis_eps: float = 1e-6,
) -> jnp.ndarray:
    """Per-view front-most masks: xyz [N, 3], valid [N], w2c [V, 4, 4], intr [4] or [V, 4] -> [V, N] bool."""
    xyz = jnp.asarray(xyz)
    dummy = jnp.zeros((xyz.shape[0], 1), jnp.float32)
    out = rnd.render_views(
        xyz,
        dummy,
        valid,
        w2c,
        intr,
        height=height,
        width=width,
        mode="point",
        chunk=chunk,
        view_chunk=view_chunk,
        vis_eps=vis_eps,
    )
    return out.visible


def intersection_matrix(vis_a, vis_b) -> jnp.ndarray:
    """Shared visible points: vis_a [A, N], vis_b [B, N] bool -> [A, B] int32 (exact below 2^24)."""
    a = jnp.asarray(vis_a, jnp.float32)
    b = jnp.asarray(vis_b, jnp.float32)
    return jnp.round(jnp.dot(a, b.T, precision="highest")).astype(jnp.int32)


def iou_matrix(vis_a, vis_b) -> jnp.ndarray:
    """IoU of visibility sets: [A, N], [B, N] -> [A, B] float32 (0 where both sets are empty)."""
    inter = intersection_matrix(vis_a, vis_b).astype(jnp.float32)
    na = jnp.sum(jnp.asarray(vis_a), -1).astype(jnp.float32)
    nb = jnp.sum(jnp.asarray(vis_b), -1).astype(jnp.float32)
    union = na[:, None] + nb[None, :] - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


def hungarian(score) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-score one-to-one assignment (host, scipy). score [A, B] -> (rows, cols), rows sorted.

    With A > B only B rows are assigned (the official code requires A <= B; we allow both).
    """
    s = np.asarray(score, np.float64)
    if s.ndim != 2:
        raise ValueError(f"score must be 2-D, got shape {s.shape}")
    rows, cols = linear_sum_assignment(-s)
    return rows, cols


def select_references(
    vis_targets,
    vis_cands,
    k: int,
    *,
    eps: float = 0.0,
    method: str = "hungarian",
    order: str = "target",
) -> Selection:
    """Choose up to ``k`` reference frames among candidates for the target views.

    vis_targets [A, N], vis_cands [B, N] bool visibility sets.
    method "hungarian" (official code): one-to-one assignment maximising the intersection count;
    method "greedy" (paper's Algorithm 1): each target takes its highest-IoU candidate; duplicates
    are merged (the union of kept frames). A pair is kept only if IoU > ``eps`` (eps = 0: any
    overlap) and intersection > 0. order "target" keeps the first ``k`` pairs in target order (as
    the official code does), "score" the ``k`` with the highest IoU.
    """
    if method not in ("hungarian", "greedy"):
        raise ValueError(f"method must be 'hungarian' or 'greedy', got {method!r}")
    if order not in ("target", "score"):
        raise ValueError(f"order must be 'target' or 'score', got {order!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    inter = np.asarray(intersection_matrix(vis_targets, vis_cands))
    iou = np.asarray(iou_matrix(vis_targets, vis_cands))
    if method == "hungarian":
        rows, cols = hungarian(inter)
    else:
        rows = np.arange(inter.shape[0])
        cols = np.argmax(iou, axis=1)
        _, first = np.unique(cols, return_index=True)  # union: keep each candidate once
        keep_first = np.zeros(len(cols), bool)
        keep_first[first] = True
        rows, cols = rows[keep_first], cols[keep_first]
    pair_iou = iou[rows, cols]
    pair_inter = inter[rows, cols]
    keep = (pair_iou > eps) & (pair_inter > 0)
    rows, cols, pair_iou, pair_inter = rows[keep], cols[keep], pair_iou[keep], pair_inter[keep]
    idx = (
        np.argsort(-pair_iou, kind="stable")
        if order == "score"
        else np.argsort(rows, kind="stable")
    )
    idx = idx[:k]
    return Selection(cols[idx], rows[idx], pair_inter[idx], pair_iou[idx])


def official_view_indices(
    n_new: int, n_hist: int, *, hist_frames: int = 9, target_stride: int = 12, cand_stride: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Target and candidate frame indices of the official ``select_reference_frames``.

    Targets: the new clip's frames at stride 12 (2 fps at 24 fps); candidates: history frames
    except the last ``hist_frames`` (the temporal context), at stride 4 (6 fps).
    """
    targets = np.arange(0, n_new, target_stride)
    cands = np.arange(0, max(n_hist - hist_frames, 0), cand_stride)
    return targets, cands
