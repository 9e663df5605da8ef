"""Procedural BLINK-style tasks for lir (NumPy, seeded): one module per task, plus the
registry (``generate``, ``TASKS``), the Phase-P skills (``PRETRAIN_TASKS``) and the
shared vocabulary."""

from lir.tasks.base import Record
from lir.tasks.registry import (
    NEGATIVE_CONTROL,
    PRETRAIN_NAMES,
    PRETRAIN_TASKS,
    TASK_NAMES,
    TASKS,
    TaskSpec,
    generate,
    get_task,
)

__all__ = [
    "NEGATIVE_CONTROL",
    "PRETRAIN_NAMES",
    "PRETRAIN_TASKS",
    "TASK_NAMES",
    "TASKS",
    "Record",
    "TaskSpec",
    "generate",
    "get_task",
]
