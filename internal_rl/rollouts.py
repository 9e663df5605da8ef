"""Closed-loop episodes with a sequence model acting in a pinpad environment.

The model is stepped one token at a time with KV caches (`decode_step`) inside one
`lax.scan` over raw time, for a batch of independent environments (`vmap` over the env's
pure reset/step). Used to evaluate the base model (pretraining tasks, held-out task) and
label-switched supervised controllers (held-out task, choice §8.22: the controller follows
`env.subgoal(state)`, which moves to the next label on the step after the previous
subgoal was completed).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from internal_rl.envs.base import PinpadEnv, task_length

# step_fn(obs_t f32 [N, D], caches, subgoal int32 [N]) -> (action_logits f32 [N, A], caches)
StepFn = Callable[[jax.Array, object, jax.Array], tuple[jax.Array, object]]


def closed_loop(
    env: PinpadEnv,
    step_fn: StepFn,
    caches: object,
    key: jax.Array,
    tasks: jax.Array,
    num_steps: int,
    greedy: bool = False,
) -> dict[str, jax.Array]:
    """Runs N episodes (tasks int32 [N, K]) for `num_steps` raw steps.

    `caches` must hold at least num_steps tokens. Actions are sampled from the model's
    categorical policy (argmax if greedy). Returns per-episode
      success bool [N], progress f32 [N] (fraction of the task's colours visited),
      length int32 [N] (steps taken), reward f32 [N].
    """
    tasks = jnp.asarray(tasks, jnp.int32)
    n = tasks.shape[0]
    k_reset, k_act = jax.random.split(key)
    states, obs = jax.vmap(env.reset)(jax.random.split(k_reset, n), tasks)

    def body(carry, k):
        states, obs, caches, ret = carry
        subgoal = jax.vmap(env.subgoal)(states)
        logits, caches = step_fn(obs, caches, subgoal)
        action = jnp.where(greedy, jnp.argmax(logits, axis=-1),
                           jax.random.categorical(k, logits, axis=-1)).astype(jnp.int32)
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


def summarize(episodes: dict[str, jax.Array]) -> dict[str, float]:
    """Episode arrays -> {success_rate, mean_progress, mean_length} as floats."""
    return dict(
        success_rate=float(jnp.mean(episodes["success"].astype(jnp.float32))),
        mean_progress=float(jnp.mean(episodes["progress"])),
        mean_length=float(jnp.mean(episodes["length"].astype(jnp.float32))),
    )
