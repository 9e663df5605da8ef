"""Scripted stochastic shortest-path expert for Gridworld-pinpad (internal RL App. C.1.1).

The expert reads the privileged env state: the BFS distance map of the current target
colour (walls and all other colours blocked, computed at reset by min-plus relaxation,
`envs.gridworld.distance_maps`). It acts uniformly over *all* actions that lie on some
shortest path (docs/internal_rl.md D4). With probability epsilon it instead takes a uniformly random
non-terminating action (one that does not step onto a wrong colour).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from internal_rl.envs.base import PolicyFn, stateless
from internal_rl.envs.gridworld import INF, GridPinpad, GridState


def next_cells(env: GridPinpad, state: GridState) -> jax.Array:
    """int32 [A]: the agent's cell after each action."""
    acts = jnp.arange(env.num_actions)
    return jax.vmap(lambda a: env.move(state.agent, a, state.walls))(acts)


def optimal_action_mask(env: GridPinpad, state: GridState) -> jax.Array:
    """bool [A]: actions on a shortest path to the current target colour.

    All False when the target is unreachable (never for layouts from `reset`).
    """
    target = state.task[jnp.minimum(state.progress, state.task_len - 1)]
    d = state.dist[target][next_cells(env, state)]  # [A]
    best = jnp.min(d)
    return (d == best) & (best < INF)


def safe_action_mask(env: GridPinpad, state: GridState) -> jax.Array:
    """bool [A]: actions that do not end the episode by entering a wrong colour."""
    target = state.task[jnp.minimum(state.progress, state.task_len - 1)]
    nxt = next_cells(env, state)
    on_colour = jnp.any(nxt[:, None] == state.colours[None], axis=-1)  # [A]
    entered = on_colour & (nxt != state.agent)
    return ~entered | (nxt == state.colours[target])


def _uniform_choice(key: jax.Array, mask: jax.Array) -> jax.Array:
    """int32 []: uniform sample among True entries of bool [A] (uniform over all if none)."""
    mask = jnp.where(jnp.any(mask), mask, True)
    return jax.random.categorical(key, jnp.where(mask, 0.0, -jnp.inf)).astype(jnp.int32)


def expert_action(
    env: GridPinpad, key: jax.Array, state: GridState, epsilon: float | jax.Array = 0.0
) -> jax.Array:
    """int32 []: expert action (uniform over optimal; epsilon-uniform over safe actions)."""
    k_opt, k_safe, k_eps = jax.random.split(key, 3)
    optimal = optimal_action_mask(env, state)
    safe = safe_action_mask(env, state)
    a_opt = _uniform_choice(k_opt, jnp.where(jnp.any(optimal), optimal, safe))
    a_rand = _uniform_choice(k_safe, safe)
    explore = jax.random.uniform(k_eps) < epsilon
    return jnp.where(explore, a_rand, a_opt)


def expert_policy(env: GridPinpad, epsilon: float | jax.Array = 0.0) -> PolicyFn:
    """Policy for `envs.base.rollout`: (carry, key, obs, state) -> (carry, action).

    epsilon may be a traced scalar (one compiled rollout for several noise levels).
    """
    if isinstance(epsilon, (int, float)) and not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon: expected a probability in [0, 1], got {epsilon}")
    return stateless(lambda key, obs, state: expert_action(env, key, state, epsilon))


def oracle_action_accuracy(
    env: GridPinpad, key: jax.Array, tasks: jax.Array, num_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced accuracy ceiling of a predictor that knows the current target.

    Rolls out the expert (epsilon = 0) on tasks int32 [N, K] for num_steps steps; at each
    step an oracle that predicts one of the k shortest-path actions is right with
    probability 1/k. Returns (mean 1/k over the valid steps of successful episodes f32 [],
    expert success rate f32 []), the reference point for a model's action accuracy (a
    model that does not see the task must also infer the target, so its ceiling is lower).
    """
    tasks = jnp.asarray(tasks, jnp.int32)

    def episode(k, task):
        k_reset, k_run = jax.random.split(k)
        state, _ = env.reset(k_reset, task)

        def body(state, kk):
            inv = 1.0 / jnp.sum(optimal_action_mask(env, state))
            alive = ~state.done
            state, *_ = env.step(state, expert_action(env, kk, state))
            return state, (jnp.where(alive, inv, 0.0), alive)

        state, (inv, alive) = jax.lax.scan(body, state, jax.random.split(k_run, num_steps))
        return inv.sum() * state.success, alive.sum() * state.success, state.success

    inv, count, success = jax.vmap(episode)(jax.random.split(key, tasks.shape[0]), tasks)
    return inv.sum() / jnp.maximum(count.sum(), 1), jnp.mean(success.astype(jnp.float32))
