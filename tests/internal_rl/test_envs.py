"""Gridworld-pinpad invariants (internal RL App. A.1, docs/internal_rl.md D24)."""

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internal_rl.envs import (
    POST_TASK,
    PRETRAIN_TASKS,
    SEEN_TRANSITION_TASK,
    GridPinpad,
    make_task,
    pair_transitions,
    post_task,
    pretrain_tasks,
)
from internal_rl.envs.gridworld import INF, distance_maps, sample_layout_pool

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3
ENV = GridPinpad()


def cell(r, c):
    return r * 7 + c


# Agent at (3,3); colour 0 right of it, colour 1 two to the right, colour 2 below it;
# walls above the agent and above colour 0.
WALLS = [cell(2, 3), cell(2, 4), cell(0, 0), cell(0, 1)]
COLOURS = [
    cell(3, 4),
    cell(3, 5),
    cell(4, 3),
    cell(6, 0),
    cell(6, 1),
    cell(6, 2),
    cell(6, 3),
    cell(6, 4),
]
AGENT = cell(3, 3)


@pytest.fixture(scope="module")
def step():
    return jax.jit(ENV.step)


@pytest.fixture(scope="module")
def layout_state():
    def make(task, agent=AGENT, env=ENV):
        return env.state_from_layout(WALLS, COLOURS, agent, make_task(task, 6))

    return make


def run(step, state, actions):
    out = []
    for a in actions:
        state, obs, reward, done, info = step(state, jnp.int32(a))
        out.append((state, obs, float(reward), bool(done), info))
    return out


def test_observation_is_entity_major_637_binary(layout_state):
    state = layout_state([0, 1])
    obs = np.asarray(ENV.observe(state))
    assert obs.shape == (637,) and ENV.obs_dim == 637
    assert set(np.unique(obs)) == {0.0, 1.0}
    blocks = obs.reshape(13, 49)
    assert (blocks.sum(1) == 1).all()  # one cell per entity
    np.testing.assert_array_equal(blocks.argmax(1), WALLS + COLOURS + [AGENT])
    np.testing.assert_array_equal(ENV.obs_to_cells(jnp.asarray(obs)), WALLS + COLOURS + [AGENT])


def test_wall_and_edge_moves_are_noops(step, layout_state):
    state = layout_state([0, 1])
    ((s1, *_),) = run(step, state, [UP])  # wall above
    assert int(s1.agent) == AGENT and int(s1.t) == 1 and not bool(s1.done)
    corner = layout_state([0, 1], agent=cell(0, 6))
    outs = run(step, corner, [UP, RIGHT])
    assert [int(o[0].agent) for o in outs] == [cell(0, 6), cell(0, 6)]
    ((s2, *_),) = run(step, corner, [LEFT])
    assert int(s2.agent) == cell(0, 5)


def test_visit_on_entering_only_and_full_sequence_rewards_one(step, layout_state):
    state = layout_state([0, 1])
    outs = run(step, state, [RIGHT, UP, UP, RIGHT])
    # enter colour 0: progress 1, no reward yet
    assert int(outs[0][0].progress) == 1 and outs[0][2] == 0.0 and not outs[0][3]
    assert bool(outs[0][4]["colour_visited"]) and not bool(outs[0][4]["subgoal_completed"])
    # bumping the wall while standing on colour 0 does not re-trigger it
    for o in outs[1:3]:
        assert int(o[0].agent) == cell(3, 4) and int(o[0].progress) == 1 and not o[3]
    # enter colour 1: task complete
    last_state, _, reward, done, info = outs[3]
    assert reward == 1.0 and done and bool(last_state.success) and bool(info["success"])
    assert [o[2] for o in outs].count(1.0) == 1


def test_wrong_colour_terminates_with_zero_reward(step, layout_state):
    state = layout_state([0, 1])
    ((s1, _, reward, done, info),) = run(step, state, [DOWN])  # colour 2
    assert done and reward == 0.0 and not bool(s1.success) and bool(info["wrong_colour"])
    # revisiting an already visited colour out of order is also fatal
    outs = run(step, state, [RIGHT, DOWN, UP])  # enter 0, leave, re-enter 0 (target is 1)
    assert outs[-1][3] and outs[-1][2] == 0.0 and bool(outs[-1][4]["wrong_colour"])


def test_done_state_is_frozen_and_reward_zero(step, layout_state):
    state = layout_state([0, 1])
    outs = run(step, state, [RIGHT, RIGHT, LEFT, LEFT])
    assert outs[1][2] == 1.0
    for s, _, r, d, _ in outs[2:]:
        assert r == 0.0 and d and int(s.agent) == cell(3, 5) and int(s.t) == 2


def test_time_limit(layout_state):
    env = GridPinpad(horizon=3)
    state = layout_state([0, 1], env=env)
    step = jax.jit(env.step)
    outs = run(step, state, [UP, UP, UP])
    assert [o[3] for o in outs] == [False, False, True]
    assert bool(outs[-1][4]["timeout"]) and outs[-1][2] == 0.0


def test_subgoal_label_is_the_current_pair(step, layout_state):
    state = layout_state([0, 1, 4, 5])
    assert int(ENV.subgoal(state)) == 0
    (s1, _, _, _, info), (s2, _, _, _, info2) = run(step, state, [RIGHT, RIGHT])
    assert int(info["subgoal"]) == 0 and int(info2["subgoal"]) == 2  # pair C = colours 4-5
    assert bool(info2["subgoal_completed"])


def test_task_tables():
    assert len(PRETRAIN_TASKS) == 16 and all(len(t) == 6 for t in PRETRAIN_TASKS)
    assert len(set(PRETRAIN_TASKS)) == 16
    trans = pair_transitions(PRETRAIN_TASKS)
    A, B, C, D = range(4)
    assert trans == {(A, C), (A, D), (B, A), (B, D), (C, A), (C, B), (D, B), (D, C)}
    cyclic = {(A, B), (B, C), (C, D), (D, A)}
    assert not trans & cyclic
    assert pair_transitions([POST_TASK]) == cyclic and len(POST_TASK) == 12
    # the diagnostic task: as long as the held-out one, only seen pair and colour transitions
    assert pair_transitions([SEEN_TRANSITION_TASK]) <= trans and len(SEEN_TRANSITION_TASK) == 12
    assert SEEN_TRANSITION_TASK not in PRETRAIN_TASKS
    colour_steps = lambda ts: {(t[i], t[i + 1]) for t in ts for i in range(len(t) - 1)}
    assert colour_steps([SEEN_TRANSITION_TASK]) <= colour_steps(PRETRAIN_TASKS)
    # every task visits pairs as units (first colour even, then its partner)
    for t in PRETRAIN_TASKS + (POST_TASK, SEEN_TRANSITION_TASK):
        assert all(t[i] % 2 == 0 and t[i + 1] == t[i] + 1 for i in range(0, len(t), 2))
    assert pretrain_tasks().shape == (16, 6) and post_task(16).shape == (16,)
    with pytest.raises(ValueError, match="task"):
        make_task([0, 1, 2], max_len=2)


def _bfs(walls, colours, target_colour, size=7):
    blocked = set(walls) | {c for i, c in enumerate(colours) if i != target_colour}
    dist = np.full(size * size, INF)
    start = colours[target_colour]
    dist[start] = 0
    q = deque([start])
    while q:
        x = q.popleft()
        r, c = divmod(x, size)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            nr, nc = r + dr, c + dc
            y = nr * size + nc
            if 0 <= nr < size and 0 <= nc < size and y not in blocked and dist[y] == INF:
                dist[y] = dist[x] + 1
                q.append(y)
    return dist


def test_distance_maps_match_python_bfs():
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda w, c: distance_maps(w, c, 7))
    for _ in range(5):
        cells = rng.permutation(49)[:12]
        walls, colours = cells[:4].tolist(), cells[4:].tolist()
        d = np.asarray(fn(jnp.asarray(walls), jnp.asarray(colours)))
        for k in range(8):
            np.testing.assert_array_equal(d[k], _bfs(walls, colours, k))


def test_unreachable_layout_is_flagged_and_reset_rejects_it():
    # colour 0 boxed in by walls (corner cell (0,0) with walls at (0,1), (1,0))
    walls = [cell(0, 1), cell(1, 0), cell(5, 5), cell(5, 6)]
    colours = [cell(0, 0)] + [cell(6, i) for i in range(7)]
    state = ENV.state_from_layout(walls, colours, cell(3, 3), make_task([0, 1]))
    assert not bool(state.solvable)
    ok = ENV.state_from_layout(walls, colours, cell(3, 3), make_task([2, 3]))
    assert bool(ok.solvable)


@pytest.fixture(scope="module")
def reset_batch():
    tasks = jnp.asarray(pretrain_tasks())[jnp.arange(64) % 16]
    keys = jax.random.split(jax.random.key(0), 64)
    return jax.jit(jax.vmap(ENV.reset)), keys, tasks


def test_reset_layouts_distinct_solvable_and_deterministic(reset_batch):
    reset, keys, tasks = reset_batch
    states, obs = reset(keys, tasks)
    cells = np.concatenate([states.walls, states.colours, states.agent[:, None]], axis=1)
    assert all(len(set(row)) == 13 for row in cells)
    assert bool(jnp.all(states.solvable))
    assert bool(jnp.all(jax.vmap(ENV.leg_distances)(states) < INF))
    assert obs.shape == (64, 637)
    states2, obs2 = reset(keys, tasks)
    np.testing.assert_array_equal(obs, obs2)
    _, obs3 = reset(jax.random.split(jax.random.key(1), 64), tasks)
    assert not np.array_equal(obs, obs3)
    # layouts vary across episodes (fresh positions every episode)
    assert len({tuple(r) for r in cells.tolist()}) == 64


def test_fixed_layout_pool():
    tasks = np.concatenate([pretrain_tasks(12), post_task()[None]])
    pool = sample_layout_pool(ENV, 2, seed=0, tasks=tasks)
    assert pool == sample_layout_pool(ENV, 2, seed=0, tasks=tasks)  # deterministic
    env = GridPinpad(layouts=pool)
    rows = jnp.asarray(tasks)[jnp.arange(32) % tasks.shape[0]]
    states, _ = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(0), 32), rows)
    fixed = {
        tuple(w) + tuple(c)
        for w, c in zip(states.walls.tolist(), states.colours.tolist(), strict=True)
    }
    assert fixed == set(pool)  # only pool layouts, both drawn
    cells = np.concatenate([states.walls, states.colours, states.agent[:, None]], axis=1)
    assert all(len(set(row)) == 13 for row in cells)  # the agent starts on a free cell
    assert len(set(states.agent.tolist())) > 8  # and its start varies
    assert bool(jnp.all(states.solvable))
    with pytest.raises(ValueError, match="layouts\\[0\\]"):
        GridPinpad(layouts=((0,) * 12,))
