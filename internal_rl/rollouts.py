"""Closed-loop episodes with a sequence model acting in a pinpad environment.

The model is stepped one token at a time with KV caches (`decode_step`) inside one
`lax.scan` over raw time, for a batch of independent environments (`vmap` over the env's
pure reset/step). Used to evaluate the base model (pretraining tasks, held-out task) and
label-switched supervised controllers (held-out task, docs/internal_rl.md D19: the controller
follows `env.subgoal(state)`, which moves to the next label on the step after the previous
subgoal was completed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.train import STEPS
from internal_rl.envs.base import PinpadEnv, task_length
from internal_rl.models.transformer import categorical_action

# step_fn(obs_t f32 [N, D], caches, subgoal int32 [N]) -> (policy head output, caches);
# the head output is action logits f32 [N, A] for `categorical_action`, or whatever the
# `sample_action` given to `closed_loop` reads
StepFn = Callable[[jax.Array, object, jax.Array], tuple[Any, object]]
# sample_action(key, head output, greedy bool or traced bool []) -> action [N, ...]
SampleFn = Callable[[jax.Array, Any, Any], jax.Array]


def closed_loop(
    env: PinpadEnv,
    step_fn: StepFn,
    caches: object,
    key: jax.Array,
    tasks: jax.Array,
    num_steps: int,
    greedy: bool | jax.Array = False,
    sample_action: SampleFn = categorical_action,
) -> dict[str, jax.Array]:
    """Runs N episodes (tasks int32 [N, K]) for `num_steps` raw steps.

    `caches` must hold at least num_steps tokens. Actions come from `sample_action` applied
    to the model's head output (default: the categorical policy, argmax if greedy); greedy
    may be traced, so sampled and greedy evaluation share one program. Returns per-episode
      success bool [N], progress f32 [N] (fraction of the task's colours visited),
      length int32 [N] (steps taken), reward f32 [N].
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
        head, caches = step_fn(obs, caches, subgoal)
        action = sample_action(k, head, greedy)
        states, obs, reward, _, _ = jax.vmap(env.step)(states, action)
        return (states, obs, caches, ret + reward), None

    (final, _, _, ret), _ = jax.lax.scan(
        body, (states, obs, caches, jnp.zeros(n, jnp.float32)), jax.random.split(k_act, num_steps)
    )
    return dict(
        success=final.success,
        progress=final.progress.astype(jnp.float32) / task_length(tasks).astype(jnp.float32),
        length=final.t,
        reward=ret,
    )


def make_policy_eval(
    env: PinpadEnv,
    graphdef,
    tasks,
    num_episodes: int,
    *,
    horizon: int | None = None,
    greedy: bool = False,
    labelled: bool = False,
):
    """Jitted (params, frozen, key) -> episode dict (`closed_loop`) of a model acting with
    its own policy head, on `num_episodes` rows drawn uniformly from tasks int32 [N, K].

    The model (`nnx.merge(graphdef, params, frozen)`) is a base model (transformer or Hawk:
    `policy_head` and `sample_action` pick the action distribution), or with `labelled` a
    label-switched `ControlledModel` fed `env.subgoal` at every step. One compiled program
    per (env, graphdef, tasks, sizes), shared through `common.train.STEPS`.
    """
    horizon = horizon or env.horizon
    host_tasks = np.asarray(tasks, np.int32)
    key = (
        "internal_rl.policy_eval",
        env,
        graphdef,
        host_tasks.tobytes(),
        host_tasks.shape,
        num_episodes,
        horizon,
        greedy,
        labelled,
    )
    return STEPS.get(
        key,
        lambda: _build_policy_eval(
            env, graphdef, host_tasks, num_episodes, horizon, greedy, labelled
        ),
    )


def _build_policy_eval(env, graphdef, tasks, num_episodes, horizon, greedy, labelled):
    tasks = jnp.asarray(tasks, jnp.int32)

    def run(params, frozen, key):
        model = nnx.merge(graphdef, params, frozen)
        base = model.base if labelled else model
        k_task, k_run = jax.random.split(key)
        rows = tasks[jax.random.randint(k_task, (num_episodes,), 0, tasks.shape[0])]

        def step_fn(obs, caches, subgoal):
            if labelled:
                out, caches = model.decode_step(obs, caches, subgoal)
            else:
                out, caches = model.decode_step(obs, caches, return_residuals=False)
            return base.policy_head(out), caches

        return closed_loop(
            env,
            step_fn,
            base.init_caches(num_episodes, horizon),
            k_run,
            rows,
            horizon,
            greedy,
            base.sample_action,
        )

    return jax.jit(run)


def host_array(x) -> np.ndarray:
    """A (possibly multi-process, replicated) array as host numpy: arrays replicated over
    several processes are not fully addressable, but each process holds a full copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def summarize(episodes: dict[str, jax.Array]) -> dict[str, float]:
    """Episode arrays -> {success_rate, mean_progress, mean_length} as floats."""
    return dict(
        success_rate=float(np.mean(host_array(episodes["success"]).astype(np.float32))),
        mean_progress=float(np.mean(host_array(episodes["progress"]))),
        mean_length=float(np.mean(host_array(episodes["length"]).astype(np.float32))),
    )
