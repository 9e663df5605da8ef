"""Ant-pinpad in MJX (internal RL App. A.2; docs/internal_rl.md D7-D9).

Body: the classic MuJoCo quadruped ant (Gym / Brax `ant.xml` geometry, written out in
`ANT_XML`): a free torso sphere and four legs with 8 hinge joints (hip about z, ankle
about the leg's normal), 8 motors with gear 150 and ctrl in [-1, 1], timestep 0.01 and
frame-skip 5 (control dt 0.05, docs/internal_rl.md D7). Only the four foot spheres collide, and only
with the floor plane, and the solver uses the Brax MJX settings (Newton, 1 iteration,
4 line-search iterations, Euler damping disabled: stable and cheap, docs/internal_rl.md D7).

Task layer (`pinpad_layout`): 4 x 4 virtual cells of side 2 (docs/internal_rl.md D8), 4 colours,
1 wall, the Table A2 pretraining tasks and the held-out 0-1-2-3, visit on entering a cell.
Termination: the torso centre enters the wall cell or leaves the arena, the torso height
leaves [0.2, 1.0], a wrong colour, success, or T = 500 steps. Reward 1 on success.

Reset: random solvable layout; torso (x, y) uniform inside the start cell, uniformly
random yaw, every other qpos entry (height, joint angles) and every velocity the nominal
value plus U(-0.1, 0.1).

Observation (41 dims, float32; docs/internal_rl.md D9): symlog of the proprioception qpos[2:] (13)
and qvel (14), then `layout_features`: torso (x, y) normalised to [-1, 1]², the world-frame
vectors to the 4 colours and the wall divided by the arena side, and the torso's
coordinates inside its cell.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from mujoco import mjx

from internal_rl.envs.pinpad_layout import (
    ContinuousState,
    MJXPinpad,
    advance,
    freeze_when_done,
    layout_features,
)


def _leg(name: str, sx: int, sy: int, ankle_axis: str, ankle_range: str) -> str:
    """MJCF of one leg pointing along (sx, sy) with its foot sphere (the only collider)."""
    a, b, c = f"{0.2 * sx} {0.2 * sy}", f"{0.2 * sx} {0.2 * sy}", f"{0.4 * sx} {0.4 * sy}"
    return f"""
      <body name="{name}_leg" pos="0 0 0">
        <geom name="{name}_aux_geom" fromto="0 0 0 {a} 0" size="0.08" type="capsule"/>
        <body name="{name}_aux" pos="{a} 0">
          <joint name="{name}_hip" axis="0 0 1" range="-30 30" type="hinge"/>
          <geom name="{name}_leg_geom" fromto="0 0 0 {b} 0" size="0.08" type="capsule"/>
          <body name="{name}_lower" pos="{b} 0">
            <joint name="{name}_ankle" axis="{ankle_axis}" range="{ankle_range}" type="hinge"/>
            <geom name="{name}_ankle_geom" fromto="0 0 0 {c} 0" size="0.08" type="capsule"/>
            <geom name="{name}_foot" pos="{c} 0" size="0.08" type="sphere" contype="1"
                  conaffinity="0"/>
          </body>
        </body>
      </body>"""


ANT_XML = f"""
<mujoco model="ant_pinpad">
  <compiler angle="degree" inertiafromgeom="true"/>
  <option timestep="0.01" integrator="Euler" solver="Newton" iterations="1" ls_iterations="4">
    <flag eulerdamp="disable"/>
  </option>
  <custom>
    <numeric name="init_qpos" data="0 0 0.55 1 0 0 0 0 1 0 -1 0 -1 0 1"/>
  </custom>
  <default>
    <joint armature="1" damping="1" limited="true"/>
    <geom contype="0" conaffinity="0" condim="3" density="5.0" friction="1 0.5 0.5"
          margin="0.01" rgba="0.8 0.6 0.4 1"/>
  </default>
  <worldbody>
    <geom name="floor" type="plane" size="40 40 40" pos="0 0 0" contype="0" conaffinity="1"
          rgba="0.8 0.9 0.8 1"/>
    <body name="torso" pos="0 0 0.55">
      <geom name="torso_geom" pos="0 0 0" size="0.25" type="sphere"/>
      <joint name="root" type="free" armature="0" damping="0" limited="false" margin="0.01"/>
      {_leg("front_left", 1, 1, "-1 1 0", "30 70")}
      {_leg("front_right", -1, 1, "1 1 0", "-70 -30")}
      {_leg("back_left", -1, -1, "-1 1 0", "-70 -30")}
      {_leg("back_right", 1, -1, "1 1 0", "30 70")}
    </body>
  </worldbody>
  <actuator>
    <motor joint="back_right_hip" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="back_right_ankle" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="front_left_hip" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="front_left_ankle" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="front_right_hip" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="front_right_ankle" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="back_left_hip" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
    <motor joint="back_left_ankle" ctrllimited="true" ctrlrange="-1 1" gear="150"/>
  </actuator>
</mujoco>
"""

HEALTHY_Z = (0.2, 1.0)  # torso height range (Gymnasium Ant-v4 healthy_z_range)


def symlog(x: jax.Array) -> jax.Array:
    """sign(x) · log(1 + |x|), elementwise."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def yaw_quaternion(yaw: jax.Array) -> jax.Array:
    """f32 [] yaw (rad) -> unit quaternion (w, x, y, z) f32 [4] about the world z axis."""
    return jnp.stack([jnp.cos(0.5 * yaw), 0.0 * yaw, 0.0 * yaw, jnp.sin(0.5 * yaw)])


def is_healthy(z: jax.Array) -> jax.Array:
    """bool [...]: the torso height f32 [...] lies in HEALTHY_Z."""
    return (z >= HEALTHY_Z[0]) & (z <= HEALTHY_Z[1])


class AntPinpad(MJXPinpad):
    """Ant-pinpad in MJX (implements `internal_rl.envs.base.PinpadEnv`)."""

    action_shape = (8,)

    def __init__(
        self,
        size: int = 4,
        cell_size: float = 2.0,
        num_colours: int = 4,
        num_walls: int = 1,
        horizon: int = 500,
        frame_skip: int = 5,
        reset_noise: float = 0.1,
    ):
        super().__init__(ANT_XML, size, cell_size, num_colours, num_walls, horizon, frame_skip)
        self.reset_noise = reset_noise
        self.init_qpos = np.asarray(self.mj_model.numeric("init_qpos").data, np.float32)
        self.nq, self.nv = int(self.mj_model.nq), int(self.mj_model.nv)
        self.obs_dim = (self.nq - 2) + self.nv + 2 + 2 * (num_colours + num_walls) + 2

    def observe(self, state: ContinuousState) -> jax.Array:
        """f32 [obs_dim] observation (module docstring)."""
        data = state.data
        # docs/internal_rl.md D9: proprio = symlog(qpos[2:], qvel), no contact forces
        proprio = symlog(jnp.concatenate([data.qpos[2:], data.qvel]))
        return jnp.concatenate([proprio, layout_features(self.grid, state.pad, data.qpos[:2])])

    def state_at(self, pad, qpos: jax.Array, qvel: jax.Array) -> ContinuousState:
        """A state with bookkeeping `pad` (GridState) and the ant at qpos f32 [15], qvel
        f32 [14]; pad.agent is set to the torso's cell.

        Only qpos / qvel are set: quantities derived from them (body poses, contacts) are
        computed by the next `mjx.step` (its forward pass), which keeps `mjx.forward` out
        of the reset program (it would double the compile time on a CPU).
        """
        data = mjx.make_data(self.model).replace(
            qpos=jnp.asarray(qpos, jnp.float32), qvel=jnp.asarray(qvel, jnp.float32)
        )
        return ContinuousState(pad._replace(agent=self.grid.cell_of(data.qpos[:2])), data)

    def reset(self, key: jax.Array, task: jax.Array) -> tuple[ContinuousState, jax.Array]:
        """Random solvable layout for `task` (int32 [K], -1 padded) and a randomised ant in
        the start cell. Returns (state, obs f32 [obs_dim])."""
        k_layout, k_xy, k_yaw, k_q, k_v = jax.random.split(key, 5)
        pad, _ = self.layouts.reset(k_layout, task)
        noise = self.reset_noise
        qpos = jnp.asarray(self.init_qpos) + jax.random.uniform(
            k_q, (self.nq,), minval=-noise, maxval=noise
        )
        yaw = jax.random.uniform(k_yaw, (), minval=-jnp.pi, maxval=jnp.pi)
        qpos = qpos.at[:2].set(self.grid.sample_in_cell(k_xy, pad.agent))
        qpos = qpos.at[3:7].set(yaw_quaternion(yaw))
        qvel = jax.random.uniform(k_v, (self.nv,), minval=-noise, maxval=noise)
        state = self.state_at(pad, qpos, qvel)
        return state, self.observe(state)

    def step(self, state: ContinuousState, action: jax.Array):
        """Advance one env step. Returns (state, obs f32 [obs_dim], reward f32 [], done
        bool [], info) with the keys of `pinpad_layout.advance` (info["failure"] = the
        torso height left [0.2, 1.0]). After `done` the state is frozen and the reward 0."""
        data = self.physics(state.data, action)
        unhealthy = ~is_healthy(data.qpos[2])
        pad, reward, info = advance(
            state.pad, self.grid.cell_of(data.qpos[:2]), self.horizon, failure=unhealthy
        )
        new = freeze_when_done(~state.done, ContinuousState(pad, data), state)
        return new, self.observe(new), reward, new.done, info
