"""Task generators: deterministic per seed, answers correct by construction (checked with
independent computations), balanced answers, and no text-only shortcut."""

from collections import Counter, defaultdict

import numpy as np
import pytest
from scipy import ndimage

from lir.tasks import PRETRAIN_NAMES, TASK_NAMES, generate, get_task, render
from lir.tasks.relative_reflectance import luminance
from lir.tasks.vocab import COLOURS, LETTERS, TOKENS, decode

SIZE = 32


@pytest.mark.parametrize("name", TASK_NAMES + PRETRAIN_NAMES)
def test_deterministic_and_well_formed(name):
    spec = get_task(name)
    a = generate(name, 6, seed=3, split="train", size=SIZE)
    b = generate(name, 6, seed=3, split="train", size=SIZE)
    c = generate(name, 6, seed=4, split="train", size=SIZE)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.images, rb.images)
        np.testing.assert_array_equal(ra.prompt, rb.prompt)
        assert ra.answer.tolist() == rb.answer.tolist()
    assert any(not np.array_equal(ra.images, rc.images) for ra, rc in zip(a, c, strict=True))
    for r in a + generate(name, 3, seed=3, split="test", size=48):
        assert r.images.dtype == np.uint8 and r.images.shape[0] == spec.n_images
        assert r.images.shape[1:3] in ((SIZE, SIZE), (48, 48)) and r.images.shape[3] == 3
        assert r.answer[0] == r.choices[r.target] and r.answer[0] in spec.choices
        assert r.prompt.dtype == np.int32 and len(r.prompt) <= 12


def _records(name, n=12, split="train"):
    return generate(name, n, seed=11, split=split, size=SIZE)


@pytest.mark.parametrize("split", ["train", "test"])
def test_counting_by_connected_components(split):
    for r in _records("counting", split=split):
        colour = r.meta["colour"]
        hit = np.all(r.images[0] == render.PALETTE[colour], axis=-1)
        n = ndimage.label(hit, structure=np.ones((3, 3)))[1]
        assert TOKENS[r.answer[0]] == str(n)


def test_jigsaw_gold_is_removed_quadrant():
    for r in _records("jigsaw"):
        h = SIZE // 2
        masked, opts = r.images[0], r.images[1:]
        assert (masked[h:, h:] == 0).all()
        # reconstruct the scene's missing quadrant from each option (downsample by 2)
        gold = r.meta["scene"][h:, h:]
        match = [np.array_equal(o[::2, ::2], gold) for o in opts]
        assert match == [r.target == 0, r.target == 1]
        assert np.array_equal(r.meta["scene"][:h, :], masked[:h, :])


def _iou(a, b):
    ya, xa = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    ya[a[0] : a[2] + 1, a[1] : a[3] + 1] = True
    xa[b[0] : b[2] + 1, b[1] : b[3] + 1] = True
    return (ya & xa).sum() / (ya | xa).sum()


@pytest.mark.parametrize("split", ["train", "test"])
def test_localization_gold_box_is_tight(split):
    recs = _records("localization", n=20, split=split)
    exact_outline = 0
    for r in recs:
        img = r.images[0]
        letter = LETTERS[r.target]
        gold = tuple(r.meta["boxes"][letter])
        other = r.meta["boxes"]["B" if letter == "A" else "A"]
        assert 0.2 <= _iou(gold, other) <= 0.5
        # the object's extent (from its mask before the outlines were drawn) is the gold box
        # shrunk by one pixel; the visible object pixels are that object
        ys, xs = np.nonzero(r.meta["object_mask"])
        assert (ys.min() - 1, xs.min() - 1, ys.max() + 1, xs.max() + 1) == gold
        visible = np.all(img == render.PALETTE[r.meta["colour"]], axis=-1)
        assert not (visible & ~r.meta["object_mask"]).any()
        assert visible.sum() >= 0.7 * r.meta["object_mask"].sum()
        # the outline drawn in the answer's marker colour is the gold box
        yy, xx = np.nonzero(np.all(img == render.MARKERS[letter], axis=-1))
        exact_outline += (yy.min(), xx.min(), yy.max(), xx.max()) == gold
    assert exact_outline >= 0.85 * len(recs)


@pytest.mark.parametrize("split", ["train", "test"])
def test_visual_correspondence_marker_follows_shift(split):
    for r in _records("visual_correspondence", split=split):
        ref = np.array(render.find_marker(r.images[0], "REF"))
        ans = np.array(render.find_marker(r.images[1], LETTERS[r.target]))
        np.testing.assert_allclose(ans + r.meta["shift"], ref, atol=1.0)
        # the scene under the REF marker matches image 2 at the answer up to brightness
        for name in "ABCD":
            if name != LETTERS[r.target]:
                other = np.array(render.find_marker(r.images[1], name))
                assert np.hypot(*(other - ans)) >= SIZE / 4 - 1


@pytest.mark.parametrize(
    "name,key1,key2",
    [
        ("semantic_correspondence", "parts1", "parts2"),
        ("functional_correspondence", "kp1", "kp2"),
    ],
)
def test_part_correspondences(name, key1, key2):
    for r in _records(name, split="test"):
        if name == "semantic_correspondence":
            k1, k2 = r.meta["parts1"][r.meta["part"]], r.meta["parts2"][r.meta["part"]]
        else:
            from lir.tasks.functional_correspondence import KEYPOINTS

            i = KEYPOINTS.index(r.meta["keypoint"])
            k1, k2 = r.meta[key1][i], r.meta[key2][i]
        ref = np.array(render.find_marker(r.images[0], "REF"))
        ans = np.array(render.find_marker(r.images[1], LETTERS[r.target]))
        assert np.hypot(*(ref - k1)) <= 1.0 and np.hypot(*(ans - k2)) <= 1.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_reflectance_label_from_albedo(split):
    for r in _records("relative_reflectance", n=24, split=split):
        # even-sided rings are centred half a pixel before the marked pixel
        pa = np.floor(np.array(render.find_marker(r.images[0], "A")) + 0.5).astype(int)
        pb = np.floor(np.array(render.find_marker(r.images[0], "B")) + 0.5).astype(int)
        ya, yb = luminance(r.meta["albedo"][tuple(pa)]), luminance(r.meta["albedo"][tuple(pb)])
        rel = abs(ya - yb) / max(ya, yb, 1e-8)
        want = "C" if rel <= 0.1 else ("A" if ya < yb else "B")
        assert LETTERS[r.target] == want


def test_visual_similarity_by_independent_metric():
    for split in ("train", "test"):
        for r in _records("visual_similarity", split=split):
            blur = [
                ndimage.uniform_filter(im.astype(np.float64), size=(3, 3, 1), mode="nearest")
                for im in r.images
            ]
            d = [np.sqrt(np.mean((blur[0] - b) ** 2)) for b in blur[1:]]
            assert int(np.argmin(d)) == r.target


def test_art_style_and_control():
    for r in _records("art_style"):
        assert r.meta["candidate_styles"][r.target] == r.meta["ref_style"]
        assert r.meta["candidate_styles"][1 - r.target] != r.meta["ref_style"]
    for r in _records("colour_control", split="test"):
        cy, cx = (int(v) for v in r.meta["centre"])
        assert np.array_equal(r.images[0, cy, cx], render.PALETTE[r.target])
        assert decode(r.answer) == decode(r.choices[r.target])


@pytest.mark.parametrize("name", TASK_NAMES + PRETRAIN_NAMES)
def test_balanced_and_no_text_shortcut(name):
    spec = get_task(name)
    n = 8 * spec.n_choices * 3
    train = generate(name, n, seed=0, split="train", size=SIZE)
    counts = Counter(r.target for r in train)
    w = (
        np.full(spec.n_choices, 1 / spec.n_choices)
        if spec.class_weights is None
        else np.array(spec.class_weights)
    )
    for c in range(spec.n_choices):
        assert abs(counts[c] - w[c] * n) <= 1
    # a text-only classifier (majority answer per exact prompt) does no better than the
    # best constant guess on fresh examples
    table = defaultdict(Counter)
    for r in train:
        table[r.prompt.tobytes()][r.target] += 1
    test = generate(name, n, seed=1, split="train", size=SIZE)
    hits = [
        table[r.prompt.tobytes()].most_common(1)[0][0] == r.target
        if r.prompt.tobytes() in table
        else False
        for r in test
    ]
    assert np.mean(hits) <= max(w) + 0.12


def _under(img, name):
    # even-sided rings are centred half a pixel before the marked pixel
    y, x = np.floor(np.array(render.find_marker(img, name)) + 0.5).astype(int)
    return img[y, x]


def test_pretrain_skills_by_pixels():
    for r in _records("ref_colour"):
        assert np.array_equal(_under(r.images[0], "REF"), render.PALETTE[r.target])
    for r in _records("marker_on_colour"):
        queried = COLOURS.index(TOKENS[r.prompt[3]])
        assert np.array_equal(_under(r.images[0], LETTERS[r.target]), render.PALETTE[queried])
    for r in _records("is_there"):
        c = COLOURS.index(TOKENS[r.prompt[2]])
        present = np.all(r.images[0] == render.PALETTE[c], axis=-1).any()
        assert TOKENS[r.answer[0]] == ("yes" if present else "no")
    for r in _records("largest_colour"):
        area = [np.all(r.images[0] == col, axis=-1).sum() for col in render.PALETTE]
        assert int(np.argmax(area)) == r.target
    for r in _records("quadrant_of_colour"):
        c = COLOURS.index(TOKENS[r.prompt[2]])
        h = SIZE // 2
        q = [r.images[0, (i // 2) * h + 1, (i % 2) * h + 1] for i in range(4)]
        assert np.array_equal(q[r.target], render.PALETTE[c])


def test_errors():
    with pytest.raises(ValueError, match="unknown"):
        generate("nope", 1, 0)
    with pytest.raises(ValueError, match="split"):
        generate("counting", 1, 0, split="val")
    with pytest.raises(ValueError, match="image size"):
        generate("counting", 1, 0, size=20)
