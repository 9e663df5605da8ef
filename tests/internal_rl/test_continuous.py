"""The continuous (Point-pinpad) pipeline: configs, expert data, Hawk pretraining with
resume, closed-loop evaluation and probes (docs/internal_rl.md D23).

Compiles dominate on a CPU, so the file compiles one expert-batch program (shared by every
dataset of the same shapes), one train step, one closed-loop program and one probe forward,
shared through module-scoped fixtures.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from common.config import ConfigError
from common.metrics import read_metrics
from common.rng import stream_seed
from internal_rl.analysis import probe_checkpoint
from internal_rl.continuous.config import PRESETS, make_config
from internal_rl.continuous.data import PointExpertDataset, point_expert_batch
from internal_rl.continuous.pretrain import (
    build_model,
    eval_tasks,
    load_base_model,
    make_dataset,
    make_env,
    run_pretrain,
)
from internal_rl.data import segment_position
from internal_rl.envs.pinpad_layout import PRETRAIN_TASKS, post_task, pretrain_tasks
from tests.contracts import assert_resume_bit_exact

STEPS, SPLIT = 8, 4
OVERRIDES = [
    "data.batch_size=6",
    "data.n_candidates=10",
    "data.max_len=128",
    "env.horizon=128",
    "model.dim=16",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_hidden=32",
    f"pretrain.steps={STEPS}",
    f"pretrain.optim.total_steps={STEPS}",
    "pretrain.optim.learning_rate=0.01",
    "pretrain.log_every=1",
    f"pretrain.save_every={SPLIT}",
    "pretrain.eval_every=0",
    "pretrain.eval_episodes=4",
    "probe.train_trajectories=12",
    "probe.eval_trajectories=6",
    "probe.steps=60",
    "probe.batch_size=64",
    "probe.max_position=8",
]


@pytest.fixture(scope="module")
def cfg():
    return make_config("tiny", OVERRIDES)


@pytest.fixture(scope="module")
def batch(cfg):
    return jax.tree.map(np.asarray, make_dataset(cfg, "data").batch_at(0))


# ------------------------------------------------------------------------ configs
def test_presets_build_and_match_the_spec():
    for name in PRESETS:
        c = make_config(name)
        assert c.model.obs_dim == make_env(c).obs_dim
    small = make_config("small")
    m, p = small.model, small.pretrain
    assert (m.dim, m.depth, p.obs_coef, small.data.batch_size, small.data.max_len) == (
        128,
        4,
        10.0,
        32,
        200,
    )
    assert (p.optim.learning_rate, p.optim.weight_decay, p.optim.schedule, p.steps) == (
        3e-4,
        0.03,
        "constant",
        4000,
    )
    assert (small.data.noise_std, small.data.star_noise_std) == (0.1, 0.0)
    paper = make_config("paper")  # Tables A5 / A10 / A14 / A15 (ant)
    assert paper.env.kind == "ant" and paper.env.horizon == 500
    assert (paper.model.dim, paper.model.depth, paper.model.mlp_hidden) == (256, 8, 512)
    assert (paper.pretrain.steps, paper.data.batch_size) == (204_800, 512)
    assert (paper.mctrain.steps, paper.mctrain.batch_size, paper.mctrain.optim.learning_rate) == (
        32_000,
        128,
        3e-4,
    )
    assert (paper.rl.batch_episodes, paper.rl.optim.learning_rate) == (256, 3e-5)
    assert paper.rl.episodes == 51_200 * 256


def test_seen_transition_task_uses_only_pretraining_transitions():
    from internal_rl.envs.pinpad_layout import POST_TASK, SEEN_TRANSITION_TASK

    def transitions(task):
        return set(zip(task[:-1], task[1:], strict=True))

    seen = set().union(*map(transitions, PRETRAIN_TASKS))
    assert transitions(SEEN_TRANSITION_TASK) <= seen
    assert not transitions(POST_TASK) & seen  # the held-out task's are all unseen
    assert len(SEEN_TRANSITION_TASK) == len(POST_TASK)


def test_config_errors():
    with pytest.raises(ConfigError, match="EnvConfig.kind"):
        make_config("tiny", ["env.kind=cheetah"])
    with pytest.raises(ConfigError, match="model.widht"):
        make_config("tiny", ["model.widht=3"])
    with pytest.raises(ConfigError, match="max_len"):
        make_config("tiny", ["data.max_len=300"])
    with pytest.raises(ValueError, match="obs_dim"):
        build_model(make_config("tiny", ["model.obs_dim=15"]))
    with pytest.raises(ValueError, match="data.expert_run_dir"):
        make_dataset(make_config("paper", ["data.expert_run_dir=None"]), "data")


def test_ant_data_needs_a_trained_expert_run(tmp_path):
    missing = make_config("paper", [f"data.expert_run_dir={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="python -m internal_rl.ant_expert"):
        make_dataset(missing, "data")


# ------------------------------------------------------------------------ data
def test_batch_shapes_and_dtypes(cfg, batch):
    b, t = cfg.data.batch_size, cfg.data.max_len
    expected = dict(
        obs=((b, t, 16), np.float32),
        action=((b, t, 2), np.float32),
        next_obs=((b, t, 16), np.float32),
        mask=((b, t), np.bool_),
        subgoal=((b, t), np.int32),
        seg_pos=((b, t), np.int32),
        task_id=((b,), np.int32),
        length=((b,), np.int32),
        success=((b,), np.bool_),
    )
    assert set(batch) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert batch[k].shape == shape and batch[k].dtype == dtype, k
    assert np.all(np.isfinite(batch["obs"])) and np.all(np.abs(batch["action"]) <= 1.0)


def test_batch_keeps_only_successful_masked_steps(batch):
    success, mask, length = batch["success"], batch["mask"], batch["length"]
    assert success.sum() >= 1
    # successful rows first, failed rows fully masked
    assert np.all(success[:-1] >= success[1:])
    assert not mask[~success].any()
    # the mask is a prefix of the episode's length, shorter than the padded length
    t = np.arange(mask.shape[1])
    np.testing.assert_array_equal(mask, t[None] < length[:, None])
    assert np.all(length[success] > 0) and np.all(length[success] <= mask.shape[1])
    # next_obs is the following obs inside the episode
    for i in np.nonzero(success)[0]:
        n = length[i]
        np.testing.assert_array_equal(batch["next_obs"][i, : n - 1], batch["obs"][i, 1:n])


def _cell_of_target(obs, colour, grid_side=4.0, cell=1.0):
    """Is the point inside colour's cell? obs[4 + 2c : 6 + 2c] = (centre − xy) / (G·c)."""
    rel = obs[..., 4 + 2 * colour : 6 + 2 * colour] * grid_side
    return np.all(np.abs(rel) < 0.5 * cell + 1e-4, axis=-1)


def test_subgoal_labels_follow_the_task(batch):
    tasks = pretrain_tasks()
    for i in np.nonzero(batch["success"])[0]:
        n = batch["length"][i]
        g = batch["subgoal"][i, :n]
        task = [c for c in tasks[batch["task_id"][i]] if c >= 0]
        # the label runs through the task's colours in order, one segment per colour
        change = np.nonzero(g[1:] != g[:-1])[0] + 1
        assert [int(g[0])] + [int(g[c]) for c in change] == task
        # a label moves on exactly when the point stands in the finished colour's cell
        for c in change:
            assert _cell_of_target(batch["obs"][i, c], g[c - 1])
            assert not _cell_of_target(batch["obs"][i, c - 1], g[c - 1])
        # the episode ends by entering the last colour
        assert _cell_of_target(batch["next_obs"][i, n - 1], task[-1])
        np.testing.assert_array_equal(batch["seg_pos"][i], segment_position(batch["subgoal"][i]))
        assert np.all(batch["seg_pos"][i, change] == 0)


def test_dataset_determinism_and_state_round_trip(cfg, batch):
    env, d = make_env(cfg), cfg.data
    ds = PointExpertDataset(
        env,
        pretrain_tasks(),
        d.batch_size,
        d.max_len,
        d.noise_std,
        seed=stream_seed(cfg.seed, "data"),
        n_candidates=d.n_candidates,
    )
    first = jax.tree.map(np.asarray, ds.next())
    for k in batch:  # the same stream as make_dataset's, batch for batch
        np.testing.assert_array_equal(first[k], batch[k])
    ds.next()
    state = ds.get_state()
    assert state == {"seed": stream_seed(cfg.seed, "data"), "step": 2}
    third = np.asarray(ds.next()["obs"])
    again = PointExpertDataset(
        env,
        pretrain_tasks(),
        d.batch_size,
        d.max_len,
        d.noise_std,
        seed=12345,
        n_candidates=d.n_candidates,
    )
    assert not np.array_equal(np.asarray(again.batch_at(2)["obs"]), third)
    again.set_state(json.loads(json.dumps(state)))  # survives the JSON checkpoint item
    np.testing.assert_array_equal(np.asarray(again.next()["obs"]), third)
    with pytest.raises(ValueError, match="set_state"):
        again.set_state({"step": 1})
    # D*: the same program with noise 0 gives different (noise-free) actions
    star = make_dataset(cfg, "data", star=True)
    assert star.noise_std == 0.0
    assert not np.array_equal(np.asarray(star.batch_at(0)["action"]), batch["action"])


def test_point_expert_batch_rejects_bad_inputs(cfg):
    env = make_env(cfg)
    with pytest.raises(ValueError, match="max_len"):
        point_expert_batch(env, jax.random.key(0), pretrain_tasks(), 4, env.horizon + 1)
    with pytest.raises(ValueError, match="n_candidates"):
        point_expert_batch(env, jax.random.key(0), pretrain_tasks(), 4, 8, 0.1, n_candidates=2)
    with pytest.raises(ValueError, match="noise_std"):
        PointExpertDataset(env, pretrain_tasks(), 4, 8, noise_std=-1.0)


def test_eval_tasks_cover_each_task_equally():
    rows = eval_tasks(pretrain_tasks(), 32)
    assert rows.shape == (32, 4) and np.all(rows[:, 3] == -1)
    counts = {tuple(r[:3]) for r in rows}
    assert counts == set(PRETRAIN_TASKS)
    np.testing.assert_array_equal(eval_tasks(post_task(), 3), np.tile(post_task(), (3, 1)))


# ------------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def full_run(cfg, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, run_pretrain(cfg, run_dir, verbose=False)


def test_pretraining_lowers_the_loss(cfg, full_run):
    run_dir, summary = full_run
    assert summary["step"] == STEPS and summary["resumed_from"] == 0
    records = read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    assert summary["heldout_loss"] < losses[0]
    # closed-loop eval on both task sets, sampled and greedy: means over n episodes of
    # success (a success visits every colour: progress 1), progress in steps of 1/len(task)
    # and lengths of 1..horizon steps
    n = cfg.pretrain.eval_episodes
    for name, task_len in (("pretrain_task", 3), ("post_task", 4)):
        for suffix in ("", "_greedy"):
            success, progress, length = (
                summary[f"{name}{suffix}_{k}"]
                for k in ("success_rate", "mean_progress", "mean_length")
            )
            assert _multiple(success, 1 / n) and _multiple(progress, 1 / (n * task_len))
            assert _multiple(length, 1 / n) and 1 <= length <= cfg.env.horizon
            assert success <= progress and (success == 1) == (progress == 1)


def _multiple(x, unit):
    """Is x an integer multiple of unit (up to float32 rounding)?"""
    return abs(x / unit - round(x / unit)) < 1e-3


def _params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_resume_equals_uninterrupted(cfg, full_run, tmp_path):
    run_dir, _ = full_run
    # closed-loop eval does not touch the training state: skip it in the split run
    quiet = dataclasses.replace(cfg.pretrain, eval_episodes=0)

    def run(directory, steps):
        split_cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(quiet, steps=steps))
        summary = run_pretrain(split_cfg, directory, verbose=False)
        assert summary["step"] == steps
        return summary, _params(load_base_model(cfg, directory))

    _, (summary, _) = assert_resume_bit_exact(
        run,
        tmp_path,
        kill_after=SPLIT,
        total=STEPS,
        compare=lambda r: r[1],
        uninterrupted=(None, _params(load_base_model(cfg, run_dir))),
    )
    assert summary["step"] == STEPS and summary["resumed_from"] == SPLIT


def test_probes_run_on_every_layer(cfg, full_run):
    run_dir, _ = full_run
    res = probe_checkpoint(cfg, run_dir)
    layers = cfg.model.depth + 1
    assert res["layers"] == list(range(layers))
    counts = np.asarray(res["position_counts"])
    assert counts.sum() == res["eval_tokens"] > 0
    for key, tokens in (
        ("eval_accuracy", res["eval_tokens"]),
        ("train_accuracy", res["train_tokens"]),
    ):
        acc = np.asarray(res[key])
        # a fraction of the probed tokens
        assert acc.shape == (layers,) and all(_multiple(a, 1 / tokens) for a in acc)
    # the overall accuracy is the token-weighted mean of the per-position accuracies
    by_pos = np.asarray(res["eval_accuracy_by_position"], float)
    seen = counts > 0
    np.testing.assert_allclose(
        by_pos[:, seen] @ counts[seen] / counts.sum(), res["eval_accuracy"], rtol=1e-9, atol=1e-12
    )
    assert res["chance"] == 0.25
    # the probes learn: the cross-entropy falls from log 4 (zero-initialised probes)
    assert res["final_train_loss"] < res["first_train_loss"] < np.log(4) + 1e-3


def test_cli_rejects_a_bad_override_and_a_mismatched_env(tmp_path, capsys):
    from internal_rl.__main__ import main

    with pytest.raises(SystemExit):
        main(
            [
                "pretrain",
                "--env",
                "point",
                "--set",
                "model.widht=3",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    err = capsys.readouterr().err
    assert "model.widht" in err and "model.dim" in err  # names the key, lists valid ones
    with pytest.raises(SystemExit):  # the continuous paper preset is the ant's
        main(["pretrain", "--env", "point", "--preset", "paper", "--run-dir", str(tmp_path / "r")])
    assert "env.kind" in capsys.readouterr().err


# ------------------------------------------------------------------------ later stages
CHAIN = [
    "control.steps=3",
    "control.batch_size=4",
    "control.eval_episodes=4",
    "metacontroller.n_z=4",
    "metacontroller.gru_hidden=8",
    "metacontroller.embed_dim=8",
    "metacontroller.embed_width=8",
    "metacontroller.encoder_hidden=16",
    "metacontroller.switch_hidden=16",
    "metacontroller.decoder_hidden=8",
    "metacontroller.rank=4",
    "mctrain.batch_size=4",
    "mctrain.steps=3",
    "mctrain.eval_batches=1",
    "mctrain.trace_examples=2",
    "rl.episodes=8",
    "rl.batch_episodes=4",
    "rl.horizon=16",
    "rl.updates_per_call=2",
    "rl.policy_width=8",
    "reproduce.methods=(internal_rl,raw_action_rl)",
]


# Slow (≈2 min of the CI budget on 2 cores): `make demo` runs this chain on the point pinpad
# too, and each of its stages has its own fast test.
@pytest.mark.slow
def test_the_whole_chain_runs_on_the_hawk_model(full_run):
    """Controllers, the metacontroller α sweep, internal and raw-action RL and the report
    on the pretrained point-pinpad model (the grid world's stages, through
    `internal_rl.pipeline`); shapes and finiteness, not quality."""
    from common.report import StageClock
    from internal_rl.reproduce import reproduce, run_stages

    run_dir, _ = full_run
    chain_cfg = make_config("tiny", OVERRIDES + CHAIN)
    reproduce(chain_cfg, run_dir, preset="tiny", verbose=False)
    parts = run_stages(chain_cfg, run_dir, StageClock(), verbose=False)  # read back
    control = parts["control"]
    assert control["layers"] == [1]
    assert len(control["seen_transition_task_success"]) == 1  # the 0-3-2-1 diagnostic task
    mc = parts["metacontroller"]["frozen"][0]["metrics"]
    assert {"action_nll", "action_mse", "kl", "switch_precision"} <= mc.keys()
    assert np.isfinite([mc["action_nll"], mc["kl"], mc["action_mse"]]).all()
    for method in ("internal_rl", "raw_action_rl"):
        (curve,) = parts["rl"]["heldout"][method]
        assert len(curve["success_rate"]) == 2 and curve["episodes"] == [4, 8]
        assert 1 <= min(curve["decisions_per_episode"])
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert set(results["rl_final_success"]) == {"internal_rl", "raw_action_rl"}
    assert "Point-pinpad" in (run_dir / "report.md").read_text()
