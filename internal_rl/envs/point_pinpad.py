"""Point-pinpad: the Ant-pinpad task with a 2-D point mass, simulated in MJX
(docs/internal_rl.md D23).

Body: a unit point mass on two slide joints (x, y) driven by two motors, ctrl in [-1, 1]².
Joint damping and gear are set so that one env step (frame-skip 5 x timestep 0.02 = 0.1 s)
approximates the double integrator `v <- 0.9 v + 0.25 a, x <- x + 0.1 v` of docs/internal_rl.md
D23. The body has no collision geoms: walls and coloured cells are virtual (`pinpad_layout`).

Layout and rules as Ant-pinpad: 4 x 4 cells of size 1, 4 colours, 1 wall, Table A2
pretraining tasks and the held-out 0-1-2-3, visit on entering a cell, termination on the
wall cell, a wrong colour, leaving the arena, success, or T = 200 steps. Reset: random
solvable layout, position uniform inside the start cell, zero velocity.

Observation (16 dims, float32): position normalised to [-1, 1]², velocity / 2, vectors to
the 4 colours and the wall (`layout_features`), in-cell coordinates. Implements
`internal_rl.envs.base.PinpadEnv` (continuous actions: `action_shape = (2,)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from internal_rl.envs.pinpad_layout import (
    ContinuousState,
    MJXPinpad,
    advance,
    freeze_when_done,
    layout_features,
)

POINT_XML = """
<mujoco model="point_pinpad">
  <option timestep="0.02" integrator="Euler" gravity="0 0 0"/>
  <worldbody>
    <body name="point" pos="0 0 0">
      <joint name="slide_x" type="slide" axis="1 0 0" damping="1.05"/>
      <joint name="slide_y" type="slide" axis="0 1 0" damping="1.05"/>
      <geom name="point_geom" type="sphere" size="0.1" mass="1" contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  <actuator>
    <motor name="force_x" joint="slide_x" gear="2.5" ctrllimited="true" ctrlrange="-1 1"/>
    <motor name="force_y" joint="slide_y" gear="2.5" ctrllimited="true" ctrlrange="-1 1"/>
  </actuator>
</mujoco>
"""

VELOCITY_SCALE = 0.5  # observed velocity = qvel * scale (top speed ≈ 2.4 -> ≈ 1.2)


class PointPinpad(MJXPinpad):
    """Point-mass pinpad in MJX (implements `internal_rl.envs.base.PinpadEnv`)."""

    action_shape = (2,)

    def __init__(
        self,
        size: int = 4,
        cell_size: float = 1.0,
        num_colours: int = 4,
        num_walls: int = 1,
        horizon: int = 200,
        frame_skip: int = 5,
    ):
        super().__init__(POINT_XML, size, cell_size, num_colours, num_walls, horizon, frame_skip)
        self.obs_dim = 2 + 2 + 2 * (num_colours + num_walls) + 2

    def observe(self, state: ContinuousState) -> jax.Array:
        """f32 [obs_dim] observation (module docstring)."""
        xy = self.position(state)
        feats = layout_features(self.grid, state.pad, xy)
        return jnp.concatenate([feats[:2], state.data.qvel[:2] * VELOCITY_SCALE, feats[2:]])

    def state_at(self, pad, xy: jax.Array, velocity: jax.Array | None = None) -> ContinuousState:
        """A state with bookkeeping `pad` (GridState) and the point at xy f32 [2] with
        `velocity` (default 0); pad.agent is set to the cell of xy. Derived quantities
        are computed by the next `mjx.step` (as `AntPinpad.state_at`)."""
        data = mjx.make_data(self.model)
        vel = jnp.zeros(2) if velocity is None else jnp.asarray(velocity, jnp.float32)
        data = data.replace(qpos=jnp.asarray(xy, jnp.float32), qvel=vel)
        return ContinuousState(pad._replace(agent=self.grid.cell_of(data.qpos[:2])), data)

    def reset(self, key: jax.Array, task: jax.Array) -> tuple[ContinuousState, jax.Array]:
        """Random solvable layout for `task` (int32 [K], -1 padded); the point starts
        uniformly inside the start cell at rest. Returns (state, obs f32 [obs_dim])."""
        k_layout, k_pos = jax.random.split(key)
        pad, _ = self.layouts.reset(k_layout, task)
        state = self.state_at(pad, self.grid.sample_in_cell(k_pos, pad.agent))
        return state, self.observe(state)

    def step(self, state: ContinuousState, action: jax.Array):
        """Advance one env step. Returns (state, obs f32 [obs_dim], reward f32 [], done
        bool [], info) with the keys of `pinpad_layout.advance`. After `done` the state
        is frozen (physics included) and the reward is 0."""
        data = self.physics(state.data, action)
        pad, reward, info = advance(state.pad, self.grid.cell_of(data.qpos[:2]), self.horizon)
        new = freeze_when_done(~state.done, ContinuousState(pad, data), state)
        return new, self.observe(new), reward, new.done, info
