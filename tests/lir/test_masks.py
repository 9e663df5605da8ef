"""Mask semantics on hand-built role sequences, against an explicit per-pair reference."""

import jax
import numpy as np
import pytest

from lir.masks import MASK_VARIANTS, Role, attention_mask, resolve_variant

R = {
    "_": Role.PAD,
    "S": Role.SYSTEM,
    "I": Role.IMAGE,
    "P": Role.PROMPT,
    "L": Role.LATENT,
    "T": Role.TAIL,
    "A": Role.ANSWER,
}

# Two images with text between them, latents, tail, a 2-token answer, trailing pads; and a row
# with pads inside the prompt region and a missing second image (pads mid-sequence).
ROWS = ["SIIIIPIIIIPPPLLLTAA__", "SIIII______PPPLLLTAA_"]


def roles_of(*rows):
    n = max(len(r) for r in rows)
    return np.array([[R[c] for c in r.ljust(n, "_")] for r in rows], dtype=np.int32)


# The mask variants' block tables written out cell by cell (True = open, subject to causality).
# Rows: query role; columns: key role, in order S I P L T A.
_ORDER = "SIPLTA"
_TABLES = {
    "causal": ["111111", "111111", "111111", "111111", "111111", "111111"],
    # LIVR §3.2 stage-1 mask: S, Q, Q', A rows lose the I column.
    "bottleneck": ["101111", "111111", "101111", "111111", "101111", "101111"],
    # Ans->Vis only: the assistant side (tail + answer) loses I; the prompt keeps it.
    "answer_only": ["111111", "111111", "111111", "111111", "101111", "101111"],
    # default + Latent->Prompt: the L row also loses the P column.
    "bottleneck_no_latent_prompt": ["101111", "111111", "101111", "110111", "101111", "101111"],
}


def reference_mask(roles, variant):
    table = _TABLES[resolve_variant(variant)]
    b, s = roles.shape
    out = np.zeros((b, 1, s, s), bool)
    inv = {v: k for k, v in R.items()}
    for i in range(b):
        for q in range(s):
            for k in range(s):
                rq, rk = inv[Role(roles[i, q])], inv[Role(roles[i, k])]
                if rq == "_":
                    out[i, 0, q, k] = q == k
                elif rk == "_" or k > q:
                    out[i, 0, q, k] = False
                else:
                    out[i, 0, q, k] = table[_ORDER.index(rq)][_ORDER.index(rk)] == "1"
    return out


@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_matches_reference_every_pair(variant):
    roles = roles_of(*ROWS)
    got = np.asarray(attention_mask(roles, variant))
    assert got.shape == (2, 1, roles.shape[1], roles.shape[1]) and got.dtype == bool
    np.testing.assert_array_equal(got, reference_mask(roles, variant))


def test_bottleneck_semantics_directly():
    roles = roles_of(ROWS[0])
    m = np.asarray(attention_mask(roles, "stage1"))[0, 0]
    r = roles[0]
    img = np.flatnonzero(r == Role.IMAGE)
    for role in (Role.PROMPT, Role.TAIL, Role.ANSWER, Role.SYSTEM):
        qs = np.flatnonzero(r == role)
        assert not m[np.ix_(qs, img)].any(), f"{role.name} queries see image keys"
    lat = np.flatnonzero(r == Role.LATENT)
    # latents see everything before them: system, both images, all prompt text, earlier latents
    for q in lat:
        assert m[q, : q + 1].all()
    # the prompt text between the two images cannot see the first image
    between = 5
    assert r[between] == Role.PROMPT and not m[between, 1:5].any() and m[between, 0]
    # answer sees the latents and the prompt
    ans = np.flatnonzero(r == Role.ANSWER)
    prm = np.flatnonzero(r == Role.PROMPT)
    assert m[np.ix_(ans, lat)].all() and m[np.ix_(ans, prm)].all()
    # image tokens keep causal attention among themselves and to earlier text
    assert m[9, 0:10].all()  # last token of image 2 sees S, image 1, the text between, image 2


def test_answer_only_keeps_prompt_path_and_latent_prompt_variant():
    roles = roles_of(ROWS[0])
    r = roles[0]
    img, prm = np.flatnonzero(r == Role.IMAGE), np.flatnonzero(r == Role.PROMPT)
    lat, tail = np.flatnonzero(r == Role.LATENT), np.flatnonzero(r == Role.TAIL)
    m = np.asarray(attention_mask(roles, "mask_only"))[0, 0]
    last_p = prm[-1]
    assert m[last_p, img].all()  # prompt still sees the image
    assert not m[np.ix_(tail, img)].any()  # the query predicting the answer does not
    m2 = np.asarray(attention_mask(roles, "bottleneck_no_latent_prompt"))[0, 0]
    assert not m2[np.ix_(lat, prm)].any()
    assert m2[np.ix_(lat, img)].all() and m2[lat[-1], lat].all() and m2[lat[0], 0]


def test_padding_rows_and_columns():
    roles = roles_of(*ROWS)
    for variant in ("causal", "bottleneck"):
        m = np.asarray(attention_mask(roles, variant))[:, 0]
        pad = roles == Role.PAD
        for b in range(2):
            # no non-pad query attends a pad key
            assert not m[b][np.ix_(~pad[b], pad[b])].any()
            # pad rows: only the diagonal
            for q in np.flatnonzero(pad[b]):
                assert m[b, q].sum() == 1 and m[b, q, q]
            # every row has at least one open key (finite softmax)
            assert m[b].any(axis=-1).all()


def test_jit_and_errors():
    roles = roles_of(*ROWS)
    f = jax.jit(attention_mask, static_argnums=1)
    np.testing.assert_array_equal(
        np.asarray(f(roles, "bottleneck")), reference_mask(roles, "bottleneck")
    )
    with pytest.raises(ValueError, match="mask variant"):
        attention_mask(roles, "nope")
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        attention_mask(roles[0], "causal")
    with pytest.raises(ValueError, match="integer"):
        attention_mask(roles.astype(np.float32), "causal")
