"""Metacontroller: temporal integration, causality, identity at U = 0, KL, switch metrics,
frozen-base training (internal RL App. C.4, docs/internal_rl.md D24)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step
from internal_rl.metacontroller import (
    ALL_PARAMS,
    METACONTROLLER_PARAMS,
    MetacontrolledModel,
    Metacontroller,
    MetacontrollerConfig,
    gaussian_kl,
    integrate,
    metacontroller_loss,
    subgoal_boundaries,
    switch_and_integrate,
    switch_precision_recall,
    switches_per_trajectory,
    trainable_filter,
)
from internal_rl.models import BaseModel, ModelConfig

BASE_CFG = ModelConfig(dim=32, depth=2, num_heads=2, mlp_hidden=64)
MC_CFG = MetacontrollerConfig(
    gru_hidden=8,
    embed_dim=8,
    embed_width=16,
    encoder_hidden=16,
    switch_hidden=16,
    decoder_hidden=8,
    rank=4,
    kl_weight=0.3,
)
B, T, D = 2, 8, BASE_CFG.dim


def _path(p) -> str:
    return "/".join(map(str, p))


@pytest.fixture(scope="module")
def base():
    return BaseModel(BASE_CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    cells = jax.random.randint(jax.random.key(1), (B, T, 13), 0, 49)
    return dict(
        obs=jax.nn.one_hot(cells, 49).reshape(B, T, 637),
        action=jnp.asarray(rng.integers(0, 4, (B, T))),
        next_cells=jnp.asarray(rng.integers(0, 49, (B, T, 13))),
        mask=jnp.arange(T)[None] < jnp.asarray([[T], [5]]),
        subgoal=jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 1, 1, 1, 0, 0, 0]]),
    )


@pytest.fixture(scope="module")
def mc(mc_model):
    mc = nnx.clone(mc_model.metacontroller)  # initialising another one costs compiles
    # a non-zero encoder head: at init the proposal is exactly the prior, independent of e
    head = mc.encoder.out.kernel
    head[...] = 0.5 * jax.random.normal(jax.random.key(9), head.shape)
    return mc


@pytest.fixture(scope="module")
def mc_forward(mc):
    """Jitted posterior pass taking the state as an argument, so edited copies reuse it."""
    graphdef, state = nnx.split(mc)
    fwd = jax.jit(lambda st, e, mask, key: nnx.merge(graphdef, st)(e, mask, key))
    return fwd, state


@pytest.fixture(scope="module")
def residuals():
    return jax.random.normal(jax.random.key(3), (B, T, D))


# --- temporal integration ------------------------------------------------------------------


def test_integrate_matches_python_loop():
    rng = np.random.default_rng(0)
    beta = rng.uniform(size=(3, 6)).astype(np.float32)
    z_tilde = rng.normal(size=(3, 6, 4)).astype(np.float32)
    z0 = rng.normal(size=(3, 4)).astype(np.float32)
    expected, z = np.zeros_like(z_tilde), z0
    for t in range(6):
        z = beta[:, t, None] * z_tilde[:, t] + (1 - beta[:, t, None]) * z
        expected[:, t] = z
    np.testing.assert_allclose(integrate(beta, z_tilde, z0), expected, rtol=1e-6, atol=1e-6)
    # β ≡ 1: every step takes the proposal; β ≡ 0: the code never changes
    np.testing.assert_array_equal(integrate(np.ones_like(beta), z_tilde, z0), z_tilde)
    held = integrate(np.zeros_like(beta), z_tilde, z0)
    np.testing.assert_array_equal(held, np.broadcast_to(z0[:, None], held.shape))
    # z_0 defaults to zero
    np.testing.assert_allclose(integrate(beta, z_tilde), integrate(beta, z_tilde, 0 * z0))
    with pytest.raises(ValueError, match="beta"):
        integrate(beta[:, :5], z_tilde)


def test_module_scan_matches_step_api(mc, mc_forward, residuals):
    """The training-time scan equals stepping `switch_step` (the RL API) by hand."""
    fwd, state = mc_forward
    mask = jnp.ones((B, T), bool)
    out = fwd(state, residuals, mask, jax.random.key(0))
    h, z = mc.initial_state(B)
    for t in range(T):
        beta_t, h_next = mc.switch_step(residuals[:, t], h, z)
        np.testing.assert_allclose(out.h_prev[:, t], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.beta[:, t], beta_t, rtol=1e-5, atol=1e-6)
        z = beta_t[:, None] * out.z_tilde[:, t] + (1 - beta_t[:, None]) * z
        np.testing.assert_allclose(out.z[:, t], z, rtol=1e-5, atol=1e-6)
        h = h_next
    # the switch bias init makes early β high but not saturated
    assert 0.6 < float(jnp.mean(out.beta)) < 0.99


def test_no_temporal_abstraction_variant(residuals):
    cfg = MetacontrollerConfig(**{**MC_CFG.__dict__, "temporal_abstraction": False})
    graphdef, state = nnx.split(Metacontroller(cfg, D, rngs=nnx.Rngs(2)))
    out = jax.jit(
        lambda st, e: nnx.merge(graphdef, st)(e, jnp.ones((B, T), bool), jax.random.key(0))
    )(state, residuals)
    np.testing.assert_array_equal(out.beta, np.ones((B, T)))
    np.testing.assert_array_equal(out.z, out.z_tilde)


# --- causality ---------------------------------------------------------------------------


def test_switch_and_history_are_causal(mc, residuals):
    """Given the proposals, β_t, z_t and h_{t} ignore residuals after t."""
    t = 3
    z_tilde = jax.random.normal(jax.random.key(4), (B, T, MC_CFG.n_z))
    perturbed = residuals.at[:, t + 1 :].add(5.0)

    def run(e):
        x = mc.in_norm(e)
        h_prev = mc.history(x)
        beta, z = switch_and_integrate(mc.switch, x, h_prev, z_tilde)
        return h_prev, beta, z

    h0, b0, z0 = run(residuals)
    h1, b1, z1 = run(perturbed)
    np.testing.assert_array_equal(h1[:, : t + 2], h0[:, : t + 2])  # h_prev[t+1] = h_t
    np.testing.assert_array_equal(b1[:, : t + 1], b0[:, : t + 1])
    np.testing.assert_array_equal(z1[:, : t + 1], z0[:, : t + 1])
    assert not np.allclose(b1[:, t + 1 :], b0[:, t + 1 :])


def test_only_the_encoder_sees_the_future(mc, mc_forward, residuals):
    """The sequence embedding is non-causal, and it is the only path from the future into
    the past: with the encoder's embedding input zeroed, the whole pass becomes causal."""
    fwd, state = mc_forward
    t, key, mask = 3, jax.random.key(5), jnp.ones((B, T), bool)
    perturbed = residuals.at[:, t + 1 :].add(5.0)
    a, b = fwd(state, residuals, mask, key), fwd(state, perturbed, mask, key)
    assert not np.allclose(a.embedding, b.embedding)
    assert not np.allclose(a.mu[:, : t + 1], b.mu[:, : t + 1])  # the posterior looks ahead
    # β_1 depends on e_1, h_0 and z_0 only
    np.testing.assert_array_equal(a.beta[:, 0], b.beta[:, 0])
    np.testing.assert_array_equal(a.h_prev[:, : t + 2], b.h_prev[:, : t + 2])  # the GRU is causal

    blind_mc = nnx.clone(mc)
    kernel = blind_mc.encoder.hidden.kernel
    kernel[...] = kernel[...].at[D + MC_CFG.gru_hidden :].set(0.0)  # rows reading s
    blind = nnx.split(blind_mc)[1]
    a, b = fwd(blind, residuals, mask, key), fwd(blind, perturbed, mask, key)
    for name in ("mu", "log_var", "z_tilde", "beta", "z", "h_prev"):
        np.testing.assert_array_equal(
            getattr(a, name)[:, : t + 1], getattr(b, name)[:, : t + 1], err_msg=name
        )


def test_embedding_ignores_padding(mc_forward, residuals):
    fwd, state = mc_forward
    mask = jnp.arange(T)[None] < jnp.asarray([[T], [5]])
    a = fwd(state, residuals, mask, jax.random.key(0))
    b = fwd(state, residuals.at[1, 5:].add(3.0), mask, jax.random.key(0))
    np.testing.assert_array_equal(a.embedding, b.embedding)
    np.testing.assert_array_equal(a.mu[1, :5], b.mu[1, :5])


# --- controller identity -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mc_model(base):
    return MetacontrolledModel(base, MC_CFG, rngs=nnx.Rngs(6))


@pytest.fixture(scope="module")
def model_fwd(mc_model):
    """Jitted controlled forward with the state as an argument (edited copies reuse it)."""
    graphdef, state = nnx.split(mc_model)
    return jax.jit(lambda st, obs, mask, key: nnx.merge(graphdef, st)(obs, mask, key)), state


def _with_active_heads(model):
    """A copy whose decoder B head and encoder head are non-zero (U and the codes depend
    on the input, so NLL and KL depend on every part of the metacontroller)."""
    model = nnx.clone(model)
    dec, enc = model.metacontroller.decoder, model.metacontroller.encoder
    dec.b_head.kernel[...] = 0.3 * jax.random.normal(jax.random.key(8), dec.b_head.kernel.shape)
    enc.out.kernel[...] = 0.5 * jax.random.normal(jax.random.key(9), enc.out.kernel.shape)
    return model


def test_zero_decoder_leaves_base_logits_unchanged(base, batch, mc_model, model_fwd):
    run, state = model_fwd
    assert mc_model.layer == BASE_CFG.depth // 2
    z = jax.random.normal(jax.random.key(0), (3, MC_CFG.n_z))
    assert not np.any(mc_model.metacontroller.decoder.matrix(z))  # U = 0 at init
    base_out = jax.jit(lambda obs: base(obs, return_residuals=False))(batch["obs"])
    out, _ = run(state, batch["obs"], batch["mask"], jax.random.key(1))
    np.testing.assert_array_equal(out.action_logits, base_out.action_logits)
    np.testing.assert_array_equal(out.obs_logits, base_out.obs_logits)
    # a non-zero decoder does edit the stream (so the check above can fail)
    out2, _ = run(
        nnx.split(_with_active_heads(mc_model))[1], batch["obs"], batch["mask"], jax.random.key(1)
    )
    assert not np.allclose(out2.action_logits, base_out.action_logits)


# --- KL and loss ------------------------------------------------------------------------


def test_kl_closed_form_on_hand_values():
    mu = jnp.asarray([[1.0, 0.0], [0.0, 0.0], [0.5, -2.0]])
    log_var = jnp.asarray([[0.0, np.log(2.0)], [0.0, 0.0], [np.log(0.25), 1.0]])
    expected = [
        0.5 * ((1 + 1 - 1 - 0) + (2 + 0 - 1 - np.log(2))),  # = 1 - ½ log 2
        0.0,
        0.5 * ((0.25 + 0.25 - 1 - np.log(0.25)) + (np.e + 4 - 1 - 1)),
    ]
    np.testing.assert_allclose(gaussian_kl(mu, log_var), expected, rtol=1e-6)
    # Monte Carlo: E_q[log q(z) − log p(z)]
    z = mu[2] + jnp.exp(0.5 * log_var[2]) * jax.random.normal(jax.random.key(0), (200_000, 2))
    log_q = -0.5 * jnp.sum((z - mu[2]) ** 2 / jnp.exp(log_var[2]) + log_var[2], -1)
    log_p = -0.5 * jnp.sum(z**2, -1)
    np.testing.assert_allclose(jnp.mean(log_q - log_p), expected[2], rtol=0.02)


@pytest.fixture(scope="module")
def train_setup(mc_model):
    """One jitted `common.train` step (no donation) on a model with active heads, base frozen."""
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"))
    graphdef, state = create_train_state(
        _with_active_heads(mc_model), tx, jax.random.key(0), trainable=trainable_filter(MC_CFG)
    )
    return state, make_train_step(graphdef, metacontroller_loss, tx, donate=False)


def test_loss_is_nll_plus_weighted_kl_on_valid_steps(train_setup, model_fwd, batch):
    state, step = train_setup
    new, m = step(state, batch)  # metrics are those of the pre-update params
    key = jax.random.fold_in(state.rng, state.step)  # the key the step gave the loss
    run, _ = model_fwd
    _, mc = run(nnx.merge_state(state.params, state.frozen), batch["obs"], batch["mask"], key)
    mask = np.asarray(batch["mask"])
    kl = np.asarray(gaussian_kl(mc.mu, mc.log_var))
    np.testing.assert_allclose(m["kl"], kl[mask].mean(), rtol=1e-5)
    assert float(m["kl"]) > 0
    np.testing.assert_allclose(m["loss"], m["action_nll"] + MC_CFG.kl_weight * m["kl"], rtol=1e-6)
    beta = np.asarray(mc.beta)
    np.testing.assert_allclose(m["switches"], ((beta > 0.5) & mask).sum(1).mean(), rtol=1e-6)
    assert {"switch_precision", "switch_recall", "beta_mean", "action_acc"} <= set(m)

    # anything at padded steps (obs, actions, labels) changes neither loss nor update
    padded = dict(
        batch,
        obs=batch["obs"].at[1, 5:].set(1.0 - batch["obs"][1, 5:]),
        action=batch["action"].at[1, 5:].set(3),
        subgoal=batch["subgoal"].at[1, 5:].set(2),
    )
    new2, m2 = step(state, padded)
    for k in m:
        np.testing.assert_allclose(m2[k], m[k], rtol=1e-6, err_msg=k)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jax.tree.map(np.asarray, new2.params),
        jax.tree.map(np.asarray, new.params),
    )


# --- switch metrics ---------------------------------------------------------------------


def test_switch_metrics_on_hand_sequences():
    subgoal = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 5, 5, 7, 7, 7, 7]])
    mask = jnp.asarray([[True] * 8, [True] * 6 + [False] * 2])
    np.testing.assert_array_equal(
        subgoal_boundaries(subgoal, mask), [[1, 0, 0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        subgoal_boundaries(subgoal, mask, include_start=False),
        [[0, 0, 0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]],
    )
    beta = jnp.asarray(
        [
            [0.9, 0.1, 0.2, 0.3, 0.8, 0.1, 0.2, 0.7],  # switches at 0, 4, 7
            [0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9],
        ]
    )  # 0; 6, 7 are padding
    np.testing.assert_array_equal(switches_per_trajectory(beta, mask), [3.0, 1.0])
    pr = switch_precision_recall(beta, subgoal, mask)
    # row 0: 0 hits 0, 4 is within ±1 of both 3 and 5, 7 is 2 away from 5 -> 2/3 correct,
    # all of 0, 3, 5 found; row 1: 0 hits 0, boundary 4 missed -> pooled 3/4, 4/5
    np.testing.assert_allclose(pr["precision"], 3 / 4)
    np.testing.assert_allclose(pr["recall"], 4 / 5)
    np.testing.assert_allclose([pr["num_switches"], pr["num_boundaries"]], [4, 5])
    exact = switch_precision_recall(beta, subgoal, mask, tolerance=0)
    np.testing.assert_allclose([exact["precision"], exact["recall"]], [2 / 4, 2 / 5])
    wide = switch_precision_recall(beta, subgoal, mask, tolerance=2)
    np.testing.assert_allclose([wide["precision"], wide["recall"]], [1.0, 4 / 5])
    # no switches at all: precision and recall are 0, not NaN
    none = switch_precision_recall(jnp.zeros_like(beta), subgoal, mask)
    np.testing.assert_array_equal([none["precision"], none["recall"]], [0.0, 0.0])
    with pytest.raises(ValueError, match="tolerance"):
        switch_precision_recall(beta, subgoal, mask, tolerance=-1)


# --- training ---------------------------------------------------------------------------


def test_train_step_with_frozen_base_changes_only_the_metacontroller(train_setup, batch):
    state, step = train_setup
    paths = [_path(p) for p, _ in nnx.to_flat_state(state.params)]
    assert paths and all(p.startswith("metacontroller/") for p in paths)
    assert any(_path(p).startswith("base/") for p, _ in nnx.to_flat_state(state.frozen))
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    params_before = jax.tree.map(np.asarray, state.params)
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.frozen), frozen_before)
    changed = {
        _path(p): not np.array_equal(v[...], old[...])
        for (p, v), (_, old) in zip(
            nnx.to_flat_state(new.params), nnx.to_flat_state(params_before), strict=True
        )
    }
    # every part of φ gets a gradient: decoder, encoder, switch, GRU, embedder, input norm
    for part in ("decoder", "encoder", "switch", "gru", "embedder", "in_norm"):
        assert any(v for p, v in changed.items() if f"/{part}/" in p), part


def test_trainable_filters_and_config_validation(base):
    cotrain = MetacontrollerConfig(**{**MC_CFG.__dict__, "cotrain": True})
    assert trainable_filter(cotrain) is ALL_PARAMS
    assert trainable_filter(MC_CFG) is METACONTROLLER_PARAMS
    model = MetacontrolledModel(base, cotrain, rngs=nnx.Rngs(12))
    _, params, _ = nnx.split(model, trainable_filter(cotrain), ...)
    roots = {_path(p).split("/")[0] for p, _ in nnx.to_flat_state(params)}
    assert roots == {"base", "metacontroller"}
    paper = MetacontrollerConfig()
    assert (
        paper.n_z,
        paper.gru_hidden,
        paper.embed_dim,
        paper.encoder_hidden,
        paper.decoder_hidden,
        paper.rank,
    ) == (8, 32, 32, 64, 32, 16)
    assert paper.insertion_layer(6) == 3
    with pytest.raises(ValueError, match="layer"):
        MetacontrollerConfig(layer=5).insertion_layer(4)
    with pytest.raises(ValueError, match="n_z"):
        MetacontrollerConfig(n_z=0)
    with pytest.raises(ValueError, match="kl_weight"):
        MetacontrollerConfig(kl_weight=-1.0)
    mc = Metacontroller(MC_CFG, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected e"):
        mc(jnp.zeros((B, T, D + 1)), jnp.ones((B, T), bool), jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        mc(jnp.zeros((B, T, D)), jnp.ones((B, T), bool), None)
