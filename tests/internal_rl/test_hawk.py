"""Hawk base model: recurrence vs naive loop, step path = sequence path, causality,
interventions, Gaussian losses and a few training steps (internal RL App. D.1,
docs/internal_rl.md D24)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step
from internal_rl.models.hawk import (
    HawkConfig,
    HawkModel,
    gaussian_nll,
    linear_recurrence,
    pretrain_loss,
)
from tests.contracts import assert_decode_matches_forward

CFG = HawkConfig(dim=32, depth=2, num_heads=4, mlp_hidden=48, obs_dim=6, action_dim=3)
B, T = 2, 9


@pytest.fixture(scope="module")
def model():
    m = HawkModel(CFG, rngs=nnx.Rngs(0))
    # a 0.1-scaled init leaves the blocks nearly linear; larger weights make every path
    # (conv taps, gates, recurrence) matter for the equality and causality checks below
    graphdef, state = nnx.split(m)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def obs():
    return jax.random.normal(jax.random.key(1), (B, T, CFG.obs_dim))


@pytest.fixture(scope="module")
def forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda o: nnx.merge(graphdef, state)(o))


@pytest.fixture(scope="module")
def stepped(model):
    """Runs `decode_step` over every token; returns time-major (action, obs, residuals)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(o):
        m = nnx.merge(graphdef, state)

        def body(caches, o_t):
            out, caches = m.decode_step(o_t, caches)
            return caches, (out.action_mean[:, 0], out.obs_mean[:, 0], out.residuals[:, :, 0])

        return jax.lax.scan(body, m.init_caches(B), jnp.swapaxes(o, 0, 1))

    return run


def test_linear_recurrence_matches_loop():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(k1, (2, 11, 5))
    b = jax.random.normal(k2, (2, 11, 5))
    h0 = jax.random.normal(k3, (2, 5))
    h, expected = np.asarray(h0), []
    for t in range(11):
        h = np.asarray(a[:, t]) * h + np.asarray(b[:, t])
        expected.append(h)
    np.testing.assert_allclose(linear_recurrence(a, b, h0), np.stack(expected, 1), atol=1e-5)


def test_shapes(forward, obs):
    out = forward(obs)
    assert out.action_mean.shape == (B, T, CFG.action_dim)
    assert out.action_log_std.shape == (CFG.action_dim,)
    assert out.obs_mean.shape == (B, T, CFG.obs_dim)
    assert out.residuals.shape == (CFG.depth + 1, B, T, CFG.dim)
    assert [c.conv.shape for c in out.caches] == [(B, CFG.conv_width - 1, CFG.width)] * 2


def test_step_path_equals_sequence_path(forward, stepped, obs):
    caches, (act, ob, res) = stepped(obs)  # time-major
    full = forward(obs)
    # residuals compared as [B, T, L+1, D]: forward [L+1, B, T, D], stepped [T, L+1, B, D]
    assert_decode_matches_forward(
        (full.action_mean, full.obs_mean, jnp.moveaxis(full.residuals, 0, 2)),
        (act, ob, jnp.swapaxes(res, 1, 2)),
        atol=1e-5,
        rtol=1e-5,
    )
    for c_step, c_seq in zip(caches, full.caches, strict=True):
        np.testing.assert_allclose(c_step.conv, c_seq.conv, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(c_step.h, c_seq.h, atol=1e-5, rtol=1e-5)


def test_sequence_continues_from_caches(model, forward, obs):
    full = forward(obs)
    graphdef, state = nnx.split(model)

    @jax.jit
    def in_two_parts(o):
        m = nnx.merge(graphdef, state)
        return m(o[:, 4:], caches=m(o[:, :4]).caches).action_mean

    np.testing.assert_allclose(in_two_parts(obs), full.action_mean[:, 4:], atol=1e-5, rtol=1e-5)


def test_no_causal_leakage(forward, obs):
    base = forward(obs)
    t = 4
    perturbed = obs.at[:, t].add(5.0)
    out = forward(perturbed)
    np.testing.assert_array_equal(out.action_mean[:, :t], base.action_mean[:, :t])
    np.testing.assert_array_equal(out.obs_mean[:, :t], base.obs_mean[:, :t])
    np.testing.assert_array_equal(out.residuals[:, :, :t], base.residuals[:, :, :t])
    # the change does reach t and beyond (through conv and recurrence: t + conv_width too)
    assert not np.allclose(out.action_mean[:, t], base.action_mean[:, t])
    assert not np.allclose(out.action_mean[:, -1], base.action_mean[:, -1])


def test_interventions(model, obs):
    graphdef, state = nnx.split(model)

    @jax.jit
    def outputs(o):
        m = nnx.merge(graphdef, state)
        base = m(o)
        same = m(o, intervention=lambda e: e, intervention_layer=1)
        edited = m(o, intervention=lambda e: e + 1.0, intervention_layer=1)
        step_out, _ = m.decode_step(
            o[:, 0], m.init_caches(B), intervention=lambda e: e + 1.0, intervention_layer=1
        )
        # lower half then upper half (Alg. 1 split)
        lo, _, caches = m.run_blocks(
            m.embed(o), m.init_caches(B), stop_layer=1, return_residuals=False
        )
        hi, _, _ = m.run_blocks(lo, caches, start_layer=1, return_residuals=False)
        return base, same, edited, step_out, m.heads(hi)[0]

    base, same, edited, step_out, split = outputs(obs)
    np.testing.assert_array_equal(same.action_mean, base.action_mean)
    np.testing.assert_array_equal(edited.residuals[:1], base.residuals[:1])
    np.testing.assert_allclose(edited.residuals[1], base.residuals[1] + 1.0, rtol=1e-6)
    assert not np.allclose(edited.action_mean, base.action_mean)
    # the step path applies the same edit
    np.testing.assert_allclose(step_out.action_mean[:, 0], edited.action_mean[:, 0], atol=1e-5)
    # the split stack equals the whole stack
    np.testing.assert_allclose(split, base.action_mean, atol=1e-6)
    with pytest.raises(ValueError, match="intervention_layer"):
        model.run_blocks(
            jnp.zeros((B, 1, CFG.dim)),
            model.init_caches(B),
            intervention=lambda e: e,
            intervention_layer=CFG.depth + 1,
        )


def test_gaussian_nll_closed_form():
    x = np.array([[0.3, -1.0]])
    mean = np.array([[0.0, 0.5]])
    log_std = np.array([0.2, -0.4])
    std = np.exp(log_std)
    expected = np.sum(0.5 * ((x - mean) / std) ** 2 + np.log(std * np.sqrt(2 * np.pi)), -1)
    np.testing.assert_allclose(gaussian_nll(x, mean, log_std), expected, rtol=1e-6)


def test_training_lowers_loss_and_ignores_padding():
    model = HawkModel(CFG, rngs=nnx.Rngs(1))
    k1, k2 = jax.random.split(jax.random.key(3))
    obs = jax.random.normal(k1, (4, T, CFG.obs_dim))
    # a learnable target: actions are a fixed linear function of the current observation
    action = jnp.tanh(obs[..., : CFG.action_dim])
    mask = jnp.arange(T)[None] < jnp.asarray([[9], [7], [5], [9]])
    batch = dict(obs=obs, action=action, next_obs=jnp.roll(obs, -1, axis=1), mask=mask)
    padded = dict(batch, action=jnp.where(mask[..., None], action, 99.0))
    graphdef, params = nnx.split(model)
    loss_fn = jax.jit(lambda b: pretrain_loss(nnx.merge(graphdef, params), b, None))
    loss, metrics = loss_fn(batch)
    np.testing.assert_allclose(loss, metrics["action_nll"] + 10.0 * metrics["obs_nll"], rtol=1e-6)
    np.testing.assert_allclose(loss_fn(padded)[0], loss, rtol=1e-6)

    tx = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    graphdef, state = create_train_state(model, tx, jax.random.key(0))
    step = make_train_step(graphdef, pretrain_loss, tx, donate=False)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_policy_interface_matches_the_step_and_sequence_paths(model, forward, obs):
    """lower_step + upper_step (the split RL runs, with no edit) act as decode_step, and
    the full-sequence action log-probabilities equal the per-step ones."""
    graphdef, state = nnx.split(model)
    action = jax.random.normal(jax.random.key(3), (B, T, CFG.action_dim))

    @jax.jit
    def split_steps(o, a):
        m = nnx.merge(graphdef, state)

        def body(caches, xs):
            o_t, a_t = xs
            e, caches = m.lower_step(o_t, caches, 1)
            head, caches = m.upper_step(e, caches, 1)
            return caches, (head[0], m.action_log_prob(head, a_t))

        return jax.lax.scan(body, m.init_caches(B), (jnp.swapaxes(o, 0, 1), jnp.swapaxes(a, 0, 1)))[
            1
        ]

    mean, logp_steps = split_steps(obs, action)
    np.testing.assert_allclose(
        jnp.swapaxes(mean, 0, 1), forward(obs).action_mean, rtol=1e-4, atol=1e-5
    )
    logp_seq, entropy = model.action_log_probs(obs, action)
    np.testing.assert_allclose(logp_seq, jnp.swapaxes(logp_steps, 0, 1), rtol=1e-4, atol=1e-4)
    log_std = model.log_std()
    np.testing.assert_allclose(entropy, jnp.sum(log_std + 0.5 * (np.log(2 * np.pi) + 1)), rtol=1e-6)
    # greedy sampling is the mean; sampled actions have the head's spread
    head = (mean[0], log_std)
    np.testing.assert_array_equal(model.sample_action(jax.random.key(0), head, True), mean[0])
    draws = jax.vmap(lambda k: model.sample_action(k, head))(
        jax.random.split(jax.random.key(1), 4000)
    )
    np.testing.assert_allclose(
        jnp.std(draws, axis=0), jnp.broadcast_to(jnp.exp(log_std), mean[0].shape), rtol=0.1
    )


def test_parameters_are_strongly_typed():
    """A weakly typed parameter comes back strongly typed from the first optimizer step,
    so every jitted loop over (params, opt_state) would compile twice."""
    fresh = HawkModel(CFG, rngs=nnx.Rngs(0))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(fresh, nnx.Param))
    assert [jax.tree_util.keystr(p) for p, x in leaves if x.weak_type] == []
