"""Presets, the paper-scale one-step check, and the CLI (slow end-to-end run)."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from common.config import ConfigError, from_json, to_json
from common.train import create_train_state, make_optimizer, make_train_step
from internal_rl.__main__ import main
from internal_rl.config import PRESETS, Config, make_config
from internal_rl.data import expert_batch
from internal_rl.envs import GridPinpad, pretrain_tasks
from internal_rl.models import BaseModel, pretrain_loss


def test_presets_build_and_roundtrip():
    for name in PRESETS:
        cfg = make_config(name)
        assert from_json(Config, to_json(cfg)) == cfg
    paper = make_config("paper")
    m = paper.model
    assert (m.dim, m.depth, m.num_heads, m.mlp_hidden, m.num_buckets) == (256, 6, 4, 512, 32)
    assert paper.data.batch_size == 1024 and paper.pretrain.steps == 256_000
    assert paper.pretrain.optim.learning_rate == 3e-4 and paper.pretrain.optim.weight_decay == 0.03
    assert (paper.control.rank, paper.control.steps, paper.control.batch_size) == (16, 3200, 512)
    assert paper.probe.steps == 8000 and paper.probe.batch_size == 512
    assert make_config("small").control_layers[0] == 2  # mid-depth first
    assert make_config("tiny", ["model.depth=4"]).model.depth == 4


def test_bad_overrides_are_clear_errors():
    with pytest.raises(ConfigError, match="model.depth"):
        make_config("tiny", ["model.detph=4"])
    with pytest.raises(ConfigError, match="expected an int"):
        make_config("tiny", ["model.depth=four"])
    with pytest.raises(ValueError, match="ControlConfig.layers"):
        make_config("tiny", ["control.layers=(0,7)"])
    with pytest.raises(ValueError, match="ReproduceConfig.rl_tasks"):
        make_config("tiny", ["reproduce.rl_tasks=('heldout','other')"])
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", "/nonexistent"])


def test_cli_rejects_unknown_key_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--preset", "tiny", "--set", "model.dpth=3", "--run-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.dpth" in err and "model.depth: int" in err
    assert not (tmp_path / "pretrain").exists()


def test_paper_preset_runs_one_step_on_tiny_data():
    cfg = make_config("paper")
    env = GridPinpad()
    batch = jax.jit(lambda k: expert_batch(env, k, pretrain_tasks(), 2, 12, n_candidates=8))(
        jax.random.key(0)
    )
    tx = make_optimizer(cfg.pretrain.optim)
    graphdef, state = create_train_state(
        BaseModel(cfg.model, rngs=nnx.Rngs(0)), tx, jax.random.key(0)
    )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    assert 3.0e6 < n_params < 4.0e6  # ≈3.5 M parameters at paper size
    step = make_train_step(
        graphdef, lambda m, b, k: pretrain_loss(m, b, k, cfg.pretrain.obs_coef), tx
    )
    state, metrics = step(state, batch)
    assert int(state.step) == 1 and jnp.isfinite(metrics["loss"])


@pytest.mark.slow
def test_cli_tiny_end_to_end_and_resume(tmp_path):
    sets = [
        "--set",
        "pretrain.steps=20",
        "--set",
        "pretrain.eval_every=10",
        "--set",
        "pretrain.save_every=10",
        "--set",
        "pretrain.eval_episodes=8",
        "--set",
        "probe.steps=20",
        "--set",
        "control.steps=10",
        "--set",
        "control.eval_episodes=8",
        "--set",
        "control.layers=(1,)",
        "--quiet",
    ]
    run = str(tmp_path / "run")
    assert main(["all", "--preset", "tiny", "--run-dir", run, *sets]) == 0
    probe = json.loads((tmp_path / "run/probe/results.json").read_text())
    assert len(probe["eval_accuracy"]) == 3
    control = json.loads((tmp_path / "run/control/results.json").read_text())
    assert control["layers"] == [1]
    # extending the run resumes from the step-20 checkpoint
    sets[1] = "pretrain.steps=30"
    assert main(["pretrain", "--preset", "tiny", "--run-dir", run, *sets]) == 0
    summary = json.loads((tmp_path / "run/pretrain/summary.json").read_text())
    assert summary["step"] == 30 and summary["resumed_from"] == 20
