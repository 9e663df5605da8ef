"""Records -> fixed-shape batches for the tiny LMM (host-side NumPy).

Physical token layout of every sequence (one row of a batch), with M image slots of N patch
tokens each, a prompt region of P slots, K latent slots and A answer tokens:

  idx  0                    <bos>                             SYSTEM
       1 + j(N+2) ...       <vs> <img>xN <ve>   (image j)     IMAGE   (PAD if image j absent)
       p0 = 1 + M(N+2)      prompt, right-aligned in P slots  PROMPT  (left slots PAD)
       l0 = p0 + P          K latent slots (token id PAD)     LATENT
       t0 = l0 + K          <ans>  (assistant header)         TAIL
       t0 + 1 ...           answer tokens                     ANSWER

With ``latent_placement="before_prompt"`` (the "latents before the prompt" ablation,
LIVR §4.4.3 / docs/lir.md D3: after the images, before the question) the K latent slots
come first and the prompt region follows them; every position id stays the same as in the
default placement, so only the causal order changes (the latents can no longer read the
question).

Sequence length ``S = 1 + M(N+2) + P + K + 1 + A``. The answer is predicted at the TAIL
query ``t0`` (next-token prediction), so ``loss_mask`` is 1 exactly at queries whose next
token is an ANSWER token (LIVR §3.2: loss on answer tokens only; docs/lir.md D15: one answer
token predicted at the ANS position).

Position ids (docs/lir.md D15: role-anchored positions that do not depend on K):
every token's position id equals its physical index, except TAIL and ANSWER, which sit after
a reserved latent range of ``max_latents`` ids: ``pos(TAIL) = p0 + P + max_latents`` for
every K <= max_latents. Adding latents therefore never shifts the answer position, so SFT
(K = 0) and LIVR differ only in the method. Deleting the latents equals turning their slots
into PAD (``drop_latents``), which keeps shapes static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lir.masks import Role
from lir.tasks.base import Record
from lir.tasks.vocab import (
    ANSWER_HEADER,
    BOS,
    IMAGE_PAD,
    PAD,
    VISION_END,
    VISION_START,
    VOCAB_SIZE,
)

LATENT_PLACEMENTS = ("after_prompt", "before_prompt")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of a batch. ``num_latents`` (K) slots are present; ``max_latents`` ids
    are reserved for them so the TAIL/answer positions are the same for every K.
    ``latent_placement``: "after_prompt" (default, LIVR §3.2) or "before_prompt"."""

    n_images: int = 3
    image_size: int = 32
    patch_size: int = 8
    max_prompt_len: int = 12
    num_latents: int = 0
    max_latents: int = 16
    answer_len: int = 1
    latent_placement: str = "after_prompt"

    def __post_init__(self):
        if self.latent_placement not in LATENT_PLACEMENTS:
            raise ValueError(
                f"latent_placement must be one of {LATENT_PLACEMENTS}; got "
                f"{self.latent_placement!r}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 0 <= self.num_latents <= self.max_latents:
            raise ValueError(
                f"num_latents must be in [0, max_latents={self.max_latents}]; "
                f"got {self.num_latents}"
            )
        if self.n_images < 1 or self.max_prompt_len < 1 or self.answer_len < 1:
            raise ValueError(f"n_images, max_prompt_len and answer_len must be >= 1: {self}")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def images_end(self) -> int:
        """Physical index (and position id) right after the last image block."""
        return 1 + self.n_images * (self.tokens_per_image + 2)

    @property
    def prompt_start(self) -> int:
        """Physical index of the first prompt slot."""
        if self.latent_placement == "before_prompt":
            return self.images_end + self.num_latents
        return self.images_end

    @property
    def latent_start(self) -> int:
        """Physical index of the first latent slot."""
        if self.latent_placement == "before_prompt":
            return self.images_end
        return self.images_end + self.max_prompt_len

    @property
    def latent_position_start(self) -> int:
        """Position id of latent 0 (the reserved range has ``max_latents`` ids)."""
        return self.images_end + self.max_prompt_len

    @property
    def tail_index(self) -> int:
        """Physical index of the TAIL token (the query that predicts the first answer token)."""
        return self.images_end + self.max_prompt_len + self.num_latents

    @property
    def tail_position(self) -> int:
        """Position id of the TAIL token; independent of ``num_latents`` and placement."""
        return self.latent_position_start + self.max_latents

    @property
    def seq_len(self) -> int:
        return self.tail_index + 1 + self.answer_len

    def replace(self, **kw) -> Layout:
        return dataclasses.replace(self, **kw)


class Batch(NamedTuple):
    """A fixed-shape batch (NumPy on the host; the same pytree of jax arrays on device).

    tokens:      int32[B, S] token ids (vocab.py); PAD at pads and latent slots.
    roles:       int32[B, S] ``lir.masks.Role`` ids.
    positions:   int32[B, S] position ids (see the module docstring); 0 at pads.
    image_slots: int32[B, S] index j * N + p of the image-patch feature placed at this token
                 (patch p of image j), -1 elsewhere.
    image_ids:   int32[B, S] image index j for every token of image j's block (markers
                 included), -1 elsewhere; selects the image-index embedding.
    latent_ids:  int32[B, S] latent index 0..K-1 at latent slots, -1 elsewhere.
    images:      uint8[B, M, H, W, 3] (zeros for absent images).
    image_valid: bool[B, M].
    targets:     int32[B, S] next-token targets (``tokens`` shifted left; PAD at the end).
    loss_mask:   float32[B, S] 1 where the next token is an answer token.
    answer_index: int32[B] physical index of the query that predicts the first answer token.
    answer:      int32[B] the first gold answer token.
    choice_mask: bool[B, V] the valid answer tokens of each example (evaluation argmax).
    """

    tokens: np.ndarray
    roles: np.ndarray
    positions: np.ndarray
    image_slots: np.ndarray
    image_ids: np.ndarray
    latent_ids: np.ndarray
    images: np.ndarray
    image_valid: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    answer_index: np.ndarray
    answer: np.ndarray
    choice_mask: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


def _check_record(i: int, r: Record, layout: Layout) -> None:
    n, h, w, c = r.images.shape
    if n > layout.n_images:
        raise ValueError(
            f"record {i} ({r.task}) has {n} images; layout allows n_images={layout.n_images}"
        )
    if (h, w, c) != (layout.image_size, layout.image_size, 3):
        raise ValueError(
            f"record {i} ({r.task}) images have shape {(h, w, c)}; expected "
            f"{(layout.image_size, layout.image_size, 3)}"
        )
    if len(r.prompt) > layout.max_prompt_len:
        raise ValueError(
            f"record {i} ({r.task}) prompt has {len(r.prompt)} tokens; layout "
            f"allows max_prompt_len={layout.max_prompt_len}"
        )
    if len(r.answer) != layout.answer_len:
        raise ValueError(
            f"record {i} ({r.task}) answer has {len(r.answer)} tokens; expected "
            f"answer_len={layout.answer_len}"
        )


def _row_template(layout: Layout):
    """Token/role/position/slot rows shared by every example (before per-record fields)."""
    s, n = layout.seq_len, layout.tokens_per_image
    tokens = np.full(s, PAD, np.int32)
    roles = np.full(s, Role.PAD, np.int32)
    slots = np.full(s, -1, np.int32)
    img_ids = np.full(s, -1, np.int32)
    lat_ids = np.full(s, -1, np.int32)
    tokens[0], roles[0] = BOS, Role.SYSTEM
    for j in range(layout.n_images):
        a = 1 + j * (n + 2)
        tokens[a], tokens[a + 1 : a + 1 + n], tokens[a + 1 + n] = (
            VISION_START,
            IMAGE_PAD,
            VISION_END,
        )
        slots[a + 1 : a + 1 + n] = j * n + np.arange(n)
        img_ids[a : a + n + 2] = j
    l0, k = layout.latent_start, layout.num_latents
    roles[l0 : l0 + k] = Role.LATENT
    lat_ids[l0 : l0 + k] = np.arange(k)
    t0 = layout.tail_index
    tokens[t0], roles[t0] = ANSWER_HEADER, Role.TAIL
    roles[t0 + 1 :] = Role.ANSWER
    # role-anchored positions: system and images at their index, prompt slots at
    # images_end + i, latents in their reserved range, TAIL/answer after the whole range
    positions = np.arange(s, dtype=np.int32)
    e, p0, pmax = layout.images_end, layout.prompt_start, layout.max_prompt_len
    positions[p0 : p0 + pmax] = e + np.arange(pmax)
    positions[l0 : l0 + k] = layout.latent_position_start + np.arange(k)
    positions[t0:] = layout.tail_position + np.arange(s - t0)
    return tokens, roles, positions, slots, img_ids, lat_ids


def collate(records: Sequence[Record], layout: Layout) -> Batch:
    """Stack records into one fixed-shape :class:`Batch` (NumPy). Shapes in ``Batch``."""
    if not records:
        raise ValueError("collate needs at least one record")
    b, m, n = len(records), layout.n_images, layout.tokens_per_image
    tok0, role0, pos0, slot0, img0, lat0 = _row_template(layout)
    tokens = np.tile(tok0, (b, 1))
    roles = np.tile(role0, (b, 1))
    positions = np.tile(pos0, (b, 1))
    slots, img_ids, lat_ids = (np.tile(x, (b, 1)) for x in (slot0, img0, lat0))
    hw = layout.image_size
    images = np.zeros((b, m, hw, hw, 3), np.uint8)
    valid = np.zeros((b, m), bool)
    choice_mask = np.zeros((b, VOCAB_SIZE), bool)
    p0, pmax, t0 = layout.prompt_start, layout.max_prompt_len, layout.tail_index
    for i, r in enumerate(records):
        _check_record(i, r, layout)
        k = r.images.shape[0]
        images[i, :k] = r.images
        valid[i, :k] = True
        for j in range(k):
            a = 1 + j * (n + 2)
            roles[i, a : a + n + 2] = Role.IMAGE
        for j in range(k, m):  # absent image slots are padding, invisible to everyone
            a = 1 + j * (n + 2)
            tokens[i, a : a + n + 2] = PAD
            slots[i, a : a + n + 2] = -1
            img_ids[i, a : a + n + 2] = -1
            positions[i, a : a + n + 2] = 0
        lp = len(r.prompt)
        tokens[i, p0 + pmax - lp : p0 + pmax] = r.prompt
        roles[i, p0 + pmax - lp : p0 + pmax] = Role.PROMPT
        positions[i, p0 : p0 + pmax - lp] = 0
        tokens[i, t0 + 1 :] = r.answer
        choice_mask[i, r.choices] = True
    positions[roles == Role.PAD] = 0
    targets = np.concatenate([tokens[:, 1:], np.full((b, 1), PAD, np.int32)], axis=1)
    loss_mask = np.concatenate([roles[:, 1:] == Role.ANSWER, np.zeros((b, 1), bool)], axis=1)
    return Batch(
        tokens,
        roles,
        positions,
        slots,
        img_ids,
        lat_ids,
        images,
        valid,
        targets,
        loss_mask.astype(np.float32),
        np.full(b, t0, np.int32),
        tokens[:, t0 + 1].copy(),
        choice_mask,
    )


def drop_latents(batch: Batch) -> Batch:
    """The "latents removed at evaluation" diagnostic with static shapes: latent slots become
    PAD (never attended, docs/lir.md D4 padding rule). Because position ids do not depend on K,
    this equals deleting the latent tokens from the sequence. Works on NumPy or jax arrays."""
    is_lat = batch.roles == Role.LATENT
    xp = np if isinstance(batch.roles, np.ndarray) else _jnp()
    return batch._replace(
        roles=xp.where(is_lat, int(Role.PAD), batch.roles),
        latent_ids=xp.where(is_lat, -1, batch.latent_ids),
        positions=xp.where(is_lat, 0, batch.positions),
    )


def _jnp():
    import jax.numpy as jnp

    return jnp


def take(batch: Batch, idx) -> Batch:
    """Rows ``idx`` (int array) of every field."""
    return Batch(*(x[idx] for x in batch))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Deterministic permutation of range(n) for (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(
    data: Batch, batch_size: int, seed: int, epoch: int, drop_remainder: bool = True
):
    """Yield shuffled fixed-size batches of ``data`` for one epoch. With
    ``drop_remainder=False`` the last batch is padded by repeating rows, and its extra rows
    get ``loss_mask`` 0 and ``weight`` 0 (yields ``(batch, weight float32[batch_size])``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = epoch_order(data.batch_size, seed, epoch)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        weight = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            if drop_remainder:
                return
            weight[len(idx) :] = 0
            idx = np.concatenate([idx, np.resize(order, batch_size - len(idx))])
        out = take(data, idx)
        yield out._replace(loss_mask=out.loss_mask * weight[:, None]), weight


def layout_for(
    records: Sequence[Record],
    image_size: int,
    patch_size: int,
    num_latents: int = 0,
    max_latents: int = 16,
    max_prompt_len: int = 12,
    n_images: int | None = None,
) -> Layout:
    """A :class:`Layout` large enough for ``records`` (n_images = the most any record has,
    unless given)."""
    if n_images is None:
        n_images = max(r.images.shape[0] for r in records)
    return Layout(
        n_images=n_images,
        image_size=image_size,
        patch_size=patch_size,
        max_prompt_len=max_prompt_len,
        num_latents=num_latents,
        max_latents=max_latents,
        answer_len=len(records[0].answer),
    )
