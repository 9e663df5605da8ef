"""Cell-grid logic shared by the continuous pinpads (Point-pinpad, Ant-pinpad;
internal RL App. A.2, docs/internal_rl.md D23).

The arena is a G x G grid of *virtual* cells of side `cell_size` centred on the origin
(cell id = row * G + col, col along +x, row along +y). Four coloured cells, one wall cell
and the start cell are distinct cells drawn afresh every episode; nothing of the layout is
simulated (no wall or tile geoms): all task logic reads the body's (x, y) only.

The layout and task bookkeeping reuse the discrete grid world: a `GridPinpad(size=G,
num_colours=4, num_walls=1)` samples layouts in which every leg of the task is reachable
(docs/internal_rl.md D3) and keeps the BFS distance maps the scripted experts plan with. Its state
(`GridState`) is carried as `ContinuousState.pad`, with `pad.agent` = the body's current
cell. `advance` applies the pinpad rules after a physics step: a colour is visited when
the body's centre enters its cell from another cell; the episode ends on success, on a
wrong colour, on entering the wall cell, on leaving the arena (docs/internal_rl.md D8), on an
env-specific failure (the ant's torso height) and at the horizon. Unlike the grid world
the subgoal label is the next colour itself (4 classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import mjx

from internal_rl.envs.base import make_tasks
from internal_rl.envs.gridworld import GridPinpad, GridState

# Table A2: the 16 pretraining tasks (3 colours each) and the held-out task.
PRETRAIN_TASKS: tuple[tuple[int, ...], ...] = (
    (0, 3, 2),
    (1, 0, 3),
    (2, 1, 0),
    (3, 2, 1),
    (0, 2, 0),
    (0, 2, 1),
    (0, 3, 1),
    (1, 0, 2),
    (1, 3, 1),
    (1, 3, 2),
    (2, 0, 2),
    (2, 0, 3),
    (2, 1, 3),
    (3, 1, 0),
    (3, 1, 3),
    (3, 2, 0),
)
POST_TASK: tuple[int, ...] = (0, 1, 2, 3)
# Diagnostic (not in the paper): as long as the held-out task, but every colour-to-colour
# transition (0→3, 3→2, 2→1) occurs in the pretraining tasks, whereas 0→1, 1→2 and 2→3
# never do.
SEEN_TRANSITION_TASK: tuple[int, ...] = (0, 3, 2, 1)


def pretrain_tasks(max_len: int | None = None) -> np.ndarray:
    """int32 [16, max_len] Table A2 tasks, padded with -1 (default max_len 3)."""
    return make_tasks(PRETRAIN_TASKS, max_len)


def post_task(max_len: int | None = None) -> np.ndarray:
    """int32 [max_len] held-out task 0-1-2-3 (default max_len 4)."""
    return make_tasks([POST_TASK], max_len)[0]


def seen_transition_task(max_len: int | None = None) -> np.ndarray:
    """int32 [max_len] the diagnostic task 0-3-2-1 of seen transitions (default max_len 4)."""
    return make_tasks([SEEN_TRANSITION_TASK], max_len)[0]


@dataclasses.dataclass(frozen=True)
class CellGrid:
    """Geometry of the G x G virtual cell grid centred on the origin."""

    size: int = 4
    cell_size: float = 1.0

    def __post_init__(self):
        if self.size < 2 or self.cell_size <= 0:
            raise ValueError(
                f"CellGrid: expected size >= 2 and cell_size > 0, got "
                f"{self.size} and {self.cell_size}"
            )

    @property
    def half_extent(self) -> float:
        """Half the arena side: the arena is [-h, h]²."""
        return 0.5 * self.size * self.cell_size

    def cell_of(self, xy: jax.Array) -> jax.Array:
        """f32 [..., 2] -> int32 [...] cell id, -1 outside the arena."""
        ij = jnp.floor((xy + self.half_extent) / self.cell_size).astype(jnp.int32)
        inside = jnp.all((ij >= 0) & (ij < self.size), axis=-1)
        return jnp.where(inside, ij[..., 1] * self.size + ij[..., 0], -1)

    def centre(self, cell: jax.Array) -> jax.Array:
        """int32 [...] cell id -> f32 [..., 2] centre (x, y)."""
        row, col = jnp.divmod(jnp.asarray(cell, jnp.int32), self.size)
        ij = jnp.stack([col, row], axis=-1).astype(jnp.float32)
        return (ij + 0.5) * self.cell_size - self.half_extent

    def local_coords(self, xy: jax.Array) -> jax.Array:
        """f32 [..., 2] -> position inside the current cell, f32 [..., 2] in [-1, 1]²."""
        frac = jnp.mod(xy + self.half_extent, self.cell_size) / self.cell_size
        return 2.0 * frac - 1.0

    def normalise(self, xy: jax.Array) -> jax.Array:
        """f32 [..., 2] world position -> [-1, 1]² over the arena."""
        return xy / self.half_extent

    def sample_in_cell(self, key: jax.Array, cell: jax.Array, margin: float = 0.0) -> jax.Array:
        """Uniform position f32 [2] inside `cell`, at least `margin` from its border."""
        half = 0.5 * self.cell_size - margin
        return self.centre(cell) + jax.random.uniform(key, (2,), minval=-half, maxval=half)


class ContinuousState(NamedTuple):
    """State of a continuous pinpad: the task bookkeeping and the physics.

    pad: GridState (layout, task, progress, t, done, success, BFS distances; `pad.agent`
      is the body's current cell). data: the physics state (an `mjx.Data`).
    """

    pad: GridState
    data: Any

    @property
    def done(self) -> jax.Array:
        return self.pad.done

    @property
    def success(self) -> jax.Array:
        return self.pad.success

    @property
    def progress(self) -> jax.Array:
        return self.pad.progress

    @property
    def t(self) -> jax.Array:
        return self.pad.t


def layout_sampler(
    grid: CellGrid, num_colours: int = 4, num_walls: int = 1, horizon: int = 500
) -> GridPinpad:
    """The discrete pinpad whose `reset` samples solvable layouts for this grid."""
    return GridPinpad(size=grid.size, num_colours=num_colours, num_walls=num_walls, horizon=horizon)


def next_colour(pad: GridState) -> jax.Array:
    """int32 []: the colour to visit next (the last one once the task is complete)."""
    return pad.task[jnp.minimum(pad.progress, pad.task_len - 1)]


def layout_features(grid: CellGrid, pad: GridState, xy: jax.Array) -> jax.Array:
    """Observation part shared by the continuous pinpads (docs/internal_rl.md D9),
    f32 [2 + 2(O+W) + 2]:

    the body's position normalised to [-1, 1]², the vector from the body to every coloured
    cell's centre (by colour id) then to every wall cell, divided by the arena side G·c, in
    the world frame, and the body's coordinates inside its cell in [-1, 1]².
    """
    targets = grid.centre(jnp.concatenate([pad.colours, pad.walls]))  # [O+W, 2]
    rel = (targets - xy[None]) / (grid.size * grid.cell_size)
    return jnp.concatenate([grid.normalise(xy), rel.reshape(-1), grid.local_coords(xy)])


def advance(
    pad: GridState, new_cell: jax.Array, horizon: int, failure: jax.Array | bool = False
) -> tuple[GridState, jax.Array, dict[str, jax.Array]]:
    """Pinpad rules after one physics step that moved the body into `new_cell`.

    pad: the state before the step; new_cell int32 [] (-1 outside the arena); failure:
    bool [] env-specific termination (e.g. the ant's torso height). Returns (pad after
    the step, reward f32 [], info) with the gridworld's info keys (subgoal,
    colour_visited, subgoal_completed, success, wrong_colour, timeout, progress) plus
    wall, out_of_arena and failure. After `done`, the pad is frozen and the reward is 0.
    """
    alive = ~pad.done
    outside = new_cell < 0
    moved = new_cell != pad.agent
    hit = pad.colours == new_cell  # [O]
    entered = moved & jnp.any(hit)
    target = next_colour(pad)
    correct = entered & (jnp.argmax(hit) == target)
    wrong = entered & ~correct
    wall = jnp.any(pad.walls == new_cell)
    failure = jnp.asarray(failure, bool)
    progress = pad.progress + correct.astype(jnp.int32)
    success = correct & (progress == pad.task_len)
    failed = wrong | wall | outside | failure
    t = pad.t + 1
    timeout = (t >= horizon) & ~success & ~failed
    new = pad._replace(
        agent=jnp.where(outside, pad.agent, new_cell),
        progress=progress,
        t=t,
        done=success | failed | timeout,
        success=success,
    )
    new = jax.tree.map(lambda n, o: jnp.where(alive, n, o), new, pad)
    reward = jnp.where(alive & success, 1.0, 0.0).astype(jnp.float32)
    info = dict(
        subgoal=next_colour(new),
        colour_visited=alive & correct,
        # every colour is its own subgoal, so visiting it completes the subgoal
        subgoal_completed=alive & correct,
        success=alive & success,
        wrong_colour=alive & wrong,
        timeout=alive & timeout,
        progress=new.progress,
        wall=alive & wall,
        out_of_arena=alive & outside,
        failure=alive & failure,
    )
    return new, reward, info


def freeze_when_done(alive: jax.Array, new: Any, old: Any) -> Any:
    """Pytree `new` where alive (bool []), else `old` (the state after `done` is frozen)."""
    return jax.tree.map(lambda n, o: jnp.where(alive, n, o), new, old)


def mjx_physics(model: mjx.Model, data: mjx.Data, action: jax.Array, frame_skip: int) -> mjx.Data:
    """``frame_skip`` MJX steps of ``model`` with ctrl = clip(action f32 [nu], -1, 1) held
    constant (the control rate of both continuous pinpads)."""
    data = data.replace(ctrl=jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0))

    def body(d, _):
        return mjx.step(model, d), None

    data, _ = jax.lax.scan(body, data, None, length=frame_skip)
    return data


class MJXPinpad:
    """What the MJX pinpads share: the cell grid, the layout sampler, the compiled MJX model
    (always ``impl="jax"``: differentiable and runs on every backend), the frame-skipped
    physics and the subgoal readout. Subclasses add the body, reset and observation."""

    num_actions = None

    def __init__(
        self,
        xml: str,
        size: int,
        cell_size: float,
        num_colours: int,
        num_walls: int,
        horizon: int,
        frame_skip: int,
    ):
        if horizon < 1 or frame_skip < 1:
            raise ValueError(
                f"{type(self).__name__}: expected horizon >= 1 and frame_skip >= 1, "
                f"got {horizon} and {frame_skip}"
            )
        self.grid = CellGrid(size, cell_size)
        self.num_colours, self.num_walls = num_colours, num_walls
        self.num_subgoals = num_colours
        self.horizon, self.frame_skip = horizon, frame_skip
        self.layouts = layout_sampler(self.grid, num_colours, num_walls, horizon)
        self.mj_model = mujoco.MjModel.from_xml_string(xml)
        self.model = mjx.put_model(self.mj_model, impl="jax")

    @property
    def dt(self) -> float:
        """Seconds of simulated time per env step."""
        return self.frame_skip * float(self.mj_model.opt.timestep)

    def position(self, state: ContinuousState) -> jax.Array:
        """f32 [2]: the body's (x, y)."""
        return state.data.qpos[:2]

    def subgoal(self, state: ContinuousState) -> jax.Array:
        """int32 []: the next colour to visit (analysis only)."""
        return next_colour(state.pad)

    def physics(self, data: mjx.Data, action: jax.Array) -> mjx.Data:
        """frame_skip MJX steps with ctrl = clip(action f32 [nu], -1, 1)."""
        return mjx_physics(self.model, data, action, self.frame_skip)
