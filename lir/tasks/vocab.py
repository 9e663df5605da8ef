"""The tiny fixed word-level vocabulary shared by every lir task, the data pipeline and the model.

Ids are positions in ``TOKENS`` and never change order (a checkpoint's embedding rows follow
them). Special tokens come first so PAD is id 0. Latent tokens are *not* in this vocabulary:
latent slots carry the PAD id and the model splices a separate ``(K, d)`` latent table there
(docs/lir.md D1: latents are never in the output vocabulary).
"""

from __future__ import annotations

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<vs>", "<img>", "<ve>", "<ans>", "<eos>")
LETTERS = ("A", "B", "C", "D")
NUMBERS = tuple(str(i) for i in range(11))
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "grey")
TASK_WORDS = (
    "count",
    "jigsaw",
    "localize",
    "viscorr",
    "semcorr",
    "funccorr",
    "reflectance",
    "vissim",
    "artstyle",
    "colourof",
)
ACTIONS = ("hold", "strike", "pour", "cut")
WORDS = (
    "how",
    "many",
    "which",
    "image",
    "point",
    "box",
    "part",
    "same",
    "darker",
    "about",
    "missing",
    "fits",
    "circle",
    "square",
    "triangle",
    "object",
    "ref",
    "options",
    "?",
    "is",
    "there",
    "yes",
    "no",
    "under",
    "marker",
    "largest",
    "quadrant",
    "shape",
    "colour",
    "style",
    "similar",
    "first",
    "second",
    "third",
    "on",
)

TOKENS: tuple[str, ...] = SPECIALS + LETTERS + NUMBERS + COLOURS + TASK_WORDS + ACTIONS + WORDS
ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
assert len(ID) == len(TOKENS), "duplicate token in the vocabulary"
VOCAB_SIZE = len(TOKENS)

PAD, BOS, VISION_START, IMAGE_PAD, VISION_END, ANSWER_HEADER, EOS = (ID[t] for t in SPECIALS)
LETTER_IDS = np.array([ID[t] for t in LETTERS], dtype=np.int32)
NUMBER_IDS = np.array([ID[t] for t in NUMBERS], dtype=np.int32)
COLOUR_IDS = np.array([ID[t] for t in COLOURS], dtype=np.int32)


def encode(text: str) -> np.ndarray:
    """Space-separated words -> int32[L] token ids. Unknown words raise ValueError."""
    words = text.split()
    unknown = [w for w in words if w not in ID]
    if unknown:
        raise ValueError(f"words {unknown} are not in the lir vocabulary (lir/tasks/vocab.py)")
    return np.array([ID[w] for w in words], dtype=np.int32)


def decode(ids) -> str:
    """int token ids -> space-separated words."""
    return " ".join(TOKENS[int(i)] for i in np.asarray(ids).reshape(-1))


def options(n: int) -> str:
    """The option list of an n-way multiple-choice prompt, e.g. ``'options A B C'``."""
    return "options " + " ".join(LETTERS[:n])
