"""Gridworld-pinpad in pure JAX (internal RL App. A.1).

A G x G grid (G = 7) holds O = 8 uniquely coloured cells, W = 4 wall cells and the agent,
all on distinct cells sampled afresh every episode. Actions move one cell in a cardinal
direction (0 up, 1 right, 2 down, 3 left); moving into a wall or off the grid is a no-op.
A colour is *visited* when the agent moves onto it from another cell. The episode ends
with reward 1 when the task's colour sequence has been visited in order, with reward 0
when a colour other than the next required one is visited, or when T = 100 steps have
been taken. Observation: entity-major binary vector `obs[k * G² + cell]` over the 13
entities (wall_0..wall_3, colour_0..colour_7, agent) -> 637 dims.

Layouts are rejection-sampled inside jit so that every leg of the task (start -> first
colour, colour i -> colour i+1) is reachable while avoiding walls and all non-target
colours. The BFS distance maps computed for that check are kept in the state: they are
privileged information for the scripted expert (`internal_rl.experts`), not observed.

Optional fixed layout pool (`layouts`, a CPU-scale simplification, not the paper's setup):
each episode then takes the walls and colours of one layout drawn uniformly from the pool
and only the agent's start cell is sampled afresh. `sample_layout_pool` builds such a pool
whose colour-to-colour legs are reachable for a given task table.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from internal_rl.envs.base import make_tasks, task_length

# Table A1: the 16 pretraining tasks (3 abstract subgoals = colour pairs each).
PRETRAIN_TASKS: tuple[tuple[int, ...], ...] = (
    (0, 1, 4, 5, 0, 1),
    (0, 1, 4, 5, 2, 3),
    (0, 1, 6, 7, 2, 3),
    (2, 3, 0, 1, 4, 5),
    (2, 3, 6, 7, 2, 3),
    (2, 3, 6, 7, 4, 5),
    (4, 5, 0, 1, 4, 5),
    (4, 5, 0, 1, 6, 7),
    (4, 5, 2, 3, 6, 7),
    (6, 7, 2, 3, 0, 1),
    (6, 7, 2, 3, 6, 7),
    (6, 7, 4, 5, 0, 1),
    (0, 1, 6, 7, 4, 5),
    (2, 3, 0, 1, 6, 7),
    (4, 5, 2, 3, 0, 1),
    (6, 7, 4, 5, 2, 3),
)
# The held-out post-training task A B C D A B (only unseen pair transitions).
POST_TASK: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3)
# A diagnostic long task A C B D C A: as long and as sparse as POST_TASK (6 subgoals, 12
# colours) but made only of pair transitions the pretraining tasks contain (and of colour
# transitions they contain, so every pool layout serves it). It separates the long-horizon,
# sparse-reward part of the held-out problem from the compositional part (unseen pairs).
SEEN_TRANSITION_TASK: tuple[int, ...] = (0, 1, 4, 5, 2, 3, 6, 7, 4, 5, 0, 1)

INF = 10_000  # distance of unreachable / blocked cells (int32, safe against +1 overflow)
_DROW = np.array([-1, 0, 1, 0])
_DCOL = np.array([0, 1, 0, -1])
_CANDIDATES = 8  # layouts drawn per rejection-sampling round
_MAX_ROUNDS = 64  # guard against unsolvable task inputs looping forever


class GridState(NamedTuple):
    """Per-episode state (all int32 unless noted; shapes for one env)."""

    walls: jax.Array  # [W] cell ids
    colours: jax.Array  # [O] cell id of colour c
    agent: jax.Array  # [] cell id
    task: jax.Array  # [K] colour ids, padded with -1
    task_len: jax.Array  # []
    progress: jax.Array  # [] index into task of the next colour to visit
    t: jax.Array  # [] steps taken
    done: jax.Array  # [] bool
    success: jax.Array  # [] bool
    dist: jax.Array  # [O, G*G] BFS distance to colour c avoiding walls + other colours
    solvable: jax.Array  # [] bool, False only if rejection sampling gave up


def neighbour_table(size: int) -> np.ndarray:
    """int32 [size², 4]: cell reached by each action ignoring walls (self at the edge)."""
    rows, cols = np.divmod(np.arange(size * size), size)
    nr = np.clip(rows[:, None] + _DROW[None], 0, size - 1)
    nc = np.clip(cols[:, None] + _DCOL[None], 0, size - 1)
    return (nr * size + nc).astype(np.int32)


def distance_maps(walls: jax.Array, colours: jax.Array, size: int) -> jax.Array:
    """BFS distances to every colour by min-plus relaxation over the 4-neighbourhood.

    walls int32 [W], colours int32 [O] -> int32 [O, size²]; entry [c, x] is the number of
    moves from cell x to colour c's cell through cells that are neither walls nor other
    colours (INF where blocked or unreachable). Sweeps `d <- min(d, 1 + min_nbr d)` (as
    shifted grids, cheaper than gathers on CPU) run until a fixed point, which is reached
    after at most size² - 1 sweeps and in practice after the longest path length + 1.
    """
    n = size * size
    num_colours = colours.shape[0]
    wall_mask = jnp.zeros(n, bool).at[walls].set(True)
    colour_at = jnp.zeros(n, bool).at[colours].set(True)
    own = jax.nn.one_hot(colours, n, dtype=bool)  # [O, n]
    passable = (~wall_mask[None] & (~colour_at[None] | own)).reshape(num_colours, size, size)
    d0 = jnp.where(own, 0, INF).astype(jnp.int32).reshape(num_colours, size, size)

    def sweep(d):
        p = jnp.pad(d, ((0, 0), (1, 1), (1, 1)), constant_values=INF)
        best = jnp.minimum(
            jnp.minimum(p[:, :-2, 1:-1], p[:, 2:, 1:-1]),
            jnp.minimum(p[:, 1:-1, :-2], p[:, 1:-1, 2:]),
        )
        return jnp.where(passable, jnp.minimum(d, jnp.minimum(best + 1, INF)), INF)

    def cond(carry):
        i, d, prev = carry
        return (i < n) & jnp.any(d != prev)

    def body(carry):
        i, d, _ = carry
        return i + 1, sweep(d), d

    _, d, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), sweep(d0), d0))
    return d.reshape(num_colours, n)


@dataclasses.dataclass(frozen=True)
class GridPinpad:
    """Gridworld-pinpad environment (implements `internal_rl.envs.base.PinpadEnv`)."""

    size: int = 7
    num_colours: int = 8
    num_walls: int = 4
    horizon: int = 100
    num_actions: int = 4
    action_shape: tuple[int, ...] = ()
    # Fixed pool of layouts, each (wall cells..., colour cells...) of length W + O; empty =
    # a fresh layout every episode (the paper). Tuples keep the env hashable.
    layouts: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if self.size < 2:
            raise ValueError(f"size: expected >= 2, got {self.size}")
        if self.num_colours % 2:
            raise ValueError(
                f"num_colours: expected an even number (pairs), got {self.num_colours}"
            )
        if self.num_entities > self.size * self.size:
            raise ValueError(
                f"{self.num_entities} entities do not fit a {self.size}x{self.size} grid"
            )
        width = self.num_walls + self.num_colours
        for i, layout in enumerate(self.layouts):
            cells = [int(c) for c in layout]
            if (
                len(cells) != width
                or len(set(cells)) != width
                or not all(0 <= c < self.num_cells for c in cells)
            ):
                raise ValueError(
                    f"layouts[{i}]: expected {width} distinct cell ids in "
                    f"0..{self.num_cells - 1} (walls then colours), got {layout}"
                )

    @property
    def num_cells(self) -> int:
        return self.size * self.size

    @property
    def num_entities(self) -> int:
        """walls + colours + agent."""
        return self.num_walls + self.num_colours + 1

    @property
    def obs_dim(self) -> int:
        return self.num_cells * self.num_entities

    @property
    def num_subgoals(self) -> int:
        """Abstract subgoals are colour pairs (2c, 2c+1)."""
        return self.num_colours // 2

    # ---------------------------------------------------------------- helpers
    def move(self, cell: jax.Array, action: jax.Array, walls: jax.Array) -> jax.Array:
        """Cell after `action` from `cell` (int32 scalars); wall/edge moves are no-ops."""
        target = jnp.asarray(neighbour_table(self.size))[cell, action]
        return jnp.where(jnp.any(walls == target), cell, target)

    def entity_cells(self, state: GridState) -> jax.Array:
        """int32 [13]: cell of wall_0..wall_3, colour_0..colour_7, agent (observation order)."""
        return jnp.concatenate([state.walls, state.colours, state.agent[None]])

    def observe(self, state: GridState) -> jax.Array:
        """f32 [637] entity-major one-hot observation."""
        return jax.nn.one_hot(self.entity_cells(state), self.num_cells).reshape(-1)

    def obs_to_cells(self, obs: jax.Array) -> jax.Array:
        """f32 [..., 637] -> int32 [..., 13] cell of each entity (inverse of `observe`)."""
        blocks = obs.reshape(*obs.shape[:-1], self.num_entities, self.num_cells)
        return jnp.argmax(blocks, axis=-1).astype(jnp.int32)

    def subgoal(self, state: GridState) -> jax.Array:
        """int32 []: the colour pair containing the next colour to visit (clamped at the end)."""
        idx = jnp.minimum(state.progress, state.task_len - 1)
        return state.task[idx] // 2

    def leg_distances(self, state: GridState) -> jax.Array:
        """int32 [K]: shortest number of moves for each leg of the task (INF if blocked).

        Leg 0 starts at the agent's cell, leg i > 0 at colour task[i-1]; padded legs are 0.
        """
        k = state.task.shape[0]
        target = jnp.maximum(state.task, 0)
        prev = jnp.concatenate([state.agent[None], state.colours[target[:-1]]])
        walls = state.walls
        nexts = jax.vmap(
            lambda c: jax.vmap(lambda a: self.move(c, a, walls))(jnp.arange(self.num_actions))
        )(prev)  # [K, A]
        d = state.dist[target[:, None], nexts]  # [K, A]
        leg = jnp.minimum(jnp.min(d, axis=-1) + 1, INF)
        return jnp.where(jnp.arange(k) < state.task_len, leg, 0)

    # ---------------------------------------------------------------- protocol
    def state_from_layout(self, walls, colours, agent, task) -> GridState:
        """Initial state of a given layout: walls int32 [W], colours int32 [O] (cell of
        colour c), agent int32 [], task int32 [K] (-1 padded). Cells must be distinct (not
        checked inside jit); `solvable` is computed."""
        walls = jnp.asarray(walls, jnp.int32)
        colours = jnp.asarray(colours, jnp.int32)
        if walls.shape != (self.num_walls,) or colours.shape != (self.num_colours,):
            raise ValueError(
                f"layout: expected walls [{self.num_walls}] and colours "
                f"[{self.num_colours}], got {walls.shape} and {colours.shape}"
            )
        task = jnp.asarray(task, jnp.int32)
        z = jnp.zeros((), jnp.int32)
        state = GridState(
            walls=walls,
            colours=colours,
            agent=jnp.asarray(agent, jnp.int32),
            task=task,
            task_len=task_length(task),
            progress=z,
            t=z,
            done=jnp.zeros((), bool),
            success=jnp.zeros((), bool),
            dist=distance_maps(walls, colours, self.size),
            solvable=jnp.ones((), bool),
        )
        return state._replace(solvable=self.is_solvable(state))

    def _sample_layout(self, key: jax.Array, task: jax.Array) -> GridState:
        """One candidate layout (13 distinct uniformly random cells, or a pool layout with a
        uniformly random free agent cell)."""
        if self.layouts:
            pool = jnp.asarray(self.layouts, jnp.int32)  # [P, W + O]
            k_pick, k_agent = jax.random.split(key)
            fixed = pool[jax.random.randint(k_pick, (), 0, pool.shape[0])]
            free = ~jnp.any(jnp.arange(self.num_cells)[:, None] == fixed[None], axis=-1)
            agent = jax.random.categorical(k_agent, jnp.where(free, 0.0, -jnp.inf))
            cells = jnp.concatenate([fixed, agent[None].astype(jnp.int32)])
        else:
            cells = jax.random.permutation(key, self.num_cells)[: self.num_entities]
        cells = cells.astype(jnp.int32)
        return self.state_from_layout(
            cells[: self.num_walls],
            cells[self.num_walls : self.num_walls + self.num_colours],
            cells[-1],
            task,
        )

    def is_solvable(self, state: GridState) -> jax.Array:
        """bool []: every leg of the task is reachable."""
        return jnp.all(self.leg_distances(state) < INF)

    def reset(self, key: jax.Array, task: jax.Array) -> tuple[GridState, jax.Array]:
        """Sample a layout in which every leg of `task` (int32 [K], -1 padded) is reachable.

        Rounds of `_CANDIDATES` layouts are drawn until one is solvable (almost always the
        first round); after `_MAX_ROUNDS` rounds the last candidate is kept with
        `solvable=False` (only possible for malformed tasks, e.g. a repeated colour).
        """
        task = jnp.asarray(task, jnp.int32)
        if task.ndim != 1:
            raise ValueError(f"task: expected int32 [K] (one task per env), got shape {task.shape}")

        # docs/internal_rl.md D3: reject layouts in which some leg is unreachable (data and RL
        # alike)
        def draw(k):
            cands = jax.vmap(lambda kk: self._sample_layout(kk, task))(
                jax.random.split(k, _CANDIDATES)
            )
            ok = cands.solvable
            first = jnp.argmax(ok)
            pick = jax.tree.map(lambda x: x[first], cands)
            return pick._replace(solvable=jnp.any(ok))

        def cond(carry):
            i, _, state = carry
            return (~state.solvable) & (i < _MAX_ROUNDS)

        def body(carry):
            i, k, _ = carry
            k, sub = jax.random.split(k)
            return i + 1, k, draw(sub)

        key, sub = jax.random.split(key)
        _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), key, draw(sub)))
        return state, self.observe(state)

    def step(self, state: GridState, action: jax.Array):
        """Advance one step. Returns (state, obs f32[637], reward f32[], done bool[], info).

        info: subgoal (of the new state), colour_visited (the next required colour was
        entered), subgoal_completed (that colour ended its pair), success, wrong_colour,
        timeout, progress. After `done`, the state is frozen and the reward is 0.
        """
        action = jnp.asarray(action, jnp.int32)
        alive = ~state.done
        agent = self.move(state.agent, action, state.walls)
        moved = agent != state.agent
        hit = state.colours == agent  # [O]
        entered = moved & jnp.any(hit)
        colour = jnp.argmax(hit)
        target = state.task[jnp.minimum(state.progress, state.task_len - 1)]
        correct = entered & (colour == target)
        wrong = entered & (colour != target)
        progress = state.progress + correct.astype(jnp.int32)
        success = correct & (progress == state.task_len)
        t = state.t + 1
        timeout = (t >= self.horizon) & ~success & ~wrong
        new = state._replace(
            agent=agent, progress=progress, t=t, done=success | wrong | timeout, success=success
        )
        new = jax.tree.map(lambda n, o: jnp.where(alive, n, o), new, state)
        reward = jnp.where(alive & success, 1.0, 0.0).astype(jnp.float32)
        # A subgoal (pair) is completed when its last colour is visited: the label moves on.
        subgoal = self.subgoal(new)
        segment_end = correct & ((subgoal != self.subgoal(state)) | success)
        info = dict(
            subgoal=subgoal,
            colour_visited=alive & correct,
            subgoal_completed=alive & segment_end,
            success=alive & success,
            wrong_colour=alive & wrong,
            timeout=alive & timeout,
            progress=new.progress,
        )
        return new, self.observe(new), reward, new.done, info


def sample_layout_pool(env: GridPinpad, num_layouts: int, seed: int, tasks) -> tuple:
    """A fixed pool of `num_layouts` layouts for `GridPinpad(layouts=...)`.

    Layouts (W wall cells then O colour cells, distinct, uniformly random from numpy seed
    `seed`) are kept only if every colour-to-colour leg of every task in `tasks` (int32
    [N, K], -1 padded) is reachable avoiding walls and the other colours; the agent's leg
    is checked at each reset. Returns a tuple of `num_layouts` int tuples (deterministic).
    """
    if num_layouts < 1:
        raise ValueError(f"num_layouts: expected >= 1, got {num_layouts}")
    tasks = jnp.asarray(tasks, jnp.int32)
    if tasks.ndim != 2:
        raise ValueError(f"tasks: expected int32 [N, K], got shape {tasks.shape}")
    width = env.num_walls + env.num_colours
    rng = np.random.default_rng(seed)

    @jax.jit
    def legs_ok(layout):
        # the agent's cell only enters leg 0, which is not checked here
        state = env.state_from_layout(
            layout[: env.num_walls], layout[env.num_walls :], jnp.int32(0), tasks[0]
        )
        legs = jax.vmap(
            lambda t: env.leg_distances(state._replace(task=t, task_len=task_length(t)))
        )(tasks)  # [N, K]
        return jnp.all(legs[:, 1:] < INF)

    pool: list[tuple[int, ...]] = []
    for _ in range(1000 * num_layouts):
        cells = rng.permutation(env.num_cells)[:width]
        if bool(legs_ok(jnp.asarray(cells, jnp.int32))):
            pool.append(tuple(int(c) for c in cells))
            if len(pool) == num_layouts:
                return tuple(pool)
    raise RuntimeError(f"sample_layout_pool: found only {len(pool)} of {num_layouts} layouts")


def pretrain_tasks(max_len: int | None = None) -> np.ndarray:
    """int32 [16, max_len] Table A1 tasks (default max_len 6)."""
    return make_tasks(PRETRAIN_TASKS, max_len)


def post_task(max_len: int | None = None) -> np.ndarray:
    """int32 [max_len] held-out 12-colour task (default max_len 12)."""
    return make_tasks([POST_TASK], max_len)[0]


def seen_transition_task(max_len: int | None = None) -> np.ndarray:
    """int32 [max_len] the diagnostic 12-colour task of seen pair transitions (default 12)."""
    return make_tasks([SEEN_TRANSITION_TASK], max_len)[0]


def pair_transitions(tasks) -> set[tuple[int, int]]:
    """Set of (pair, next pair) transitions in colour-sequence tasks (pairs = colour // 2)."""
    out = set()
    for task in tasks:
        pairs = [int(c) // 2 for c in task if c >= 0][::2]
        out.update(zip(pairs[:-1], pairs[1:], strict=False))
    return out
