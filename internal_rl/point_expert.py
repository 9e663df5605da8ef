"""Scripted expert for Point-pinpad (docs/internal_rl.md D23): BFS over cells -> next waypoint
-> PD control.

The expert reads the privileged env state: the BFS distance map of the current target
colour over the 4 x 4 cells (wall and all other colours blocked; computed at reset by
`GridPinpad`). Its waypoint is the centre of the neighbouring cell that is one step closer
to the target. A straight line from anywhere in a cell to the centre of a 4-neighbour
stays inside those two cells, so tracking it never touches a forbidden cell; the speed
cap keeps the overshoot after a turn inside the cell just entered.

Control: desired velocity `v* = v_max · (w − x) / max(|w − x|, r_slow)` (saturated
proportional term), action `a = clip(k_v (v* − v), −1, 1)` (a PD law on position with a
speed limit), plus optional Gaussian noise `N(0, σ²)` before clipping: σ = 0.1 for the
pretraining data D, σ = 0 for the metacontroller data D* (the analogue of sampling the
ant expert's Gaussian policy vs taking its mean, internal RL App. C.1.1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from internal_rl.envs.base import PolicyFn, stateless
from internal_rl.envs.gridworld import neighbour_table
from internal_rl.envs.pinpad_layout import ContinuousState, next_colour
from internal_rl.envs.point_pinpad import PointPinpad


@dataclasses.dataclass(frozen=True)
class PDGains:
    """Expert controller constants (in world units; cell side 1, top speed ≈ 2.4)."""

    max_speed: float = 1.5
    slow_radius: float = 0.3
    velocity_gain: float = 3.0


def next_cell(env: PointPinpad, state: ContinuousState) -> jax.Array:
    """int32 []: the neighbour of the current cell on a shortest path to the target colour."""
    pad = state.pad
    dist = pad.dist[next_colour(pad)]  # [G²]
    neighbours = jnp.asarray(neighbour_table(env.grid.size))[pad.agent]  # [4]
    return neighbours[jnp.argmin(dist[neighbours])]


def waypoint(env: PointPinpad, state: ContinuousState) -> jax.Array:
    """f32 [2]: centre of `next_cell`."""
    return env.grid.centre(next_cell(env, state))


def expert_action(
    env: PointPinpad,
    key: jax.Array,
    state: ContinuousState,
    noise_std: float | jax.Array = 0.0,
    gains: PDGains = PDGains(),
) -> jax.Array:
    """f32 [2] action in [-1, 1]² towards the next waypoint (plus clipped Gaussian noise)."""
    x = env.position(state)
    v = state.data.qvel[:2]
    err = waypoint(env, state) - x
    v_star = gains.max_speed * err / jnp.maximum(jnp.linalg.norm(err), gains.slow_radius)
    action = gains.velocity_gain * (v_star - v)
    action = action + noise_std * jax.random.normal(key, (2,))
    return jnp.clip(action, -1.0, 1.0)


def expert_policy(
    env: PointPinpad, noise_std: float | jax.Array = 0.0, gains: PDGains = PDGains()
) -> PolicyFn:
    """Policy for `envs.base.rollout`: (carry, key, obs, state) -> (carry, action f32 [2]).

    noise_std may be a traced scalar (one compiled rollout for D and D*).
    """
    if isinstance(noise_std, (int, float)) and noise_std < 0:
        raise ValueError(f"noise_std: expected >= 0, got {noise_std}")
    return stateless(lambda key, obs, state: expert_action(env, key, state, noise_std, gains))
