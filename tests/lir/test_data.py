"""Batch layout: roles, positions (latents never shift the answer), loss mask, image slots."""

import numpy as np
import pytest

from lir.data import Layout, collate, drop_latents, iterate_batches, layout_for
from lir.masks import Role, roles_to_string
from lir.tasks import generate
from lir.tasks.vocab import ANSWER_HEADER, IMAGE_PAD, PAD, VISION_END, VISION_START


@pytest.fixture(scope="module")
def records():
    # a 2-image task and a 1-image task in one batch (multi-task batches pad image slots)
    return generate("visual_correspondence", 2, 0, size=32) + generate("counting", 1, 0, size=32)


def lay(k, max_latents=4):
    return Layout(
        n_images=2,
        image_size=32,
        patch_size=8,
        max_prompt_len=12,
        num_latents=k,
        max_latents=max_latents,
    )


def test_roles_tokens_and_targets(records):
    b = collate(records, lay(3))
    n = 16
    assert b.tokens.shape == (3, lay(3).seq_len) == (3, 1 + 2 * (n + 2) + 12 + 3 + 1 + 1)
    p = len(records[0].prompt)
    want = "S" + ("I" * (n + 2)) * 2 + "_" * (12 - p) + "P" * p + "LLL" + "TA"
    assert roles_to_string(b.roles[0]) == want
    pc = len(records[2].prompt)
    assert roles_to_string(b.roles[2]) == (
        "S" + "I" * (n + 2) + "_" * (n + 2) + "_" * (12 - pc) + "P" * pc + "LLLTA"
    )
    t0 = lay(3).tail_index
    assert (b.tokens[:, t0] == ANSWER_HEADER).all() and (b.answer_index == t0).all()
    # only the TAIL query carries loss, and its target is the gold answer token
    assert (b.loss_mask.sum(1) == 1).all() and (b.loss_mask[:, t0] == 1).all()
    np.testing.assert_array_equal(b.targets[:, t0], [r.answer[0] for r in records])
    np.testing.assert_array_equal(b.answer, [r.answer[0] for r in records])
    # latent slots carry the PAD token id, never a vocabulary token
    assert (b.tokens[b.roles == Role.LATENT] == PAD).all()
    np.testing.assert_array_equal(b.latent_ids[0][b.roles[0] == Role.LATENT], [0, 1, 2])
    for i, r in enumerate(records):
        assert b.choice_mask[i].sum() == len(r.choices) and b.choice_mask[i, r.answer[0]]


def test_image_slots(records):
    b = collate(records, lay(0))
    n = 16
    row = b.tokens[0]
    for j in range(2):
        a = 1 + j * (n + 2)
        assert row[a] == VISION_START and row[a + n + 1] == VISION_END
        assert (row[a + 1 : a + 1 + n] == IMAGE_PAD).all()
        np.testing.assert_array_equal(b.image_slots[0, a + 1 : a + 1 + n], j * n + np.arange(n))
        assert (b.image_ids[0, a : a + n + 2] == j).all()
    assert (b.image_slots[0][b.roles[0] != Role.IMAGE] == -1).all()
    # the counting record has one image: its second slot is padding, invisible and invalid
    assert b.image_valid[2].tolist() == [True, False] and (b.images[2, 1] == 0).all()
    assert (b.image_slots[2, 1 + n + 2 : 1 + 2 * (n + 2)] == -1).all()
    np.testing.assert_array_equal(b.images[0], records[0].images)


def test_latents_do_not_shift_positions(records):
    b0, b4 = collate(records, lay(0)), collate(records, lay(4))
    # same position ids for every non-latent token, in order; TAIL/answer included
    for i in range(3):
        keep0 = b0.roles[i] != Role.PAD
        keep4 = (b4.roles[i] != Role.PAD) & (b4.roles[i] != Role.LATENT)
        np.testing.assert_array_equal(b0.positions[i][keep0], b4.positions[i][keep4])
        np.testing.assert_array_equal(b0.roles[i][keep0], b4.roles[i][keep4])
    t0, t4 = lay(0).tail_index, lay(4).tail_index
    assert t4 == t0 + 4
    assert (b0.positions[:, t0] == b4.positions[:, t4]).all()
    assert (b0.positions[:, t0] == lay(0).tail_position).all()
    # latent positions sit in their reserved range, between the prompt and the TAIL
    lat = b4.positions[0][b4.roles[0] == Role.LATENT]
    assert lat.min() > b4.positions[0][b4.roles[0] == Role.PROMPT].max()
    assert lat.max() < b4.positions[0, t4]


def test_latents_before_prompt(records):
    after = collate(records, lay(3))
    before = collate(
        records,
        Layout(
            n_images=2,
            image_size=32,
            patch_size=8,
            max_prompt_len=12,
            num_latents=3,
            max_latents=4,
            latent_placement="before_prompt",
        ),
    )
    n, p = 16, len(records[0].prompt)
    assert roles_to_string(before.roles[0]) == (
        "S" + ("I" * (n + 2)) * 2 + "LLL" + "_" * (12 - p) + "P" * p + "TA"
    )
    # the same tokens carry the same position ids in both placements; only the order differs
    for role in (Role.PROMPT, Role.LATENT, Role.TAIL, Role.ANSWER):
        np.testing.assert_array_equal(
            after.positions[after.roles == role], before.positions[before.roles == role]
        )
        np.testing.assert_array_equal(
            after.tokens[after.roles == role], before.tokens[before.roles == role]
        )
    assert (before.answer_index == after.answer_index).all()
    with pytest.raises(ValueError, match="latent_placement"):
        Layout(latent_placement="middle")


def test_drop_latents_equals_pad(records):
    b = drop_latents(collate(records, lay(4)))
    assert not (b.roles == Role.LATENT).any() and (b.latent_ids == -1).all()


def test_errors_and_iteration(records):
    with pytest.raises(ValueError, match="images"):
        collate(records, Layout(n_images=1, image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="images have shape"):
        collate(records, Layout(n_images=2, image_size=48, patch_size=8))
    with pytest.raises(ValueError, match="max_prompt_len"):
        collate(records, Layout(n_images=2, image_size=32, patch_size=8, max_prompt_len=2))
    with pytest.raises(ValueError, match="num_latents"):
        Layout(num_latents=5, max_latents=4)
    assert layout_for(records, 32, 8).n_images == 2
    data = collate(
        generate("counting", 10, 0, size=32), Layout(n_images=1, image_size=32, patch_size=8)
    )
    e0 = [b.answer.tolist() for b, _ in iterate_batches(data, 4, seed=1, epoch=0)]
    assert len(e0) == 2 and e0 == [b.answer.tolist() for b, _ in iterate_batches(data, 4, 1, 0)]
    e1 = [b.answer.tolist() for b, _ in iterate_batches(data, 4, seed=1, epoch=1)]
    assert e0 != e1
    last = list(iterate_batches(data, 4, 1, 0, drop_remainder=False))[-1]
    assert last[1].tolist() == [1, 1, 0, 0] and last[0].loss_mask[2:].sum() == 0
