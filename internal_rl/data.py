"""Expert trajectories generated on the fly inside jit (internal RL App. C.1.1,
docs/internal_rl.md D1).

`expert_batch` rolls out the stochastic shortest-path expert on `n_candidates` freshly
sampled layouts (tasks drawn uniformly from a task table), keeps the successful episodes
first (stable order) and pads/masks every trajectory to a fixed length `max_len`. With
epsilon = 0 the expert never fails, so only episodes longer than `max_len` are dropped
(the candidate surplus covers them; a shortfall shows up as masked-out rows).

`ExpertDataset` is an infinite, deterministic iterator over such batches: batch n uses
`fold_in(key(seed), n)`, so its whole state is `{"seed", "step"}` (`get_state` /
`set_state`, checkpointed with the training state by `common.train`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.train import STEPS
from internal_rl.envs.base import batch_rollout
from internal_rl.envs.gridworld import GridPinpad
from internal_rl.experts import expert_policy


def segment_position(subgoal: jax.Array) -> jax.Array:
    """int32 [..., L] labels -> int32 [..., L] steps since the current subgoal segment began.

    A segment starts at t = 0 and wherever the label differs from the previous step's.
    """
    length = subgoal.shape[-1]
    t = jnp.arange(length, dtype=jnp.int32)
    change = jnp.concatenate(
        [jnp.ones_like(subgoal[..., :1], bool), subgoal[..., 1:] != subgoal[..., :-1]], axis=-1
    )
    start = jax.lax.cummax(jnp.where(change, t, 0), axis=subgoal.ndim - 1)
    return t - start


def expert_batch(
    env: GridPinpad,
    key: jax.Array,
    tasks: jax.Array,
    batch_size: int,
    max_len: int,
    epsilon: float = 0.0,
    n_candidates: int | None = None,
) -> dict[str, jax.Array]:
    """A padded batch of successful expert trajectories.

    Args:
      tasks: int32 [N, K] task table (-1 padded); each row is drawn uniformly.
      batch_size: B; max_len: L, steps per padded trajectory (<= env.horizon).
      n_candidates: episodes rolled out (default B + max(8, B/4)).

    Returns dict (L steps, D = env.obs_dim):
      obs f32 [B, L, D]          o_1..o_L (frozen after the episode ends)
      action int32 [B, L]        expert action a_t
      next_cells int32 [B, L, E] entity cells of o_{t+1} (targets of the obs head)
      mask bool [B, L]           valid step of a successful trajectory
      subgoal int32 [B, L]       ground-truth abstract action g_t
      seg_pos int32 [B, L]       steps since the current subgoal segment began
      task_id int32 [B], length int32 [B], success bool [B]
    """
    if max_len > env.horizon:
        raise ValueError(f"max_len: expected <= env.horizon ({env.horizon}), got {max_len}")
    tasks = jnp.asarray(tasks, jnp.int32)
    n_candidates = n_candidates or batch_size + max(8, math.ceil(batch_size / 4))
    if n_candidates < batch_size:
        raise ValueError(f"n_candidates: expected >= batch_size ({batch_size}), got {n_candidates}")
    k_task, k_roll = jax.random.split(key)
    task_id = jax.random.randint(k_task, (n_candidates,), 0, tasks.shape[0])
    traj, final = batch_rollout(env, expert_policy(env, epsilon), k_roll, tasks[task_id], max_len)
    success = final.success
    keep = jnp.argsort(~success, stable=True)[:batch_size]
    take = lambda x: x[keep]
    valid = take(traj["valid"]) & take(success)[:, None]
    subgoal = take(traj["subgoal"])
    return dict(
        obs=take(traj["obs"]),
        action=take(traj["action"]).astype(jnp.int32),
        next_cells=env.obs_to_cells(take(traj["next_obs"])),
        mask=valid,
        subgoal=subgoal,
        seg_pos=segment_position(subgoal),
        task_id=take(task_id),
        length=jnp.sum(valid, axis=-1).astype(jnp.int32),
        success=take(success),
    )


class ExpertDataset:
    """Infinite deterministic iterator of `expert_batch` batches (checkpointable state)."""

    def __init__(
        self,
        env: GridPinpad,
        tasks: Any,
        batch_size: int,
        max_len: int,
        epsilon: float = 0.0,
        seed: int = 0,
    ):
        tasks = np.asarray(tasks, np.int32)
        if tasks.ndim != 2 or tasks.shape[0] == 0:
            raise ValueError(f"tasks: expected int32 [N, K] with N >= 1, got shape {tasks.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.env, self.tasks = env, tasks
        self.batch_size, self.max_len, self.epsilon = batch_size, max_len, float(epsilon)
        self.seed, self.step = int(seed), 0
        self._fn = None  # built on first use (subclasses set their own batch function)

    def _grid_program(self):
        """One compiled batch program per (env, tasks, shapes), shared by every dataset."""
        env, tasks, b, t, eps = self.env, self.tasks, self.batch_size, self.max_len, self.epsilon
        return STEPS.get(
            ("internal_rl.expert_batch", env, tasks.tobytes(), tasks.shape, b, t, eps),
            lambda: jax.jit(lambda key: expert_batch(env, key, tasks, b, t, eps)),
        )

    def batch_at(self, step: int) -> dict[str, jax.Array]:
        """The batch with index `step` (independent of the iterator position)."""
        if self._fn is None:
            self._fn = self._grid_program()
        return self._fn(jax.random.fold_in(jax.random.key(self.seed), step))

    def __iter__(self):
        return self

    def next(self) -> dict[str, jax.Array]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    __next__ = next

    def get_state(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def set_state(self, state: dict) -> None:
        if set(state) != {"seed", "step"}:
            raise ValueError(
                f"ExpertDataset.set_state: expected keys seed, step; got {sorted(state)}"
            )
        self.seed, self.step = int(state["seed"]), int(state["step"])
