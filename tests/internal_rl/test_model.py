"""Base model: causality, step-vs-sequence equality, masked loss, controllers
(docs/internal_rl.md D24)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step
from internal_rl.controllers import (
    CONTROLLER_PARAMS,
    ControlledModel,
    LowRankHyperController,
    controller_loss,
)
from internal_rl.models import BaseModel, ModelConfig, pretrain_loss
from tests.contracts import assert_decode_matches_forward

CFG = ModelConfig(dim=32, depth=2, num_heads=2, mlp_hidden=64)
B, T = 2, 7


@pytest.fixture(scope="module")
def model():
    return BaseModel(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def obs():
    # entity one-hots like real observations (13 entities over 49 cells)
    cells = jax.random.randint(jax.random.key(1), (B, T, 13), 0, 49)
    return jax.nn.one_hot(cells, 49).reshape(B, T, 637)


@pytest.fixture(scope="module")
def forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda o: nnx.merge(graphdef, state)(o))


def test_shapes_and_residuals(forward, obs):
    out = forward(obs)
    assert out.action_logits.shape == (B, T, 4)
    assert out.obs_logits.shape == (B, T, 13, 49)
    assert out.residuals.shape == (CFG.depth + 1, B, T, CFG.dim)


def test_no_causal_leakage(forward, obs):
    base = forward(obs)
    t = 3
    perturbed = obs.at[:, t + 1 :].set(1.0 - obs[:, t + 1 :])
    out = forward(perturbed)
    np.testing.assert_array_equal(out.action_logits[:, : t + 1], base.action_logits[:, : t + 1])
    np.testing.assert_array_equal(out.residuals[:, :, : t + 1], base.residuals[:, :, : t + 1])
    assert not np.allclose(out.action_logits[:, t + 1 :], base.action_logits[:, t + 1 :])


def test_decode_step_equals_full_sequence(model, forward, obs):
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode_all(o):
        m = nnx.merge(graphdef, state)

        def body(caches, o_t):
            out, caches = m.decode_step(o_t, caches)
            return caches, (out.action_logits[:, 0], out.obs_logits[:, 0], out.residuals[:, :, 0])

        _, outs = jax.lax.scan(body, m.init_caches(B, 10), jnp.swapaxes(o, 0, 1))
        return outs

    act, ob, res = decode_all(obs)  # time-major
    full = forward(obs)
    # residuals compared as [B, T, L+1, D]: forward [L+1, B, T, D], decoded [T, L+1, B, D]
    assert_decode_matches_forward(
        (full.action_logits, full.obs_logits, jnp.moveaxis(full.residuals, 0, 2)),
        (act, ob, jnp.swapaxes(res, 1, 2)),
        atol=1e-5,
        rtol=1e-7,
    )


def test_loss_ignores_padding(model, obs):
    rng = np.random.default_rng(0)
    batch = dict(
        obs=obs,
        action=jnp.asarray(rng.integers(0, 4, (B, T))),
        next_cells=jnp.asarray(rng.integers(0, 49, (B, T, 13))),
        mask=jnp.arange(T)[None] < jnp.asarray([[5], [3]]),
    )
    loss, metrics = pretrain_loss(model, batch, None, 0.01)
    padded = dict(
        batch,
        obs=batch["obs"].at[0, 5:].set(0.0).at[1, 3:].set(1.0),
        action=batch["action"].at[:, 5:].set(0),
    )
    loss2, _ = pretrain_loss(model, padded, None, 0.01)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    # the loss is action NLL + λ obs NLL, near log 4 + λ·13 log 49 at the 0.1-scaled init
    assert abs(float(metrics["action_nll"]) - np.log(4)) < 0.1
    assert abs(float(metrics["obs_nll"]) - 13 * np.log(49)) < 1.0
    np.testing.assert_allclose(loss, metrics["action_nll"] + 0.01 * metrics["obs_nll"], rtol=1e-6)


def test_identity_intervention_and_edit_propagation(model, obs):
    base = model(obs)
    same = model(obs, intervention=lambda e: e, intervention_layer=1)
    np.testing.assert_array_equal(same.action_logits, base.action_logits)
    edited = model(obs, intervention=lambda e: e + 1.0, intervention_layer=1)
    np.testing.assert_array_equal(edited.residuals[:1], base.residuals[:1])
    np.testing.assert_allclose(edited.residuals[1], base.residuals[1] + 1.0, rtol=1e-6)
    assert not np.allclose(edited.action_logits, base.action_logits)


@pytest.fixture(scope="module")
def controlled(model):
    return ControlledModel(model, layer=1, num_codes=4, rank=4, hidden=8, rngs=nnx.Rngs(3))


def test_zero_controller_leaves_outputs_unchanged(model, controlled, obs):
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 4, (B, T)))
    base = model(obs)
    out = controlled(obs, labels, return_residuals=True)
    np.testing.assert_array_equal(out.action_logits, base.action_logits)
    np.testing.assert_array_equal(out.obs_logits, base.obs_logits)
    np.testing.assert_array_equal(out.residuals, base.residuals)
    caches = model.init_caches(B, T)
    step_out, _ = controlled.decode_step(obs[:, 0], caches, labels[:, 0])
    np.testing.assert_allclose(step_out.action_logits[:, 0], base.action_logits[:, 0], atol=1e-5)


def test_low_rank_controller_matches_dense_matrix():
    ctrl = LowRankHyperController(4, 6, rank=2, hidden=5, rngs=nnx.Rngs(0))
    # give B a non-zero value so U != 0
    ctrl.b_head.kernel[...] = jax.random.normal(jax.random.key(0), ctrl.b_head.kernel.shape)
    e = jax.random.normal(jax.random.key(1), (3, 5, 6))
    g = jax.random.randint(jax.random.key(2), (3, 5), 0, 4)
    u = ctrl.matrix(jax.nn.one_hot(g, 4))  # [3, 5, 6, 6]
    assert np.linalg.matrix_rank(np.asarray(u[0, 0])) <= 2
    expected = e + jnp.einsum("btij,btj->bti", u, e)
    np.testing.assert_allclose(ctrl.apply_codes(e, jax.nn.one_hot(g, 4)), expected, atol=1e-5)


def test_controller_training_updates_only_the_controller(controlled, obs):
    rng = np.random.default_rng(1)
    batch = dict(
        obs=obs,
        action=jnp.asarray(rng.integers(0, 4, (B, T))),
        next_cells=jnp.zeros((B, T, 13), jnp.int32),
        mask=jnp.ones((B, T), bool),
        subgoal=jnp.asarray(rng.integers(0, 4, (B, T))),
    )
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"))
    graphdef, state = create_train_state(
        controlled, tx, jax.random.key(0), trainable=CONTROLLER_PARAMS
    )
    assert all("controller" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params))
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    params_before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(graphdef, controller_loss, tx, donate=False)
    new, metrics = step(state, batch)
    new, metrics2 = step(new, batch)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.frozen), frozen_before)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new.params, params_before)
    assert any(jax.tree.leaves(changed))
    assert float(metrics2["loss"]) < float(metrics["loss"])


def test_closed_loop_zero_controller_matches_base(model, controlled):
    from internal_rl.envs import GridPinpad, pretrain_tasks
    from internal_rl.rollouts import closed_loop

    env = GridPinpad(horizon=12)
    tasks = jnp.asarray(pretrain_tasks()[:4])

    def base_step(obs, caches, subgoal):
        out, caches = model.decode_step(obs, caches, return_residuals=False)
        return out.action_logits[:, 0], caches

    def ctrl_step(obs, caches, subgoal):
        out, caches = controlled.decode_step(obs, caches, subgoal)
        return out.action_logits[:, 0], caches

    key = jax.random.key(5)
    a = jax.jit(lambda k: closed_loop(env, base_step, model.init_caches(4, 12), k, tasks, 12))(key)
    b = jax.jit(lambda k: closed_loop(env, ctrl_step, model.init_caches(4, 12), k, tasks, 12))(key)
    for name in ("success", "progress", "length", "reward"):
        np.testing.assert_array_equal(a[name], b[name])
    assert a["length"].shape == (4,) and bool(jnp.all(a["length"] >= 1))
