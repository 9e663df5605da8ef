"""Continuous-pinpad expert trajectories generated on the fly inside jit
(internal RL App. C.1.1, docs/internal_rl.md D1, D23).

`expert_batch` rolls out an expert policy on `n_candidates` freshly sampled layouts (tasks
drawn uniformly from a task table), keeps the successful episodes first (stable order) and
pads/masks every trajectory to a fixed length `max_len`. With action noise the expert can
fail (or need more than `max_len` steps); the candidate surplus covers those, and a
shortfall shows up as masked-out rows.

Two experts: the scripted BFS + PD point expert (`point_expert_batch`; D uses noise_std =
0.1, D* noise_std = 0) and the trained Ant PPO expert (`AntExpertDataset`; D samples its
Gaussian, D* takes the mean).

`PointExpertDataset` / `AntExpertDataset` are the continuous `internal_rl.data.ExpertDataset`:
the same infinite, deterministic, checkpointable iterator (batch n uses `fold_in(key(seed),
n)`, state `{"seed", "step"}`), with the batch function swapped. The compiled batch program
is shared by every dataset with the same env and shapes, so D, D* and the held-out streams
cost one MJX compile."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from common.train import STEPS
from internal_rl.data import ExpertDataset, segment_position
from internal_rl.envs.base import PolicyFn, batch_rollout
from internal_rl.envs.pinpad_layout import MJXPinpad
from internal_rl.envs.point_pinpad import PointPinpad
from internal_rl.point_expert import expert_policy


def default_candidates(batch_size: int) -> int:
    """Episodes rolled out for a batch of `batch_size` kept ones: B + max(8, B/4)."""
    return batch_size + max(8, math.ceil(batch_size / 4))


def expert_batch(
    env: MJXPinpad,
    policy: PolicyFn,
    key: jax.Array,
    tasks: jax.Array,
    batch_size: int,
    max_len: int,
    n_candidates: int | None = None,
) -> dict[str, jax.Array]:
    """A padded batch of successful expert trajectories.

    Args:
      env: a continuous pinpad (Point: obs_dim D = 16, action f32 [2]; Ant: D = 41, [8]).
      policy: the expert (`envs.base.rollout` protocol): the scripted point expert
        (`point_expert.expert_policy`) or the trained Ant expert (`ant_expert.expert_policy`).
      tasks: int32 [N, K] task table (-1 padded); each row is drawn uniformly.
      batch_size: B; max_len: L, steps per padded trajectory (<= env.horizon).
      n_candidates: episodes rolled out (default `default_candidates(B)`).

    Returns dict (L steps):
      obs f32 [B, L, D]          o_1..o_L (frozen after the episode ends)
      action f32 [B, L, A]       expert action a_t (in [-1, 1]^A)
      next_obs f32 [B, L, D]     o_{t+1} (targets of the observation head)
      mask bool [B, L]           valid step of a successful trajectory
      subgoal int32 [B, L]       ground-truth abstract action g_t (the next colour)
      seg_pos int32 [B, L]       steps since the current subgoal segment began
      task_id int32 [B], length int32 [B], success bool [B]
    Failed rows (only when fewer than B candidates succeed) have an all-False mask.
    """
    if max_len > env.horizon:
        raise ValueError(f"max_len: expected <= env.horizon ({env.horizon}), got {max_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    tasks = jnp.asarray(tasks, jnp.int32)
    if tasks.ndim != 2 or tasks.shape[0] == 0:
        raise ValueError(f"tasks: expected int32 [N, K] with N >= 1, got shape {tasks.shape}")
    n_candidates = n_candidates or default_candidates(batch_size)
    if n_candidates < batch_size:
        raise ValueError(f"n_candidates: expected >= batch_size ({batch_size}), got {n_candidates}")
    k_task, k_roll = jax.random.split(key)
    task_id = jax.random.randint(k_task, (n_candidates,), 0, tasks.shape[0])
    traj, final = batch_rollout(env, policy, k_roll, tasks[task_id], max_len)
    success = final.success
    keep = jnp.argsort(~success, stable=True)[:batch_size]
    take = lambda x: x[keep]
    valid = take(traj["valid"]) & take(success)[:, None]
    subgoal = take(traj["subgoal"]).astype(jnp.int32)
    return dict(
        obs=take(traj["obs"]).astype(jnp.float32),
        action=take(traj["action"]).astype(jnp.float32),
        next_obs=take(traj["next_obs"]).astype(jnp.float32),
        mask=valid,
        subgoal=subgoal,
        seg_pos=segment_position(subgoal),
        task_id=take(task_id).astype(jnp.int32),
        length=jnp.sum(valid, axis=-1).astype(jnp.int32),
        success=take(success),
    )


def point_expert_batch(
    env: PointPinpad,
    key: jax.Array,
    tasks: jax.Array,
    batch_size: int,
    max_len: int,
    noise_std: float | jax.Array = 0.1,
    n_candidates: int | None = None,
) -> dict[str, jax.Array]:
    """`expert_batch` of the scripted BFS + PD point expert with Gaussian action noise of std
    `noise_std` (may be traced: D and D* share a program)."""
    return expert_batch(
        env, expert_policy(env, noise_std), key, tasks, batch_size, max_len, n_candidates
    )


def _batch_program(env: PointPinpad, batch_size: int, max_len: int, n_candidates: int | None):
    """Jitted (key, tasks int32 [N, K], noise_std f32 []) -> `point_expert_batch` dict, one
    per env and shapes (`common.train.STEPS`)."""
    return STEPS.get(
        ("internal_rl.point_expert_batch", env, batch_size, max_len, n_candidates),
        lambda: jax.jit(
            lambda key, tasks, noise_std: point_expert_batch(
                env, key, tasks, batch_size, max_len, noise_std, n_candidates
            )
        ),
    )


class PointExpertDataset(ExpertDataset):
    """Infinite deterministic iterator of `point_expert_batch` batches (checkpointable state,
    `get_state` / `set_state` / `batch_at` as `ExpertDataset`)."""

    def __init__(
        self,
        env: PointPinpad,
        tasks: Any,
        batch_size: int,
        max_len: int,
        noise_std: float = 0.1,
        seed: int = 0,
        n_candidates: int | None = None,
    ):
        # the base class validates tasks / batch_size and keeps seed and step; its
        # gridworld batch program is never called (jit traces lazily)
        super().__init__(env, tasks, batch_size, max_len, epsilon=noise_std, seed=seed)
        if max_len > env.horizon:
            raise ValueError(f"max_len: expected <= env.horizon ({env.horizon}), got {max_len}")
        if noise_std < 0:
            raise ValueError(f"noise_std: expected >= 0, got {noise_std}")
        if n_candidates is not None and n_candidates < batch_size:
            raise ValueError(
                f"n_candidates: expected >= batch_size ({batch_size}), got {n_candidates}"
            )
        self.n_candidates = n_candidates
        program = _batch_program(env, batch_size, max_len, n_candidates)
        tasks_j = jnp.asarray(self.tasks)
        noise = jnp.float32(noise_std)
        self._fn = lambda key: program(key, tasks_j, noise)

    @property
    def noise_std(self) -> float:
        """Std of the expert's action noise (stored as the base class's `epsilon`)."""
        return self.epsilon


def _ant_batch_program(expert_cfg, batch_size: int, max_len: int, n_candidates: int | None):
    """Jitted (key, tasks, noise f32 [], expert params) -> `expert_batch` of the trained Ant
    expert (params are an argument: a new checkpoint does not recompile), one per expert
    config and shapes (`common.train.STEPS`)."""
    return STEPS.get(
        ("internal_rl.ant_expert_batch", expert_cfg, batch_size, max_len, n_candidates),
        lambda: _build_ant_batch_program(expert_cfg, batch_size, max_len, n_candidates),
    )


def _build_ant_batch_program(expert_cfg, batch_size, max_len, n_candidates):
    from internal_rl.ant_expert import build_program, expert_policy

    program = build_program(expert_cfg)

    def run(key, tasks, noise, params):
        policy = expert_policy(
            expert_cfg, params, noise, env=program.env, graphdef=program.graphdef
        )
        return expert_batch(program.env, policy, key, tasks, batch_size, max_len, n_candidates)

    return jax.jit(run)


class AntExpertDataset(ExpertDataset):
    """`PointExpertDataset` for the Ant-pinpad: batches of the trained PPO expert
    (`internal_rl.ant_expert`), told the grid plan; the sequence model is not.

    noise scales the expert's own Gaussian std: 1 samples the trained policy (D), 0 takes
    its mean (D*). Only successful episodes are kept, so an expert that never succeeds
    gives all-False masks.
    """

    def __init__(
        self,
        expert_cfg,
        expert_params,
        tasks: Any,
        batch_size: int,
        max_len: int,
        noise: float = 1.0,
        seed: int = 0,
        n_candidates: int | None = None,
    ):
        from internal_rl.ant_expert import build_program

        env = build_program(expert_cfg).env
        super().__init__(env, tasks, batch_size, max_len, epsilon=noise, seed=seed)
        if max_len > env.horizon:
            raise ValueError(
                f"max_len: expected <= the expert's horizon ({env.horizon}), got {max_len}"
            )
        if noise < 0:
            raise ValueError(f"noise: expected >= 0 (a scale of the expert's std), got {noise}")
        if n_candidates is not None and n_candidates < batch_size:
            raise ValueError(
                f"n_candidates: expected >= batch_size ({batch_size}), got {n_candidates}"
            )
        program = _ant_batch_program(expert_cfg, batch_size, max_len, n_candidates)
        tasks_j, noise_j = jnp.asarray(self.tasks), jnp.float32(noise)
        self._fn = lambda key: program(key, tasks_j, noise_j, expert_params)
