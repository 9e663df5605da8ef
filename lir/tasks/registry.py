"""Registry: task name -> generator, and the seeded, answer-balanced dataset builder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import numpy as np

from lir.tasks import (
    art_style,
    colour_control,
    counting,
    functional_correspondence,
    jigsaw,
    localization,
    pretrain,
    relative_reflectance,
    semantic_correspondence,
    visual_correspondence,
    visual_similarity,
)
from lir.tasks.base import Record, check_split


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: ``make(rng, split, size, target) -> Record`` plus its static facts.

    n_images: images per record. choices: int32[C] valid answer tokens. chance: accuracy of a
    uniform guess. class_weights: sampling frequency of each choice (uniform when None).
    """

    name: str
    make: Callable[..., Record]
    n_images: int
    choices: np.ndarray
    chance: float
    class_weights: tuple[float, ...] | None
    description: str

    @property
    def n_choices(self) -> int:
        return len(self.choices)


def _spec(mod: ModuleType) -> TaskSpec:
    return TaskSpec(
        mod.NAME,
        mod.make,
        mod.N_IMAGES,
        mod.CHOICES,
        mod.CHANCE,
        getattr(mod, "CLASS_WEIGHTS", None),
        (mod.__doc__ or "").strip(),
    )


# Order fixes each task's seed stream; append new tasks at the end.
TASKS: dict[str, TaskSpec] = {
    m.NAME: _spec(m)
    for m in (
        counting,
        jigsaw,
        localization,
        visual_correspondence,
        semantic_correspondence,
        functional_correspondence,
        relative_reflectance,
        visual_similarity,
        art_style,
        colour_control,
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
NEGATIVE_CONTROL = colour_control.NAME
# Phase-P skills (lir/tasks/pretrain.py): generic single-image QA, none a target task.
PRETRAIN_TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name, make, 1, choices, chance, None, (make.__doc__ or "").strip())
    for name, (make, choices, chance) in pretrain.SKILLS.items()
}
PRETRAIN_NAMES: tuple[str, ...] = tuple(PRETRAIN_TASKS)
_ALL = {**TASKS, **PRETRAIN_TASKS}
_ALL_NAMES = tuple(_ALL)
_SPLIT_ID = {"train": 0, "test": 1}


def get_task(name: str) -> TaskSpec:
    """The target task or Phase-P skill called ``name``."""
    if name not in _ALL:
        raise ValueError(
            f"task {name!r} is unknown; expected one of {TASK_NAMES} or a "
            f"pretraining skill {PRETRAIN_NAMES}"
        )
    return _ALL[name]


def balanced_targets(rng: np.random.Generator, n: int, n_choices: int, weights=None) -> np.ndarray:
    """int[n] choice indices whose counts match ``weights`` (uniform by default) as closely
    as integer counts allow, in random order, so no answer is favoured a priori."""
    w = np.full(n_choices, 1 / n_choices) if weights is None else np.asarray(weights, float)
    counts = np.floor(w / w.sum() * n).astype(int)
    extra = rng.permutation(n_choices)[: n - counts.sum()]
    counts[extra] += 1
    return rng.permutation(np.repeat(np.arange(n_choices), counts))


def generate(
    name: str, n: int, seed: int, split: str = "train", size: int = 32, offset: int = 0
) -> list[Record]:
    """``n`` records of task ``name``; deterministic in (name, seed, split, size, offset).

    ``offset`` starts a disjoint stream of the same split (e.g. train = offset 0 and
    validation = offset 1 of the train generator).
    """
    spec = get_task(name)
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    rng = np.random.default_rng([seed, _ALL_NAMES.index(name), _SPLIT_ID[split], offset])
    targets = balanced_targets(rng, n, spec.n_choices, spec.class_weights)
    return [spec.make(rng, split, size, int(t)) for t in targets]
