"""The record every task generator returns, and small helpers shared by the generators."""

from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Record:
    """One multiple-choice (or open-ended) example.

    task:    registry name of the generating task.
    images:  uint8[n_images, H, W, 3].
    prompt:  int32[L] token ids of the question and its options (vocab.py).
    answer:  int32[A] gold answer token ids (A = 1 for every task here).
    choices: int32[C] the valid answer tokens; ``answer[0]`` is one of them and the model's
             prediction is the argmax over these.
    target:  index of ``answer[0]`` in ``choices``.
    meta:    ground truth used to build the example (for tests and plots), e.g. coordinates.
    """

    task: str
    images: np.ndarray
    prompt: np.ndarray
    answer: np.ndarray
    choices: np.ndarray
    target: int
    meta: dict


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")


def retries(limit: int = 10_000):
    """range(limit) for rejection-sampling loops that ``break`` on success; exhausting it
    raises instead of looping forever."""
    yield from range(limit)
    raise RuntimeError(
        f"rejection sampling failed {limit} times; the image size is probably "
        "too small for this task"
    )


def check_size(size: int, minimum: int = 32) -> None:
    if size < minimum or size % 8:
        raise ValueError(f"image size must be a multiple of 8 and >= {minimum}; got {size}")
