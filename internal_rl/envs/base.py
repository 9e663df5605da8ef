"""The pinpad environment protocol shared by the grid world and (later) MJX Ant-pinpad.

A *task* is a sequence of colour ids, stored as an int32 vector of fixed length padded
with -1 (`make_task`), so tasks of different lengths can share one compiled program.
An environment is a plain Python object with static attributes and two pure, `jit`- and
`vmap`-able methods:

    reset(key, task[K]) -> (state, obs[obs_dim])
    step(state, action) -> (state, obs, reward f32[], done bool[], info dict)

`info["subgoal"]` is the ground-truth abstract action (int32) of the *new* state and is
for analysis only (probes, supervised controllers, switch alignment); policies must not
read it. `subgoal(state)` gives the same label for any state. Once `done` is true, `step`
is a no-op that returns reward 0, so fixed-length `lax.scan` rollouts can run past the end
of an episode; `rollout` records a `valid` mask for the steps taken while alive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PAD = -1  # task padding value

State = Any
PolicyFn = Callable[[Any, jax.Array, jax.Array, State], tuple[Any, jax.Array]]


class PinpadEnv(Protocol):
    """What every pinpad environment provides (see module docstring)."""

    obs_dim: int  # length of the flat float32 observation
    action_shape: tuple[int, ...]  # () for discrete actions, (8,) for the ant's torques
    num_actions: int | None  # number of discrete actions, None for continuous control
    num_colours: int
    num_subgoals: int  # classes of info["subgoal"]
    horizon: int  # episode time limit T

    def reset(self, key: jax.Array, task: jax.Array) -> tuple[State, jax.Array]: ...

    def step(
        self, state: State, action: jax.Array
    ) -> tuple[State, jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]: ...

    def subgoal(self, state: State) -> jax.Array: ...


def make_task(colours: Sequence[int], max_len: int | None = None) -> np.ndarray:
    """Colour sequence -> int32 [max_len] padded with PAD (-1).

    Raises ValueError for an empty task, negative ids, or a task longer than max_len.
    """
    colours = [int(c) for c in colours]
    if not colours:
        raise ValueError("task: expected at least one colour id, got an empty sequence")
    if min(colours) < 0:
        raise ValueError(f"task: colour ids must be >= 0, got {colours}")
    max_len = len(colours) if max_len is None else int(max_len)
    if len(colours) > max_len:
        raise ValueError(f"task: {len(colours)} colours do not fit max_len={max_len}")
    return np.asarray(colours + [PAD] * (max_len - len(colours)), dtype=np.int32)


def make_tasks(tasks: Sequence[Sequence[int]], max_len: int | None = None) -> np.ndarray:
    """List of colour sequences -> int32 [N, max_len] (padded with PAD)."""
    max_len = max(len(t) for t in tasks) if max_len is None else max_len
    return np.stack([make_task(t, max_len) for t in tasks])


def task_length(task: jax.Array) -> jax.Array:
    """int32 [..., K] padded task -> int32 [...] number of colours."""
    return jnp.sum(task >= 0, axis=-1).astype(jnp.int32)


def stateless(fn: Callable[[jax.Array, jax.Array, State], jax.Array]) -> PolicyFn:
    """Adapt `fn(key, obs, env_state) -> action` to the carry-passing policy signature."""

    def policy(carry, key, obs, env_state):
        return carry, fn(key, obs, env_state)

    return policy


def rollout(
    env: PinpadEnv,
    policy_fn: PolicyFn,
    key: jax.Array,
    task: jax.Array,
    num_steps: int,
    policy_carry: Any = (),
) -> tuple[dict[str, jax.Array], State]:
    """One episode of `num_steps` steps under `lax.scan` (vmap it for a batch).

    policy_fn(carry, key, obs[obs_dim], env_state) -> (carry, action). It receives the
    privileged env state so scripted experts can plan; learned policies ignore it.

    Returns (traj, final_state) with, for S = num_steps:
      obs [S, obs_dim] f32      observation before each action (o_1..o_S)
      next_obs [S, obs_dim] f32 observation after each action
      action [S, *action_shape]
      reward [S] f32, done [S] bool (after the step)
      valid [S] bool            the episode was still running before the step
      subgoal [S] int32         ground-truth abstract action at o_t (analysis only)
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    k_reset, k_policy = jax.random.split(key)
    state, obs = env.reset(k_reset, task)

    def body(carry, k):
        state, obs, pcarry = carry
        alive = ~state.done
        subgoal = env.subgoal(state)
        pcarry, action = policy_fn(pcarry, k, obs, state)
        state, next_obs, reward, done, _ = env.step(state, action)
        out = dict(
            obs=obs,
            next_obs=next_obs,
            action=action,
            reward=reward,
            done=done,
            valid=alive,
            subgoal=subgoal,
        )
        return (state, next_obs, pcarry), out

    (state, _, _), traj = jax.lax.scan(
        body, (state, obs, policy_carry), jax.random.split(k_policy, num_steps)
    )
    return traj, state


def batch_rollout(
    env: PinpadEnv,
    policy_fn: PolicyFn,
    key: jax.Array,
    tasks: jax.Array,
    num_steps: int,
    policy_carry: Any = (),
) -> tuple[dict[str, jax.Array], State]:
    """`rollout` vmapped over a batch: tasks int32 [B, K] -> traj leaves [B, S, ...].

    `policy_carry` (if any) must have a leading batch axis B.
    """
    tasks = jnp.asarray(tasks, jnp.int32)
    if tasks.ndim != 2:
        raise ValueError(f"tasks: expected int32 [B, K], got shape {tasks.shape}")
    keys = jax.random.split(key, tasks.shape[0])
    carry_axes = None if policy_carry == () else 0
    return jax.vmap(
        lambda k, t, c: rollout(env, policy_fn, k, t, num_steps, c),
        in_axes=(0, 0, carry_axes),
    )(keys, tasks, policy_carry)
