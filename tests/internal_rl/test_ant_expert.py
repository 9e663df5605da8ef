"""Ant expert (PPO in MJX told the grid plan): plan features, reward, GAE, normaliser, PPO
update, resume == uninterrupted, evaluation.

Only the training run compiles MJX (one tiny program shared through a module fixture);
the plan, reward, GAE and PPO tests build small states by hand and compile nothing
heavier than a two-layer MLP. The training-run tests (one MJX Ant compile) and the
full-episode evaluation are marked slow (`make test-all`).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.train import OptimizerConfig
from internal_rl.ant_expert import (
    ANT_EXPERT_PRESETS,
    AntExpertConfig,
    build_program,
    evaluate_expert,
    expert_observation,
    expert_policy,
    gae,
    init_obs_norm,
    intrinsic_reward,
    make_model,
    make_ppo_update,
    move_vectors,
    plan_directions,
    plan_features,
    plan_vector,
    ppo_loss,
    shaped_reward,
    train_ant_expert,
    update_obs_norm,
)
from internal_rl.envs.ant_pinpad import AntPinpad
from internal_rl.envs.base import make_task
from internal_rl.envs.gridworld import GridPinpad, neighbour_table
from internal_rl.envs.pinpad_layout import CellGrid, ContinuousState
from internal_rl.rl import gaussian_log_prob
from tests.contracts import assert_resume_bit_exact

TINY = ANT_EXPERT_PRESETS["tiny"]()
G = 4
GRID = GridPinpad(size=G, num_colours=4, num_walls=1, horizon=500)
_plan = jax.jit(plan_directions, static_argnums=0)
_reset_grid = jax.jit(jax.vmap(GRID.reset))
_layout = jax.jit(GRID.state_from_layout)
_loss = jax.jit(ppo_loss, static_argnums=(0, 1))
# 4 x 4 cells (id = row * 4 + col): colours 0..3 at cells 1, 2, 8, 15, the wall at 4
#   row 3: 12 13 14 15(c3)
#   row 2:  8(c2) 9 10 11
#   row 1:  4(W)  5  6  7
#   row 0:  0  1(c0) 2(c1) 3
WALLS, COLOURS = [4], [1, 2, 8, 15]
UP_Y, PLUS_X, DOWN_Y, MINUS_X = 2, 1, 0, 3  # move ids (neighbour_table order)


def pad_for(task, agent=5, progress=0):
    pad = _layout(
        jnp.asarray(WALLS), jnp.asarray(COLOURS), jnp.int32(agent), jnp.asarray(make_task(task, 4))
    )
    return pad._replace(progress=jnp.int32(progress))


def naive_directions(walls, colours, target_colour):
    """Plain-Python BFS from the target, then per cell the first neighbour move with the
    smallest distance (-1 at the target, at walls and where no neighbour reaches it)."""
    n, inf = G * G, 10**9
    target = colours[target_colour]
    blocked = set(walls) | (set(colours) - {target})
    table = neighbour_table(G)
    dist = [inf] * n
    dist[target], frontier = 0, [target]
    while frontier:
        nxt = []
        for c in frontier:
            for m in table[c]:
                if m not in blocked and dist[m] == inf:
                    dist[m] = dist[c] + 1
                    nxt.append(int(m))
        frontier = nxt
    out = []
    for c in range(n):
        nd = [dist[m] for m in table[c]]
        out.append(-1 if c == target or c in walls or min(nd) == inf else int(np.argmin(nd)))
    return np.asarray(out)


# ------------------------------------------------------------------------ the plan
def test_move_vectors_match_cell_geometry():
    vec = move_vectors(G)
    np.testing.assert_array_equal(vec, [[0, -1], [1, 0], [0, 1], [-1, 0]])
    grid, table = CellGrid(G, 2.0), neighbour_table(G)
    for k in range(4):
        d = np.asarray(grid.centre(table[5, k]) - grid.centre(5)) / 2.0  # cell 5 is interior
        np.testing.assert_allclose(d, vec[k])


def test_plan_directions_on_a_constructed_layout():
    to_c2 = np.asarray(_plan(G, pad_for([2, 3])))
    assert to_c2[5] == UP_Y  # around the wall: 5 -> 9 -> 8
    assert to_c2[9] == MINUS_X and to_c2[12] == DOWN_Y
    assert to_c2[8] == -1 and to_c2[4] == -1  # the target itself, the wall
    assert to_c2[0] == -1  # cell 0 is enclosed by the wall and colour 0
    assert to_c2[1] == UP_Y  # out of the (blocked) colour-0 cell, e.g. just after visiting it
    # after visiting colour 2 the plan points at colour 3 (cell 15)
    to_c3 = np.asarray(_plan(G, pad_for([2, 3], progress=1)))
    assert to_c3[14] == PLUS_X and to_c3[11] == UP_Y and to_c3[15] == -1
    np.testing.assert_array_equal(to_c3, naive_directions(WALLS, COLOURS, 3))
    feats = np.asarray(plan_features(G, pad_for([2, 3]))).reshape(G * G, 4)
    np.testing.assert_array_equal(feats.sum(1), (to_c2 >= 0).astype(np.float32))
    np.testing.assert_array_equal(feats.argmax(1)[to_c2 >= 0], to_c2[to_c2 >= 0])
    np.testing.assert_array_equal(plan_vector(G, pad_for([2, 3], agent=5)), [0.0, 1.0])
    np.testing.assert_array_equal(plan_vector(G, pad_for([2, 3], agent=0)), [0.0, 0.0])


def test_plan_directions_match_naive_bfs_on_random_layouts():
    tasks = jnp.asarray(np.stack([make_task([i % 4, (i + 1) % 4], 4) for i in range(12)]))
    pads, _ = _reset_grid(jax.random.split(jax.random.key(3), 12), tasks)
    dirs = np.asarray(jax.vmap(lambda p: _plan(G, p))(pads))
    for i in range(12):
        ref = naive_directions(pads.walls[i].tolist(), pads.colours[i].tolist(), int(tasks[i, 0]))
        np.testing.assert_array_equal(dirs[i], ref, err_msg=f"layout {i}")
        # every defined move lands on a cell one BFS step closer (or leaves a blocked cell)
        d = np.asarray(pads.dist[i, tasks[i, 0]])
        for c in np.nonzero(ref >= 0)[0]:
            m = neighbour_table(G)[c, ref[c]]
            assert d[m] == min(d[neighbour_table(G)[c]]) and (d[c] >= 10_000 or d[m] == d[c] - 1)


# ------------------------------------------------------------------------ reward
def fake_state(pad, xy):
    qpos = jnp.zeros(15).at[:2].set(jnp.asarray(xy, jnp.float32))
    return ContinuousState(pad, types.SimpleNamespace(qpos=qpos))


def test_intrinsic_and_shaped_reward():
    env = AntPinpad()
    pad = pad_for([2, 3], agent=5)  # planned move at cell 5: +y
    start = env.grid.centre(5)
    prev = fake_state(pad, start)
    along = fake_state(pad, start + jnp.asarray([0.0, 0.1]))
    across = fake_state(pad, start + jnp.asarray([0.1, 0.0]))
    np.testing.assert_allclose(intrinsic_reward(env, prev, along), 0.1 / env.dt, rtol=1e-5)
    np.testing.assert_allclose(intrinsic_reward(env, prev, across), 0.0, atol=1e-6)
    cfg = AntExpertConfig(ctrl_cost=0.5, alive_bonus=0.25)
    no = jnp.asarray(False)
    info = dict(
        colour_visited=jnp.asarray(True), wrong_colour=no, wall=no, out_of_arena=no, failure=no
    )
    r = shaped_reward(cfg, env, prev, along, jnp.full(8, 2.0), jnp.float32(1.0), info)
    expected = 0.1 / env.dt + cfg.subgoal_bonus + cfg.success_bonus - 0.5 * 8 + 0.25
    np.testing.assert_allclose(r, expected, rtol=1e-5)  # the action is clipped to [-1, 1]
    for event in ("wrong_colour", "wall", "out_of_arena", "failure"):
        bad = dict(info, colour_visited=no, **{event: jnp.asarray(True)})
        r = shaped_reward(cfg, env, prev, across, jnp.zeros(8), jnp.float32(0.0), bad)
        np.testing.assert_allclose(r, -cfg.failure_penalty + 0.25, rtol=1e-5, err_msg=event)


# ------------------------------------------------------------------------ pure PPO pieces
def test_gae_matches_naive_loop():
    rng = np.random.default_rng(0)
    t, b, gamma, lam = 9, 3, 0.97, 0.9
    reward, value = rng.normal(size=(t, b)), rng.normal(size=(t, b))
    done, last = rng.random((t, b)) < 0.25, rng.normal(size=b)
    adv, ret = gae(
        *(jnp.asarray(x, jnp.float32) for x in (reward, value)),
        jnp.asarray(done),
        jnp.asarray(last, jnp.float32),
        gamma,
        lam,
    )
    ref = np.zeros((t, b))
    for j in range(b):
        running, v_next = 0.0, last[j]
        for i in reversed(range(t)):
            keep = 0.0 if done[i, j] else 1.0
            delta = reward[i, j] + gamma * v_next * keep - value[i, j]
            running = delta + gamma * lam * keep * running
            ref[i, j], v_next = running, value[i, j]
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref + value, rtol=1e-5, atol=1e-5)


def test_obs_norm_merges_batches_exactly():
    rng = np.random.default_rng(1)
    a, b = rng.normal(2.0, 3.0, (50, 4)), rng.normal(-1.0, 0.5, (30, 4))
    norm = update_obs_norm(
        update_obs_norm(init_obs_norm(4), jnp.asarray(a, jnp.float32)), jnp.asarray(b, jnp.float32)
    )
    both = np.concatenate([a, b])
    np.testing.assert_allclose(norm.mean, both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.var, both.var(0), rtol=1e-4)
    assert float(norm.count) == 80


def test_ppo_update_improves_the_surrogate_on_a_toy_batch():
    cfg = AntExpertConfig(
        num_envs=4,
        rollout_len=16,
        total_env_steps=64,
        epochs=4,
        minibatches=2,
        hidden=(16,),
        optim=OptimizerConfig(learning_rate=3e-3, schedule="constant", grad_clip_norm=0.5),
    )
    graphdef, params = nnx.split(make_model(cfg, 5, 2, seed=0))
    rng = jax.random.split(jax.random.key(0), 4)
    obs = jax.random.normal(rng[0], (64, 5))
    mean, log_std, value = nnx.merge(graphdef, params)(obs)
    action = mean + jnp.exp(log_std) * jax.random.normal(rng[1], mean.shape)
    batch = dict(
        obs=obs,
        action=action,
        logp=gaussian_log_prob(action, mean, log_std),
        value=value,
        adv=jax.random.normal(rng[2], (64,)),
        ret=value + jax.random.normal(rng[3], (64,)),
    )
    tx = cfg.optimizer()
    before, aux0 = _loss(cfg, graphdef, params, batch)
    new, _, metrics = jax.jit(make_ppo_update(cfg, graphdef, tx))(
        params, tx.init(params), batch, jax.random.key(1)
    )
    after, aux1 = _loss(cfg, graphdef, new, batch)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    np.testing.assert_allclose(aux0["approx_kl"], 0.0, atol=1e-6)  # on-policy start: ratio 1
    assert float(aux1["policy_loss"]) < float(aux0["policy_loss"]) - 1e-4
    assert float(after) < float(before)
    moved = [
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
    ]
    assert max(moved) > 0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="minibatches"):
        AntExpertConfig(num_envs=3, rollout_len=5, total_env_steps=15, minibatches=2)
    with pytest.raises(ValueError, match="plan_obs"):
        AntExpertConfig(plan_obs="both")
    assert ANT_EXPERT_PRESETS["paper"]().num_updates == 100_000_000 // (2048 * 32)


# ------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two updates uninterrupted (the one MJX Ant training compile of the file)."""
    root = tmp_path_factory.mktemp("ant_expert")
    return dict(
        root=root, full=train_ant_expert(TINY, root / "full", num_updates=2, log=lambda line: None)
    )


@pytest.mark.slow  # one MJX Ant training compile (minutes on 2 cores): make test-all
def test_resume_equals_uninterrupted(runs, tmp_path):
    """One update, then a resume to two == two updates in one go (params and history)."""
    logs = []

    def run(run_dir, updates):
        result = train_ant_expert(TINY, run_dir, num_updates=updates, log=logs.append)
        assert result.updates == updates
        return result

    assert_resume_bit_exact(
        run,
        tmp_path,
        kill_after=1,
        total=2,
        uninterrupted=runs["full"],
        compare=lambda r: dict(net=r.params.net, norm=r.params.norm, history=r.history),
    )
    assert any("resumed at update 1" in line for line in logs)
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per update, none repeated by the resume


@pytest.mark.slow  # one MJX Ant training compile (minutes on 2 cores): make test-all
def test_training_metrics_are_finite_and_consistent(runs):
    h = runs["full"].history
    for k in ("loss", "value_loss", "policy_loss", "approx_kl", "grad_norm", "step_reward"):
        assert h[k].shape == (2,) and np.all(np.isfinite(h[k])), k
    # successes over the episodes finished in the update's rollout (at least 1 in the divisor)
    successes = h["success_rate"] * np.maximum(h["episodes"], 1)
    np.testing.assert_allclose(successes, np.round(successes), atol=1e-4)
    assert np.all(np.round(successes) <= h["episodes"])
    assert runs["full"].env_steps == 2 * TINY.num_envs * TINY.rollout_len
    norm = runs["full"].params.norm
    assert float(norm.count) == 2 * TINY.num_envs * TINY.rollout_len
    env = build_program(TINY).env
    assert norm.mean.shape == (env.obs_dim + 64,)


@pytest.mark.slow  # one MJX Ant training compile (minutes on 2 cores): make test-all
def test_expert_policy_mean_and_noise(runs):
    program = build_program(TINY)
    env, params = program.env, runs["full"].params
    runner = program.init(jax.random.key(7))["runner"]  # reset envs, already compiled
    s0 = jax.tree.map(lambda x: x[0], runner.env_state)
    o0 = runner.obs[0, : env.obs_dim]
    x = expert_observation(TINY, env, s0, o0)
    np.testing.assert_array_equal(x, runner.obs[0])
    assert x.shape == (env.obs_dim + 64,)
    np.testing.assert_array_equal(x[env.obs_dim :], plan_features(G, s0.pad))
    mean_pol, noisy_pol = expert_policy(TINY, params), expert_policy(TINY, params, noise=True)
    a1 = mean_pol((), jax.random.key(0), o0, s0)[1]
    a2 = mean_pol((), jax.random.key(1), o0, s0)[1]
    n1 = noisy_pol((), jax.random.key(0), o0, s0)[1]
    n2 = noisy_pol((), jax.random.key(1), o0, s0)[1]
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(n1, n2) and a1.shape == (8,)
    assert np.all(np.abs(np.asarray(n1)) <= 1.0)
    with pytest.raises(ValueError, match="noise"):
        expert_policy(TINY, params, noise=-1.0)


@pytest.mark.slow
def test_evaluate_expert_reports_both_task_sets(runs):
    res = evaluate_expert(TINY, runs["full"].params, episodes_per_task=1)
    assert res["per_task"].shape == (17,) and res["episodes"] == 17
    # one episode per task: the 16 pretraining tasks, then the held-out 0-1-2-3
    per_task = np.asarray(res["per_task"])
    assert set(per_task.tolist()) <= {0.0, 1.0}
    assert res["pretrain_success"] == pytest.approx(per_task[:16].mean())
    assert res["post_success"] == per_task[16]
    assert 1 <= res["mean_length"] <= TINY.horizon
    with pytest.raises(ValueError, match="tasks"):
        evaluate_expert(TINY, runs["full"].params, tasks=np.zeros((2, 3), np.int32))


@pytest.mark.slow  # reuses the training fixture's MJX Ant compile: make test-all
def test_ant_expert_run_feeds_the_continuous_pipeline_data(runs):
    """`data.expert_run_dir` turns a trained expert run into D / D* batches of the Ant
    sequence model's shapes; an env that differs from the expert's is refused."""
    from common.config import to_json
    from internal_rl.continuous.config import make_config
    from internal_rl.continuous.pretrain import make_dataset

    run_dir = runs["root"] / "full"
    (run_dir / "config.json").write_text(to_json(TINY))
    sets = [
        f"data.expert_run_dir={run_dir}",
        "data.batch_size=3",
        "data.n_candidates=4",
        "data.max_len=24",
        f"env.horizon={TINY.horizon}",
    ]
    cfg = make_config("paper", sets)
    d, d_star = make_dataset(cfg, "data"), make_dataset(cfg, "data", star=True)
    batch, again, star = d.batch_at(0), d.batch_at(0), d_star.batch_at(0)
    assert batch["obs"].shape == (3, 24, cfg.model.obs_dim) == (3, 24, 41)
    assert batch["action"].shape == (3, 24, cfg.model.action_dim) == (3, 24, 8)
    assert np.all(np.abs(np.asarray(batch["action"])) <= 1.0)
    for k in batch:
        np.testing.assert_array_equal(np.asarray(batch[k]), np.asarray(again[k]))
    # same key, same resets: D* differs from D only by the expert's sampling noise
    np.testing.assert_array_equal(np.asarray(batch["obs"][:, 0]), np.asarray(star["obs"][:, 0]))
    assert not np.allclose(np.asarray(batch["action"][:, 0]), np.asarray(star["action"][:, 0]))
    # a trajectory is valid only if the expert succeeded, and only up to its length
    mask, success = np.asarray(batch["mask"]), np.asarray(batch["success"])
    assert not mask[~success].any()
    with pytest.raises(ValueError, match="horizon"):
        make_dataset(
            make_config(
                "paper", sets[:-1] + [f"env.horizon={TINY.horizon - 100}", "data.max_len=24"]
            ),
            "data",
        )
