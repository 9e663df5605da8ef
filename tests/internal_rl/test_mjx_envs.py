"""Continuous pinpads in MJX: cell logic, Point-pinpad + scripted expert, Ant-pinpad
(internal RL App. A.2, docs/internal_rl.md D23).

MJX compiles dominate on a CPU, so each env compiles two programs, shared by every test
through module-scoped fixtures: a batched reset and a batched fixed-length rollout from
given states under given actions (random, constant or zero), in which, for the point mass,
selected envs let the scripted expert act instead. Constructed states are reset states
with the layout and the body position overwritten.
"""

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from internal_rl.envs.ant_pinpad import AntPinpad, is_healthy, symlog
from internal_rl.envs.base import make_task
from internal_rl.envs.gridworld import GridPinpad
from internal_rl.envs.pinpad_layout import (
    PRETRAIN_TASKS,
    CellGrid,
    advance,
    post_task,
    pretrain_tasks,
)
from internal_rl.envs.point_pinpad import PointPinpad
from internal_rl.point_expert import expert_action, next_cell

B_POINT, B_ANT, STEPS = 16, 4, 200
TASK_LEN = 4  # room for the held-out 0-1-2-3: one compiled shape for every task
EVENTS = ("wrong_colour", "wall", "out_of_arena", "failure", "success", "timeout", "colour_visited")


def make_programs(env, with_expert: bool = False):
    """(reset(keys [B], tasks [B, K]), run(states, actions [B, S, A], use_expert bool [B],
    keys [B], noise_std) -> per-step outputs [B, S, ...]). With `with_expert`, envs with
    use_expert act with the scripted point expert instead of the given actions."""
    reset = jax.jit(jax.vmap(env.reset))

    def run_one(state, actions, use_expert, key, noise_std):
        def body(s, xs):
            a, k = xs
            if with_expert:
                a = jnp.where(use_expert, expert_action(env, k, s, noise_std), a)
            s, obs, reward, done, info = env.step(s, a)
            return s, dict(
                obs=obs,
                reward=reward,
                done=done,
                qpos=s.data.qpos,
                progress=s.pad.progress,
                t=s.pad.t,
                **{k: info[k] for k in EVENTS},
            )

        keys = jax.random.split(key, actions.shape[0])
        return jax.lax.scan(body, state, (actions, keys))[1]

    run = jax.jit(jax.vmap(run_one, in_axes=(0, 0, 0, 0, None)))
    return reset, run


def run_actions(run, states, actions):
    """Per-step outputs (numpy) of `run` under the given actions only."""
    b = actions.shape[0]
    out = run(states, actions, jnp.zeros(b, bool), jax.random.split(jax.random.key(9), b), 0.0)
    return jax.tree.map(np.asarray, out)


def tasks_batch(n):
    return jnp.asarray(pretrain_tasks(TASK_LEN)[np.arange(n) % 16])


def tile(items, n):
    return [items[i % len(items)] for i in range(n)]


# one compiled layout builder (BFS included) for every constructed state
_pad_from_layout = jax.jit(
    jax.vmap(GridPinpad.state_from_layout, (None, None, None, 0, 0)), static_argnums=0
)


def with_layout(env, states, walls, colours, agents, tasks, xy):
    """Overwrite the layout, task and position of a batch of reset states (the lists of
    agents, tasks and xy are tiled to the batch size)."""
    n = states.pad.t.shape[0]
    tasks = np.stack([make_task(t, TASK_LEN) for t in tile(tasks, n)])
    pad = _pad_from_layout(
        env.layouts,
        jnp.asarray(walls),
        jnp.asarray(colours),
        jnp.asarray(tile(agents, n)),
        jnp.asarray(tasks),
    )
    qpos = states.data.qpos.at[:, :2].set(jnp.asarray(tile(xy, n), jnp.float32))
    data = states.data.replace(qpos=qpos, qvel=jnp.zeros_like(states.data.qvel))
    return states._replace(pad=pad, data=data)


# ------------------------------------------------------------------------ cell logic
def test_cell_grid_geometry():
    grid = CellGrid(4, 2.0)
    cells = jnp.arange(16)
    centres = grid.centre(cells)
    np.testing.assert_array_equal(grid.cell_of(centres), cells)
    np.testing.assert_allclose(centres[5], [-1.0, -1.0])  # row 1, col 1
    np.testing.assert_allclose(grid.local_coords(centres), 0.0, atol=1e-6)
    np.testing.assert_allclose(grid.local_coords(jnp.asarray([-2.5, 0.5])), [0.5, -0.5])
    outside = jnp.asarray([[4.01, 0.0], [0.0, -4.01], [-5.0, 5.0]])
    np.testing.assert_array_equal(grid.cell_of(outside), -1)
    xy = jax.vmap(grid.sample_in_cell, (0, None))(jax.random.split(jax.random.key(0), 64), 6)
    np.testing.assert_array_equal(grid.cell_of(xy), 6)


def test_tables_and_unseen_transitions():
    assert len(PRETRAIN_TASKS) == 16 and pretrain_tasks().shape == (16, 3)
    pairs = {(t[i], t[i + 1]) for t in PRETRAIN_TASKS for i in range(2)}
    assert pairs == {(0, 2), (0, 3), (1, 0), (1, 3), (2, 0), (2, 1), (3, 1), (3, 2)}
    post = [int(c) for c in post_task()]
    assert post == [0, 1, 2, 3] and not set(zip(post[:-1], post[1:], strict=False)) & pairs


def test_advance_timeout_and_freeze():
    env = PointPinpad(horizon=5)
    tasks = jnp.asarray(np.stack([make_task([0, 1], TASK_LEN)] * B_POINT))
    pads = _pad_from_layout(
        env.layouts,
        jnp.asarray([8]),
        jnp.asarray([1, 2, 4, 15]),
        jnp.zeros(B_POINT, jnp.int32),
        tasks,
    )
    pad = jax.tree.map(lambda x: x[0], pads)
    pad, reward, info = advance(pad._replace(t=jnp.int32(4)), jnp.int32(0), env.horizon)
    assert bool(pad.done) and bool(info["timeout"]) and float(reward) == 0.0
    again, reward, info = advance(pad, jnp.int32(1), env.horizon)  # frozen after done
    assert int(again.progress) == 0 and int(again.t) == 5 and not bool(info["colour_visited"])


# ------------------------------------------------------------------------ point mass
@pytest.fixture(scope="module")
def point():
    env = PointPinpad()
    reset, run = make_programs(env, with_expert=True)
    states, obs = reset(jax.random.split(jax.random.key(0), B_POINT), tasks_batch(B_POINT))
    return env, reset, run, states, obs


def test_point_model_and_reset(point):
    env, _, _, states, obs = point
    assert env.mj_model.nq == 2 and env.mj_model.nu == 2 and env.obs_dim == 16
    assert obs.shape == (B_POINT, 16) and env.action_shape == (2,)
    assert np.all(np.isfinite(obs)) and np.all(np.abs(obs) <= 1.0 + 1e-6)
    np.testing.assert_array_equal(env.grid.cell_of(states.data.qpos[:, :2]), states.pad.agent)
    cells = np.concatenate([states.pad.colours, states.pad.walls, states.pad.agent[:, None]], 1)
    assert all(len(set(row)) == 6 for row in cells.tolist())
    assert np.all(states.pad.solvable) and not np.any(states.done)


def test_point_random_steps_finite(point):
    env, _, run, states, _ = point
    actions = jax.random.uniform(jax.random.key(1), (B_POINT, STEPS, 2), minval=-1, maxval=1)
    out = run_actions(run, states, actions)
    assert out["obs"].shape == (B_POINT, STEPS, env.obs_dim)
    assert np.all(np.isfinite(out["obs"])) and np.all(np.isfinite(out["qpos"]))
    done = out["done"]
    assert np.all(done[:, 1:] >= done[:, :-1])  # done is absorbing
    assert np.all(done[:, -1])  # 200 steps = the horizon
    np.testing.assert_array_equal(out["reward"] > 0, out["success"])
    for b in range(B_POINT):  # frozen after done
        first = int(np.argmax(done[b]))
        np.testing.assert_array_equal(
            out["obs"][b, first:], np.repeat(out["obs"][b, first : first + 1], STEPS - first, 0)
        )


# Layout on the 4 x 4 grid of unit cells (cell = row * 4 + col, x = col - 1.5,
# y = row - 1.5): colours 0..3 at cells 1, 2, 8, 15, the wall at cell 4.
WALLS, COLOURS = [4], [1, 2, 8, 15]
START = [-1.5, -1.5]  # centre of cell 0


def test_point_task_logic(point):
    env, _, run, states, _ = point
    s = with_layout(
        env, states, WALLS, COLOURS, agents=[0], tasks=[[0, 1], [1, 0], [3], [3]], xy=[START]
    )
    push = jnp.asarray(tile([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], B_POINT))
    out = run_actions(run, s, jnp.repeat(push[:, None], STEPS, 1))
    first_done = out["done"].argmax(1)
    # 0: +x visits colour 0 (cell 1) then colour 1 (cell 2): success with reward 1
    assert out["success"][0].any() and out["reward"][0].sum() == 1.0
    assert out["progress"][0, first_done[0]] == 2
    visits = np.nonzero(out["colour_visited"][0])[0]
    assert len(visits) == 2 and visits[0] < visits[1] == first_done[0]
    # 1: +x enters colour 0 while colour 1 is required: wrong colour, no reward
    assert out["wrong_colour"][1, first_done[1]] and out["reward"][1].sum() == 0.0
    assert out["progress"][1, first_done[1]] == 0
    # 2: +y enters the wall cell
    assert out["wall"][2, first_done[2]] and not out["success"][2].any()
    # 3: -x leaves the arena
    assert out["out_of_arena"][3, first_done[3]]
    for b in range(4):  # nothing ends before the event that ends it
        assert not out["done"][b, : first_done[b]].any() and first_done[b] > 0


def test_point_visit_only_on_entering(point):
    env, _, run, states, _ = point
    # start inside colour 0's cell with colour 0 required: standing there is no visit;
    # leaving to cell 0 and coming back is one
    s = with_layout(env, states, WALLS, COLOURS, agents=[1], tasks=[[0, 1]], xy=[[-0.5, -1.5]])
    still = jnp.zeros((B_POINT, STEPS, 2))
    back_and_forth = still.at[:, :8, 0].set(-1.0).at[:, 8:, 0].set(1.0)
    half = B_POINT // 2
    out = run_actions(run, s, jnp.concatenate([still[:half], back_and_forth[half:]]))
    assert not out["colour_visited"][:half].any() and not out["done"][:half, :-1].any()
    # re-entering colour 0 counts, then +x goes on into colour 1: success
    assert np.all(out["colour_visited"][half:].sum(1) == 2)
    assert out["success"][half:].any(1).all()


@pytest.mark.parametrize("layout_seed,noise_std", [(1, 0.1), (2, 0.0)])
def test_point_expert_solves_every_task(point, layout_seed, noise_std):
    env, reset, run, _, _ = point
    for tasks in (tasks_batch(B_POINT), jnp.tile(jnp.asarray(post_task())[None], (B_POINT, 1))):
        states, _ = reset(jax.random.split(jax.random.key(layout_seed), B_POINT), tasks)
        out = run(
            states,
            jnp.zeros((B_POINT, STEPS, 2)),
            jnp.ones(B_POINT, bool),
            jax.random.split(jax.random.key(layout_seed), B_POINT),
            noise_std,
        )
        out = jax.tree.map(np.asarray, out)
        assert np.all(states.pad.solvable)
        success = out["success"].any(1)
        assert np.all(success), f"failed episodes: {np.nonzero(~success)[0]}"
        assert np.all(out["reward"].sum(1) == 1.0) and np.all(out["t"][:, -1] < env.horizon)


def test_point_expert_waypoint_is_a_shortest_path_step(point):
    env, _, _, states, _ = point
    s = with_layout(
        env, states, WALLS, COLOURS, agents=[5], tasks=[[3], [0], [2]], xy=[[-0.5, -0.5]]
    )
    nxt = np.asarray(jax.jit(jax.vmap(lambda st: next_cell(env, st)))(s))
    # from cell 5 to colour 3 (cell 15): both open neighbours (6, 9) are 3 moves away;
    # cell 1 (colour 0) and cell 4 (the wall) are blocked
    assert nxt[0] in (6, 9)
    assert nxt[1] == 1  # colour 0 is the neighbour below
    assert nxt[2] == 9  # colour 2 (cell 8) only around the wall


# ------------------------------------------------------------------------ ant
@pytest.fixture(scope="module")
def ant():
    env = AntPinpad()
    reset, run = make_programs(env)
    states, obs = reset(jax.random.split(jax.random.key(0), B_ANT), tasks_batch(B_ANT))
    return env, reset, run, states, obs


def test_ant_model_matches_spec():
    m = AntPinpad().mj_model
    assert (m.nq, m.nv, m.nu) == (15, 14, 8) and m.opt.timestep == 0.01
    hinges = np.sum(m.jnt_type == mujoco.mjtJoint.mjJNT_HINGE)
    assert hinges == 8 and np.all(m.actuator_gear[:, 0] == 150)
    np.testing.assert_array_equal(m.actuator_ctrlrange, np.tile([-1.0, 1.0], (8, 1)))
    # only foot-floor contacts: the feet have contype, only the floor has conaffinity
    names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_GEOM, g) for g in range(m.ngeom)]
    colliders = {n for n, ct in zip(names, m.geom_contype, strict=True) if ct}
    assert colliders == {
        f"{leg}_foot" for leg in ("front_left", "front_right", "back_left", "back_right")
    }
    assert [n for n, ca in zip(names, m.geom_conaffinity, strict=True) if ca] == ["floor"]
    assert m.opt.solver == mujoco.mjtSolver.mjSOL_NEWTON and m.opt.iterations == 1
    assert m.opt.disableflags & mujoco.mjtDisableBit.mjDSBL_EULERDAMP


def test_ant_reset_and_observation(ant):
    env, _, _, states, obs = ant
    assert obs.shape == (B_ANT, 41) and env.obs_dim == 41 and env.action_shape == (8,)
    qpos, qvel = np.asarray(states.data.qpos), np.asarray(states.data.qvel)
    np.testing.assert_allclose(
        obs[:, :27], symlog(np.concatenate([qpos[:, 2:], qvel], 1)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.norm(qpos[:, 3:7], axis=1), 1.0, rtol=1e-5)
    assert np.all(np.abs(qvel) <= 0.1 + 1e-6)
    np.testing.assert_allclose(
        qpos[:, 7:], np.broadcast_to(env.init_qpos[7:], (B_ANT, 8)), atol=0.1 + 1e-6
    )
    np.testing.assert_array_equal(env.grid.cell_of(qpos[:, :2]), states.pad.agent)
    # position features: normalised xy, vectors to colour / wall centres, in-cell coords
    half, side = env.grid.half_extent, env.grid.size * env.grid.cell_size
    xy = obs[:, 27:29] * half
    np.testing.assert_allclose(xy, qpos[:, :2], atol=1e-5)
    rel = np.asarray(obs[:, 29:39]).reshape(B_ANT, 5, 2) * side
    cells = np.concatenate([states.pad.colours, states.pad.walls], 1)
    np.testing.assert_allclose(xy[:, None] + rel, env.grid.centre(cells), atol=1e-4)
    assert np.all(np.abs(obs[:, 39:]) <= 1.0)


def test_ant_random_steps_finite(ant):
    env, _, run, states, _ = ant
    actions = jax.random.uniform(jax.random.key(1), (B_ANT, STEPS, 8), minval=-0.5, maxval=0.5)
    out = run_actions(run, states, actions)
    assert out["obs"].shape == (B_ANT, STEPS, 41)
    assert np.all(np.isfinite(out["obs"])) and np.all(np.isfinite(out["qpos"]))
    done = out["done"]
    assert np.all(done[:, 1:] >= done[:, :-1])
    alive_z = out["qpos"][..., 2][~done]
    assert np.all((alive_z >= 0.2) & (alive_z <= 1.0))
    # every episode end has a cause, reported on the step that ends it
    ended = done & ~np.concatenate([np.zeros((B_ANT, 1), bool), done[:, :-1]], 1)
    causes = np.stack([out[k] for k in EVENTS if k != "colour_visited"]).any(0)
    np.testing.assert_array_equal(
        causes & ~np.concatenate([np.zeros((B_ANT, 1), bool), done[:, :-1]], 1), ended
    )


def test_ant_height_termination(ant):
    env, _, run, states, _ = ant
    assert list(is_healthy(jnp.asarray([0.1, 0.2, 0.55, 1.0, 1.2]))) == [0, 1, 1, 1, 0]
    qpos = states.data.qpos.at[0, 2].set(2.0)  # thrown above the healthy range
    s = states._replace(data=states.data.replace(qpos=qpos))
    out = run_actions(run, s, jnp.zeros((B_ANT, STEPS, 8)))
    assert out["done"][0, 0] and out["failure"][0, 0] and out["reward"][0].sum() == 0
    assert not out["done"][1:, :10].any()
