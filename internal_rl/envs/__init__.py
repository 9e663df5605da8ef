"""Pinpad environments: the shared protocol (`base`) and Gridworld-pinpad (`gridworld`)."""

from internal_rl.envs.base import (
    PAD,
    PinpadEnv,
    batch_rollout,
    make_task,
    make_tasks,
    rollout,
    stateless,
    task_length,
)
from internal_rl.envs.gridworld import (
    POST_TASK,
    PRETRAIN_TASKS,
    SEEN_TRANSITION_TASK,
    GridPinpad,
    GridState,
    distance_maps,
    pair_transitions,
    post_task,
    pretrain_tasks,
    seen_transition_task,
)

__all__ = [
    "PAD",
    "PinpadEnv",
    "batch_rollout",
    "make_task",
    "make_tasks",
    "rollout",
    "stateless",
    "task_length",
    "POST_TASK",
    "PRETRAIN_TASKS",
    "SEEN_TRANSITION_TASK",
    "GridPinpad",
    "GridState",
    "distance_maps",
    "pair_transitions",
    "post_task",
    "pretrain_tasks",
    "seen_transition_task",
]
