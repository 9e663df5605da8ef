"""LIVR attention masks as pure functions of per-token roles.

Every function maps a role array ``roles: int[B, S]`` (values from :class:`Role`) to a
boolean mask ``bool[B, 1, S, S]`` where ``mask[b, 0, q, k]`` is True when query position
``q`` may attend to key position ``k``. Positions are *physical* sequence indices, so
"causal" means ``k <= q`` in array order (position ids such as RoPE indices are never
consulted: docs/lir.md D4, the mask does not change position ids).

Rules shared by every variant (docs/lir.md D4):

* causal: ``k <= q``;
* padding: a non-PAD query never attends to a PAD key; a PAD query attends only to itself
  (the diagonal), so its softmax row is defined (no NaN) and nothing reads from it;
* the diagonal of every non-PAD row stays open in every variant, because no variant blocks
  a role from its own role except where the key is an image and the query is not.

Variants (what is blocked *in addition* to causality and padding; LIVR §3.2, §4.4.2 and
Table 4(a)):

=============================== ==============================================================
``"causal"``                    nothing. Stage 2, direct SFT, latents-only, default inference.
``"bottleneck"``                image keys for SYSTEM, PROMPT, TAIL and ANSWER queries: the
                                Stage-1 visual bottleneck ("Ans+Prompt->Vis", the default).
                                Only IMAGE and LATENT queries may have IMAGE keys, so the
                                image reaches the answer only through the latents.
``"answer_only"``               image keys for TAIL and ANSWER queries only ("Ans->Vis only";
                                with K = 0 this is the "mask only (no latents)" arm). Prompt
                                tokens still see the image and act as the bottleneck.
``"bottleneck_no_latent_prompt"`` the default bottleneck plus PROMPT keys for LATENT queries
                                ("Ours + Latent->Prompt": latents cannot read the question).
=============================== ==============================================================

Aliases: ``"stage1"`` = ``"test_time_bottleneck"`` = ``"bottleneck"`` (the test-time
bottleneck diagnostic is the Stage-1 mask applied at evaluation), ``"stage2"`` = ``"causal"``,
``"mask_only"`` = ``"answer_only"``. The "drop latents" diagnostic is not a mask: see
``lir.data.drop_latents`` (latent slots become PAD, which the padding rule removes exactly).

Why TAIL is its own role: the template tail (the assistant header; docs/lir.md D4) is the
query that predicts the first answer token. The default mask treats it as prompt (blocked from
the image). In ``"answer_only"`` it is blocked together with the answer, because otherwise a
one-token answer would be predicted by a query that sees the image directly and the variant
would equal the causal mask.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np


class Role(enum.IntEnum):
    """Per-token role ids (LIVR §3.2 token groups; docs/lir.md D4 decides which template token
    is which).

    PAD     padding (never attended).
    SYSTEM  the system preamble before all images (``S``).
    IMAGE   image tokens, including the vision start/end markers of every image (``I``;
            pitfall (i): the end marker has seen the whole image, so it must count as image).
    PROMPT  question text and options, and any text between images (``Q``; pitfall (ii)).
    LATENT  the K latent tokens spliced after the prompt (``L``).
    TAIL    the template tail / assistant header between latents and answer (``Q'``).
    ANSWER  answer tokens (``A``; the loss targets).
    """

    PAD = 0
    SYSTEM = 1
    IMAGE = 2
    PROMPT = 3
    LATENT = 4
    TAIL = 5
    ANSWER = 6


_NON_PAD = (Role.SYSTEM, Role.IMAGE, Role.PROMPT, Role.LATENT, Role.TAIL, Role.ANSWER)

# (query role, key role) pairs removed from the causal mask, per variant. Single source of truth.
BLOCKED_PAIRS: dict[str, frozenset[tuple[Role, Role]]] = {
    "causal": frozenset(),
    "bottleneck": frozenset(
        (q, Role.IMAGE) for q in (Role.SYSTEM, Role.PROMPT, Role.TAIL, Role.ANSWER)
    ),
    "answer_only": frozenset((q, Role.IMAGE) for q in (Role.TAIL, Role.ANSWER)),
    "bottleneck_no_latent_prompt": frozenset(
        [(q, Role.IMAGE) for q in (Role.SYSTEM, Role.PROMPT, Role.TAIL, Role.ANSWER)]
        + [(Role.LATENT, Role.PROMPT)]
    ),
}

ALIASES: dict[str, str] = {
    "stage1": "bottleneck",
    "test_time_bottleneck": "bottleneck",
    "stage2": "causal",
    "mask_only": "answer_only",
}

MASK_VARIANTS: tuple[str, ...] = tuple(BLOCKED_PAIRS) + tuple(ALIASES)


def resolve_variant(variant: str) -> str:
    """Canonical variant name for ``variant`` (an alias or a name of ``BLOCKED_PAIRS``)."""
    name = ALIASES.get(variant, variant)
    if name not in BLOCKED_PAIRS:
        raise ValueError(f"mask variant {variant!r} is unknown; expected one of {MASK_VARIANTS}")
    return name


def _check_roles(roles) -> None:
    if roles.ndim != 2:
        raise ValueError(f"roles must have shape [B, S]; got shape {tuple(roles.shape)}")
    if not jnp.issubdtype(roles.dtype, jnp.integer):
        raise ValueError(f"roles must be an integer array of Role ids; got dtype {roles.dtype}")


def mask_from_blocked(roles, blocked: Iterable[tuple[int, int]]):
    """Causal + padding mask with the given (query role, key role) pairs removed.

    Args:
      roles: int[B, S] role ids.
      blocked: pairs ``(q_role, k_role)``; query tokens of ``q_role`` may not attend to key
        tokens of ``k_role`` (anywhere earlier in the sequence).
    Returns:
      bool[B, 1, S, S]; see the module docstring for the padding and diagonal rules.
    """
    roles = jnp.asarray(roles)
    _check_roles(roles)
    s = roles.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))[None]
    is_pad = roles == Role.PAD
    mask = causal & ~is_pad[:, None, :] & ~is_pad[:, :, None]
    q = roles[:, :, None]
    k = roles[:, None, :]
    for q_role, k_role in blocked:
        mask = mask & ~((q == int(q_role)) & (k == int(k_role)))
    # PAD rows keep only their diagonal so a softmax over the row is finite.
    diag = jnp.eye(s, dtype=bool)[None] & is_pad[:, :, None]
    return (mask | diag)[:, None]


def attention_mask(roles, variant: str = "causal"):
    """LIVR attention mask for ``variant`` (see the module docstring for every rule).

    Args:
      roles: int[B, S] role ids (:class:`Role`); numpy or jax; usable under ``jax.jit`` with
        ``variant`` static.
      variant: one of ``MASK_VARIANTS``.
    Returns:
      bool[B, 1, S, S], True where query q may attend to key k.
    """
    return mask_from_blocked(roles, BLOCKED_PAIRS[resolve_variant(variant)])


def causal_mask(roles):
    """Plain causal mask with padding (Stage 2 / SFT / inference). bool[B, 1, S, S]."""
    return attention_mask(roles, "causal")


def bottleneck_mask(roles):
    """Stage-1 visual bottleneck (LIVR §3.2): only IMAGE and LATENT queries see IMAGE keys."""
    return attention_mask(roles, "bottleneck")


def answer_only_mask(roles):
    """ "Ans->Vis only" / mask-only arm: TAIL and ANSWER queries cannot see IMAGE keys."""
    return attention_mask(roles, "answer_only")


def no_latent_prompt_mask(roles):
    """Default bottleneck plus LATENT queries blocked from PROMPT keys."""
    return attention_mask(roles, "bottleneck_no_latent_prompt")


def allowed_role_pairs(variant: str) -> set[tuple[Role, Role]]:
    """Every (query role, key role) pair of non-PAD roles that ``variant`` leaves open
    (subject to causality). A readable summary of the block tables of the variants above."""
    blocked = BLOCKED_PAIRS[resolve_variant(variant)]
    return {(q, k) for q in _NON_PAD for k in _NON_PAD if (q, k) not in blocked}


def roles_to_string(roles: np.ndarray) -> str:
    """Compact one-letter rendering of a role row, e.g. ``'SIIIIPPPLLTA_'`` (debugging aid)."""
    letters = {
        Role.PAD: "_",
        Role.SYSTEM: "S",
        Role.IMAGE: "I",
        Role.PROMPT: "P",
        Role.LATENT: "L",
        Role.TAIL: "T",
        Role.ANSWER: "A",
    }
    return "".join(letters[Role(int(r))] for r in np.asarray(roles).reshape(-1))
