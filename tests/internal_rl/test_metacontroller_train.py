"""Metacontroller training: loss goes down, resume equals uninterrupted, β ≡ 1 switches at
every step, co-training trains θ too, α sweep bookkeeping."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from internal_rl.config import make_config
from internal_rl.metacontroller_train import (
    EVAL_STREAM,
    Variant,
    evaluate_variant,
    init_variant,
    load_variant,
    run_alpha_sweep,
    select_alpha,
    train_metacontroller,
)
from internal_rl.pretrain import build_model, make_dataset
from tests.contracts import assert_resume_bit_exact

OVERRIDES = [
    "env.layout_pool=1",
    "data.batch_size=4",
    "data.max_len=32",
    "model.dim=16",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_hidden=32",
    "model.init_scale=1.0",  # a random base whose outputs respond to residual edits
    "metacontroller.n_z=4",
    "metacontroller.gru_hidden=8",
    "metacontroller.embed_dim=8",
    "metacontroller.embed_width=8",
    "metacontroller.encoder_hidden=16",
    "metacontroller.switch_hidden=16",
    "metacontroller.decoder_hidden=8",
    "metacontroller.rank=4",
    "mctrain.batch_size=4",
    "mctrain.steps=4",
    "mctrain.cotrain_steps=4",
    "mctrain.optim.learning_rate=0.01",
    "mctrain.cotrain_optim.learning_rate=0.01",
    "mctrain.save_every=2",
    "mctrain.log_every=2",
    "mctrain.eval_batches=1",
    "mctrain.trace_examples=2",
]


@pytest.fixture(scope="module")
def cfg():
    return make_config("tiny", OVERRIDES)


@pytest.fixture(scope="module")
def base(cfg):
    return build_model(cfg)


def test_short_training_lowers_the_loss(cfg, base, tmp_path):
    variant = Variant(alpha=0.1)
    graphdef, state0, _ = init_variant(cfg, variant, nnx.clone(base))
    before = evaluate_variant(cfg, graphdef, state0)["metrics"]
    long_cfg = dataclasses.replace(cfg, mctrain=dataclasses.replace(cfg.mctrain, steps=25))
    graphdef, state = train_metacontroller(long_cfg, tmp_path, variant, base=base, verbose=False)
    after = evaluate_variant(cfg, graphdef, state)["metrics"]
    assert int(state.step) == 25
    assert after["loss"] < before["loss"] - 0.05, (before["loss"], after["loss"])
    # the frozen base is untouched: only φ is in the trainable params
    assert all(
        "metacontroller" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)
    )


def test_resume_equals_uninterrupted(cfg, base, tmp_path):
    variant = Variant(alpha=0.1)

    def run(run_dir, steps):
        return train_metacontroller(cfg, run_dir, variant, base=base, steps=steps, verbose=False)[1]

    full, resumed = assert_resume_bit_exact(
        run, tmp_path, kill_after=2, total=cfg.mctrain.steps, compare=lambda st: st.params
    )
    assert int(resumed.step) == int(full.step) == cfg.mctrain.steps
    # the saved variant loads back as the resumed run's φ
    loaded = load_variant(cfg, tmp_path / "interrupted", variant, base=base)
    _, loaded_params, _ = nnx.split(loaded, nnx.Param, ...)
    ref = nnx.to_flat_state(resumed.params)
    got = dict(nnx.to_flat_state(loaded_params))
    for path, value in ref:
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(got[path][...]))


def test_beta_one_switches_at_every_valid_step(cfg, base, tmp_path):
    [res] = run_alpha_sweep(
        cfg, tmp_path, [0.1], temporal_abstraction=False, base=base, verbose=False
    )
    steps = np.sum(np.asarray(res["traces"]["mask"]), axis=-1)
    switches = np.sum(
        np.asarray(res["traces"]["beta"]) * np.asarray(res["traces"]["mask"]) > 0.5, axis=-1
    )
    np.testing.assert_array_equal(switches, steps)
    eval_mask = make_dataset(cfg, EVAL_STREAM, cfg.mctrain.batch_size).batch_at(0)["mask"]
    assert res["metrics"]["switches"] == pytest.approx(float(np.mean(np.sum(eval_mask, -1))))
    assert res["metrics"]["beta_mean"] == pytest.approx(1.0)
    # every switch is an extra decision: precision is the share of steps next to a boundary
    assert res["metrics"]["switch_recall"] == pytest.approx(1.0)


def test_cotraining_trains_the_base_and_sweep_is_cached(cfg, base, tmp_path):
    [res] = run_alpha_sweep(cfg, tmp_path, [0.3], cotrain=True, base=base, verbose=False)
    model = load_variant(cfg, tmp_path, Variant(0.3, cotrain=True), base=base)
    fresh = build_model(cfg)  # co-training starts from scratch (θ re-initialised)
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(nnx.state(model.base, nnx.Param)),
            jax.tree.leaves(nnx.state(fresh, nnx.Param)),
            strict=True,
        )
    ]
    assert any(moved)
    again = run_alpha_sweep(cfg, tmp_path, [0.3], cotrain=True, base=base, verbose=False)
    assert again[0]["wall_seconds"] == res["wall_seconds"]  # read back, not retrained


def test_select_alpha_prefers_aligned_switching():
    def r(alpha, p, rc, nll):
        return dict(
            variant=dict(alpha=alpha),
            metrics=dict(switch_precision=p, switch_recall=rc, action_nll=nll),
        )

    results = [r(0.05, 0.2, 1.0, 0.3), r(0.1, 0.9, 0.9, 0.35), r(0.3, 1.0, 0.3, 0.6)]
    assert select_alpha(results) == 0.1
    with pytest.raises(ValueError, match="at least one"):
        select_alpha([])
