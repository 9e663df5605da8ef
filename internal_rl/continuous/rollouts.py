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
import jax.numpy as jnp

from internal_rl.envs.base import PinpadEnv, task_length

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
    """Runs N episodes (tasks int32 [N, K]) for `num_steps` raw steps.

    greedy may be traced (one compiled program for sampled and greedy evaluation).
    Returns per-episode success bool [N], progress f32 [N] (fraction of the task's colours
    visited), length int32 [N] (steps taken), reward f32 [N].
    """
    tasks = jnp.asarray(tasks, jnp.int32)
    if tasks.ndim != 2:
        raise ValueError(f"tasks: expected int32 [N, K], got shape {tasks.shape}")
    n = tasks.shape[0]
    k_reset, k_act = jax.random.split(key)
    states, obs = jax.vmap(env.reset)(jax.random.split(k_reset, n), tasks)

    def body(carry, k):
        states, obs, caches, ret = carry
        subgoal = jax.vmap(env.subgoal)(states)
        mean, log_std, caches = step_fn(obs, caches, subgoal)
        noise = jax.random.normal(k, mean.shape)
        action = jnp.where(greedy, mean, mean + jnp.exp(log_std) * noise)
        states, obs, reward, _, _ = jax.vmap(env.step)(states, action)
        return (states, obs, caches, ret + reward), None

    (final, _, _, ret), _ = jax.lax.scan(
        body, (states, obs, caches, jnp.zeros(n, jnp.float32)), jax.random.split(k_act, num_steps))
    return dict(
        success=final.success,
        progress=final.progress.astype(jnp.float32) / task_length(tasks).astype(jnp.float32),
        length=final.t,
        reward=ret,
    )
