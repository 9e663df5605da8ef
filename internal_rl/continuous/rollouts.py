"""Closed-loop episodes of a Gaussian-policy sequence model in a continuous pinpad.

The continuous counterpart of `internal_rl.rollouts.closed_loop`: the model is stepped one
token at a time (`HawkModel.decode_step`) inside one `lax.scan` over raw time for a batch
of independent environments, and acts by sampling its diagonal Gaussian action head (or
taking its mean when greedy). The env clips actions to its control range. Episode
summaries use `internal_rl.rollouts.summarize`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from internal_rl.envs.base import PinpadEnv
from internal_rl.models.hawk import gaussian_action
from internal_rl.rollouts import closed_loop

# step_fn(obs_t f32 [N, D], caches, subgoal int32 [N])
#   -> (action_mean f32 [N, A], action_log_std f32 [A] or [N, A], caches)
GaussianStepFn = Callable[[jax.Array, object, jax.Array], tuple[jax.Array, jax.Array, object]]


def gaussian_closed_loop(
    env: PinpadEnv,
    step_fn: GaussianStepFn,
    caches: object,
    key: jax.Array,
    tasks: jax.Array,
    num_steps: int,
    greedy: bool | jax.Array = False,
) -> dict[str, jax.Array]:
    """Runs N episodes (tasks int32 [N, K]) for `num_steps` raw steps
    (`internal_rl.rollouts.closed_loop` with `gaussian_action`).

    greedy may be traced (one compiled program for sampled and greedy evaluation).
    Returns per-episode success bool [N], progress f32 [N] (fraction of the task's colours
    visited), length int32 [N] (steps taken), reward f32 [N].
    """

    def head_step(obs, caches, subgoal):
        mean, log_std, caches = step_fn(obs, caches, subgoal)
        return (mean, log_std), caches

    return closed_loop(env, head_step, caches, key, tasks, num_steps, greedy, gaussian_action)
