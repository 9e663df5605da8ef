"""Retrieval: visibility sets, intersections, Hungarian assignment, top-K with a threshold."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from spatia import geometry as geo
from spatia import retrieval

from . import references

H, W = 32, 48


@pytest.fixture(scope="module")
def world():
    """Six textured walls ("panels") on a circle of radius 4 m around the origin, 60 deg apart,
    each a random 3D patch, seen by cameras at the centre looking at chosen azimuths."""
    rng = np.random.default_rng(0)
    pts, panel = [], []
    for k in range(6):
        a = np.radians(60 * k)
        centre = np.array([4 * np.cos(a), 4 * np.sin(a), 1.5])
        tang = np.array([-np.sin(a), np.cos(a), 0.0])
        s = rng.uniform(-1.0, 1.0, (1500, 2))
        depth_jitter = rng.uniform(-0.3, 0.3, (1500, 1)) * np.array([np.cos(a), np.sin(a), 0])
        pts.append(centre + s[:, :1] * tang + s[:, 1:] * np.array([0, 0, 1.0]) + depth_jitter)
        panel.append(np.full(1500, k))
    xyz = np.concatenate(pts).astype(np.float32)
    intr = geo.intrinsics_from_fov(H, W, 50.0)

    def cam(deg, shift=(0.0, 0.0)):
        a = np.radians(deg)
        eye = np.array([shift[0], shift[1], 1.5])
        return geo.look_at(eye, eye + np.array([np.cos(a), np.sin(a), 0.0]))

    return xyz, np.concatenate(panel), intr, cam


def test_visibility_sets_match_the_brute_force_zbuffer(world):
    xyz, _, intr, cam = world
    cams = jnp.stack([cam(0), cam(95)])
    vis = np.asarray(retrieval.visibility_sets(xyz, None, cams, intr, height=H, width=W))
    for t in range(2):
        ref = references.reference_zbuffer(xyz, np.zeros((len(xyz), 1)), None, cams[t], intr, H, W)
        np.testing.assert_array_equal(vis[t], ref["visible"])
    assert vis.any(1).all()


def test_intersection_and_iou_matrices(rng):
    a = rng.uniform(size=(4, 500)) < 0.3
    b = rng.uniform(size=(6, 500)) < 0.4
    inter = np.asarray(retrieval.intersection_matrix(a, b))
    np.testing.assert_array_equal(inter, a.astype(int) @ b.T.astype(int))
    iou = np.asarray(retrieval.iou_matrix(a, b))
    union = (a[:, None] | b[None]).sum(-1)
    np.testing.assert_allclose(iou, inter / union, rtol=1e-6)


def test_hungarian_is_optimal(rng):
    s = rng.integers(0, 100, (4, 6))
    rows, cols = retrieval.hungarian(s)
    best = max(sum(s[i, p[i]] for i in range(4)) for p in itertools.permutations(range(6), 4))
    assert s[rows, cols].sum() == best and len(set(cols)) == 4


def test_retrieval_picks_the_frames_that_see_the_same_points(world):
    xyz, panel, intr, cam = world
    # history frames: each looks at one panel (0..5), plus one looking between panels 1 and 2 and
    # one looking at the empty floor direction (sees nothing)
    hist = jnp.stack([cam(60 * k) for k in range(6)] + [cam(90), cam(0, (0.0, 0.0))])
    hist = hist.at[7].set(geo.look_at([0.0, 0.0, 1.5], [0.0, 0.0, -5.0], up=(1.0, 0.0, 0.0)))
    # targets: near-copies of the views of panels 4, 1 and 2 (slightly shifted cameras)
    targets = jnp.stack([cam(240, (0.2, 0.1)), cam(62, (-0.1, 0.0)), cam(118, (0.0, 0.2))])
    vh = retrieval.visibility_sets(xyz, None, hist, intr, height=H, width=W)
    vt = retrieval.visibility_sets(xyz, None, targets, intr, height=H, width=W)
    # sanity of the construction: each panel view sees (only) its panel
    seen = [set(np.unique(panel[np.asarray(vh[k])]).tolist()) for k in range(6)]
    assert all(seen[k] == {k} for k in range(6)) and not np.asarray(vh[7]).any()
    sel = retrieval.select_references(vt, vh, 7)
    np.testing.assert_array_equal(sel.targets, [0, 1, 2])
    np.testing.assert_array_equal(sel.candidates, [4, 1, 2])
    assert (sel.intersection > 100).all()
    # K caps the number; order="score" keeps the best IoU first
    top1 = retrieval.select_references(vt, vh, 1, order="score")
    assert len(top1.candidates) == 1 and top1.iou[0] == sel.iou.max()
    # threshold variant (Algorithm 1): a target that sees nothing new gets no reference
    empty_target = jnp.stack([targets[0], hist[7]])
    vt2 = retrieval.visibility_sets(xyz, None, empty_target, intr, height=H, width=W)
    for method in ("hungarian", "greedy"):
        s2 = retrieval.select_references(vt2, vh, 7, eps=0.05, method=method)
        np.testing.assert_array_equal(s2.candidates, [4])
    # a huge epsilon removes everything
    assert len(retrieval.select_references(vt, vh, 7, eps=0.999).candidates) == 0


def test_greedy_merges_duplicates_and_official_indices(world):
    xyz, _, intr, cam = world
    hist = jnp.stack([cam(0), cam(120), cam(240)])
    targets = jnp.stack([cam(2), cam(-3), cam(118)])  # two targets want the same history frame
    vh = retrieval.visibility_sets(xyz, None, hist, intr, height=H, width=W)
    vt = retrieval.visibility_sets(xyz, None, targets, intr, height=H, width=W)
    greedy = retrieval.select_references(vt, vh, 7, method="greedy")
    np.testing.assert_array_equal(np.sort(greedy.candidates), [0, 1])
    hung = retrieval.select_references(vt, vh, 7, method="hungarian")
    assert len(set(hung.candidates.tolist())) == len(hung.candidates)
    t, c = retrieval.official_view_indices(81, 121)
    np.testing.assert_array_equal(t, [0, 12, 24, 36, 48, 60, 72])
    assert c[-1] < 121 - 9 and np.all(np.diff(c) == 4)
    with pytest.raises(ValueError, match="method"):
        retrieval.select_references(vt, vh, 7, method="iou")
