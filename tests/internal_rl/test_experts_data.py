"""Expert optimality/success and on-the-fly expert data (internal RL App. C.1.1,
docs/internal_rl.md D24)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internal_rl.data import ExpertDataset, segment_position
from internal_rl.envs import GridPinpad, batch_rollout, pretrain_tasks
from internal_rl.experts import expert_policy

ENV = GridPinpad()


@pytest.fixture(scope="module")
def expert_rollouts():
    """4 episodes of each of the 16 pretraining tasks over the full horizon T = 100."""
    tasks = jnp.asarray(pretrain_tasks())[jnp.arange(64) % 16]
    run = jax.jit(lambda key, eps: batch_rollout(ENV, expert_policy(ENV, eps), key, tasks, 100))
    return tasks, run(jax.random.key(0), 0.0), run(jax.random.key(0), 0.2)


def test_expert_succeeds_on_every_pretraining_task(expert_rollouts):
    _, (traj, final), _ = expert_rollouts
    assert bool(jnp.all(final.success))
    assert np.asarray(traj["reward"]).sum() == 64  # exactly one reward per episode
    assert not bool(jnp.any(final.t >= ENV.horizon))


def test_expert_takes_shortest_paths(expert_rollouts):
    _, (traj, final), _ = expert_rollouts
    # recompute each leg's shortest length on the initial layout
    start = ENV.obs_to_cells(traj["obs"][:, 0])[:, -1]
    legs = jax.vmap(ENV.leg_distances)(final._replace(agent=start))
    lengths = np.asarray(traj["valid"].sum(axis=1))
    np.testing.assert_array_equal(lengths, np.asarray(legs.sum(axis=1)))


def test_noisy_expert_never_steps_on_a_wrong_colour(expert_rollouts):
    _, (clean_traj, _), (traj, final) = expert_rollouts
    # epsilon noise only takes non-terminating actions, so episodes end by success or timeout
    succeeded_or_timed_out = final.success | (final.t >= ENV.horizon)
    assert bool(jnp.all(succeeded_or_timed_out))
    assert traj["valid"].sum() > clean_traj["valid"].sum()  # detours make episodes longer


def test_expert_is_uniform_over_optimal_actions():
    from internal_rl.envs import make_task
    from internal_rl.experts import expert_action, optimal_action_mask, safe_action_mask

    # agent at (0,0), colour 0 at (2,2), nothing in between: right and down are optimal;
    # colour 1 at (0,1) would be a wrong colour but is the target's partner -> not target
    walls = [45, 46, 47, 48]
    colours = [16, 14, 35, 36, 37, 38, 39, 40]  # colour 1 at (2,0)
    state = ENV.state_from_layout(walls, colours, 0, make_task([0, 1]))
    np.testing.assert_array_equal(optimal_action_mask(ENV, state), [False, True, True, False])
    keys = jax.random.split(jax.random.key(0), 400)
    acts = np.asarray(jax.vmap(lambda k: expert_action(ENV, k, state))(keys))
    counts = np.bincount(acts, minlength=4)
    assert counts[0] == counts[3] == 0 and 150 < counts[1] < 250
    # one step down-left of colour 1: stepping onto it is unsafe, epsilon noise avoids it
    state2 = state._replace(agent=jnp.int32(21))  # (3,0), colour 1 above at (2,0)
    np.testing.assert_array_equal(safe_action_mask(ENV, state2), [False, True, True, True])
    noisy = np.asarray(jax.vmap(lambda k: expert_action(ENV, k, state2, 1.0))(keys))
    assert set(noisy.tolist()) == {1, 2, 3}


def test_segment_position():
    sub = jnp.asarray([[3, 3, 3, 1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(
        segment_position(sub), [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    )


@pytest.fixture(scope="module")
def dataset():
    return ExpertDataset(ENV, pretrain_tasks(), batch_size=8, max_len=40, seed=3)


def test_batch_shapes_masks_and_labels(dataset):
    b = dataset.batch_at(0)
    assert b["obs"].shape == (8, 40, 637) and b["action"].shape == (8, 40)
    assert b["next_cells"].shape == (8, 40, 13)
    mask, length = np.asarray(b["mask"]), np.asarray(b["length"])
    assert bool(np.all(b["success"])) and (length > 0).all()
    # masks are left-aligned prefixes of the given length
    np.testing.assert_array_equal(mask, np.arange(40)[None] < length[:, None])
    # next_cells of step t are the entity cells of obs t+1
    cells = np.asarray(ENV.obs_to_cells(b["obs"]))
    for i in range(8):
        n = length[i]
        np.testing.assert_array_equal(b["next_cells"][i, : n - 1], cells[i, 1:n])
    # static entities never move; subgoal labels are pair ids of the task
    np.testing.assert_array_equal(cells[:, :, :12], np.repeat(cells[:, :1, :12], 40, axis=1))
    tasks = pretrain_tasks()[np.asarray(b["task_id"])]
    for i in range(8):
        first_pairs = tasks[i, ::2] // 2
        seen = [
            int(g)
            for j, g in enumerate(np.asarray(b["subgoal"][i])[: length[i]])
            if j == 0 or g != b["subgoal"][i, j - 1]
        ]
        assert seen == first_pairs.tolist()


def test_dataset_determinism_and_resume(dataset):
    a = dataset.batch_at(5)
    b = ExpertDataset(ENV, pretrain_tasks(), batch_size=8, max_len=40, seed=3).batch_at(5)
    np.testing.assert_array_equal(a["obs"], b["obs"])
    np.testing.assert_array_equal(a["action"], b["action"])
    other = ExpertDataset(ENV, pretrain_tasks(), batch_size=8, max_len=40, seed=4).batch_at(5)
    assert not np.array_equal(a["obs"], other["obs"])
    dataset.set_state({"seed": 3, "step": 0})
    next(dataset)
    saved = dataset.get_state()
    expected = next(dataset)
    dataset.set_state(saved)
    np.testing.assert_array_equal(next(dataset)["action"], expected["action"])
    assert dataset.get_state() == {"seed": 3, "step": 2}
    with pytest.raises(ValueError, match="set_state"):
        dataset.set_state({"position": 1})


def test_oracle_action_accuracy_is_a_probability_above_chance():
    from internal_rl.experts import oracle_action_accuracy

    tasks = jnp.asarray(pretrain_tasks())[:8]
    acc, success = jax.jit(lambda k: oracle_action_accuracy(ENV, k, tasks, 100))(jax.random.key(0))
    # 1/k per step with k in 1..4 optimal actions, never below 1/4; the expert always succeeds
    assert 0.25 <= float(acc) <= 1.0 and float(success) == 1.0
    assert float(acc) > 0.5  # most steps of a shortest path have one or two optimal moves
