"""Internal RL and raw-action RL: abstract-env bookkeeping against a naive replay, advantage
normalisation, the initial policy = prior, PPO convergence on a bandit, raw-action PPO
(internal RL App. C.5, docs/internal_rl.md D24). Tiny random models; one compiled reset and
rollout shared by the tests."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.train import OptimizerConfig
from internal_rl.envs import GridPinpad, make_task
from internal_rl.metacontroller import Metacontroller, MetacontrollerConfig
from internal_rl.models import BaseModel, ModelConfig
from internal_rl.rl import (
    LatentPolicy,
    RLConfig,
    abstract_rewards,
    gaussian_log_prob,
    internal_episodes,
    make_ppo_update,
    make_raw_action_rl,
    raw_episodes,
    resolve_metacontroller,
    trajectory_advantages,
)
from tests.contracts import assert_resume_bit_exact

# A 3x3 grid with one target colour: a random base model succeeds often enough that
# episodes have non-zero rewards and varying lengths.
ENV = GridPinpad(size=3, num_colours=2, num_walls=1, horizon=8)
TASK = make_task([0])
B, T = 8, ENV.horizon
BASE_CFG = ModelConfig(
    dim=16,
    depth=2,
    num_heads=2,
    mlp_hidden=32,
    obs_dim=ENV.obs_dim,
    num_entities=ENV.num_entities,
    num_cells=ENV.num_cells,
)
MC_CFG = MetacontrollerConfig(
    n_z=4,
    gru_hidden=8,
    embed_dim=8,
    embed_width=8,
    encoder_hidden=8,
    switch_hidden=8,
    decoder_hidden=8,
    rank=2,
    switch_bias_init=0.0,
)
LAYER = 1


def _with_switch_bias(mc: Metacontroller, bias: float) -> Metacontroller:
    """A copy whose switching unit always (bias +1e4) or never (-1e4) fires."""
    mc = nnx.clone(mc)
    mc.switch.out.bias[...] = jnp.full((1,), bias, jnp.float32)
    return mc


@pytest.fixture(scope="module")
def models():
    base = BaseModel(BASE_CFG, rngs=nnx.Rngs(0))
    mc = Metacontroller(MC_CFG, BASE_CFG.dim, rngs=nnx.Rngs(1))
    policy = LatentPolicy(BASE_CFG.dim, MC_CFG.n_z, 8, rngs=nnx.Rngs(2))
    return base, mc, policy


@pytest.fixture(scope="module")
def reset():
    tasks = jnp.broadcast_to(jnp.asarray(TASK), (B, TASK.shape[0]))
    fn = jax.jit(lambda k: jax.vmap(ENV.reset)(jax.random.split(k, B), tasks))
    return fn(jax.random.key(3))


@pytest.fixture(scope="module")
def run_episodes(models, reset):
    """(mc) -> (traj, episode) of one compiled internal rollout; the metacontroller's
    weights are an argument, so every switching variant reuses the compile."""
    base, _, policy = models
    graph = nnx.graphdef((base, models[1], policy))
    states, obs = reset

    @jax.jit
    def run(state, key):
        b, m, p = nnx.merge(graph, state)
        return internal_episodes(
            ENV, b, m, p, states, obs, key, layer=LAYER, horizon=T, record_obs=True
        )

    def call(mc, seed=0):
        out = run(nnx.state((base, mc, policy)), jax.random.key(seed))
        return jax.tree.map(np.asarray, out)

    return call


@pytest.fixture(scope="module")
def mixed(models, run_episodes):
    """A rollout with β near 0.5 (bias 0): a mix of switching and holding steps."""
    return run_episodes(models[1])


def test_never_firing_switch_gives_one_decision_per_episode(models, run_episodes):
    traj, ep = run_episodes(_with_switch_bias(models[1], -1e4))
    np.testing.assert_array_equal(ep["decisions"], 1.0)
    assert traj["decision"][:, 0].all()
    # the single code is held for the whole episode and collects the whole return
    np.testing.assert_array_equal(traj["z"], np.broadcast_to(traj["z"][:, :1], traj["z"].shape))
    np.testing.assert_allclose(
        np.asarray(abstract_rewards(traj["reward"], traj["decision"]))[:, 0], ep["ret"]
    )


def test_always_firing_switch_decides_every_raw_step(models, run_episodes):
    traj, ep = run_episodes(_with_switch_bias(models[1], 1e4))
    np.testing.assert_array_equal(traj["decision"], traj["valid"])
    np.testing.assert_array_equal(ep["decisions"], ep["length"])
    assert ep["length"].min() < T < ep["length"].max() + 1  # some episodes ended early


def test_beta_always_one_metacontroller_decides_every_step(models):
    """The forced-reset variant (temporal_abstraction=False): β ≡ 1, so the rollout's rule
    decides at every valid step; it binds to the base model like any metacontroller."""
    base, _, policy = models
    mc = Metacontroller(
        dataclasses.replace(MC_CFG, temporal_abstraction=False), BASE_CFG.dim, rngs=nnx.Rngs(1)
    )
    e = jax.random.normal(jax.random.key(0), (B, BASE_CFG.dim))
    h, z = mc.initial_state(B)
    beta, _ = mc.switch_step(e, h, z)
    np.testing.assert_array_equal(beta, 1.0)
    assert resolve_metacontroller(mc, base) == (mc, BASE_CFG.depth // 2)


def _naive_abstract_rewards(reward, decision):
    """Alg. 1's inner loop: accumulate raw rewards until the next decision."""
    out = np.zeros_like(reward)
    for b in range(reward.shape[0]):
        k, acc = -1, 0.0
        for t in range(reward.shape[1]):
            if decision[b, t]:
                if k >= 0:
                    out[b, k] = acc
                k, acc = k + 1, 0.0
            acc += reward[b, t]
        out[b, k] = acc
    return out


def test_abstract_env_matches_naive_replay(models, mixed):
    base, mc, _ = models
    traj, ep = mixed
    dec = traj["decision"]
    valid = traj["valid"]
    # preconditions: the sample exercises switching, holding and rewards
    assert ep["ret"].sum() > 0 and (dec[:, 1:] & valid[:, 1:]).any() and (~dec & valid).any()

    # residuals: a full causal forward of the controlled model on the recorded observations
    captured = {}

    def edit(e):
        captured["e"] = e
        return mc.control(e, jnp.asarray(traj["z"]))

    base(jnp.asarray(traj["obs"]), intervention=edit, intervention_layer=LAYER)
    e_full = np.asarray(captured["e"])
    np.testing.assert_allclose(traj["e"][valid], e_full[valid], atol=1e-4, rtol=1e-4)

    # switching: step the frozen switch unit in Python on the recorded residuals and codes
    h, z_prev = mc.initial_state(B)
    for t in range(T):
        beta, h = mc.switch_step(jnp.asarray(traj["e"][:, t]), h, z_prev)
        beta = np.asarray(beta)
        np.testing.assert_allclose(traj["beta"][:, t], beta, atol=1e-5)
        expect = valid[:, t] & ((beta >= 0.5) | (t == 0))
        clear = np.abs(beta - 0.5) > 1e-4
        np.testing.assert_array_equal(dec[clear, t], expect[clear])
        if t > 0:  # codes change only at decisions
            held = ~dec[:, t]
            np.testing.assert_array_equal(traj["z"][held, t], traj["z"][held, t - 1])
        z_prev = jnp.asarray(traj["z"][:, t])

    # abstract rewards = raw rewards summed over each inner loop
    got = np.asarray(abstract_rewards(jnp.asarray(traj["reward"]), jnp.asarray(dec)))
    np.testing.assert_allclose(got, _naive_abstract_rewards(traj["reward"], dec))
    np.testing.assert_allclose(got.sum(1), ep["ret"])
    np.testing.assert_array_equal(ep["decisions"], dec.sum(1))


def test_initial_policy_is_the_prior(mixed):
    policy = LatentPolicy(BASE_CFG.dim, MC_CFG.n_z, 8, rngs=nnx.Rngs(5))
    e = jax.random.normal(jax.random.key(1), (B, BASE_CFG.dim)) * 10.0
    h, mean, log_std = policy.step(policy.initial_carry(B), e)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(log_std, 0.0)
    np.testing.assert_allclose(
        policy.entropy(), 0.5 * MC_CFG.n_z * math.log(2 * math.pi * math.e), rtol=1e-6
    )
    # the rollout's codes were drawn from N(0, I): their recorded log-probs are the prior's
    traj, _ = mixed
    prior = -0.5 * np.sum(traj["z"] ** 2 + math.log(2 * math.pi), axis=-1)
    np.testing.assert_allclose(
        traj["logp"][traj["decision"]], prior[traj["decision"]], rtol=1e-5, atol=1e-5
    )
    # ... and re-evaluating them (the PPO ratio's numerator) gives the same values
    re = policy.log_probs(
        jnp.asarray(traj["e"]), jnp.asarray(traj["z"]), jnp.asarray(traj["decision"])
    )
    np.testing.assert_allclose(
        np.asarray(re)[traj["decision"]], prior[traj["decision"]], rtol=1e-5, atol=1e-5
    )


def test_advantages_zero_rewards_and_normalisation():
    np.testing.assert_array_equal(trajectory_advantages(jnp.zeros(16)), 0.0)
    np.testing.assert_array_equal(trajectory_advantages(jnp.ones(16)), 0.0)
    r = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    adv = np.asarray(trajectory_advantages(r, 1e-3))
    assert np.isfinite(adv).all()
    np.testing.assert_allclose(adv, (r - 0.25) / (np.std(r) + 1e-3), rtol=1e-6)


# ------------------------------------------------------------------------------ bandit


BANDIT = RLConfig(
    episodes=64,
    batch_episodes=64,
    epochs=2,
    minibatches=2,
    optim=OptimizerConfig(learning_rate=0.05, schedule="constant"),
    policy_width=8,
)
BANDIT_DIM, BANDIT_NZ = 4, 2


@pytest.fixture(scope="module")
def bandit():
    """One decision per episode; reward 1 iff z[0] > 1 (probability 0.16 under the prior).
    Returns (iterate(params, opt_state, key, zero_returns) jitted, params, opt_state, graph)."""
    policy = LatentPolicy(BANDIT_DIM, BANDIT_NZ, BANDIT.policy_width, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(policy, nnx.Param, ...)
    tx = BANDIT.optimizer()

    def logp_fn(p, static, batch):
        pol = nnx.merge(graph, p, static)
        return pol.log_probs(batch["e"], batch["z"], batch["decision"]), pol.entropy()

    ppo = make_ppo_update(BANDIT, tx, logp_fn)

    @jax.jit
    def iterate(params, opt_state, key, zero_returns):
        k_e, k_z, k_ppo = jax.random.split(key, 3)
        pol = nnx.merge(graph, params, rest)
        e = jax.random.normal(k_e, (64, BANDIT_DIM))
        _, mean, log_std = pol.step(pol.initial_carry(64), e)
        z = mean + jnp.exp(log_std) * jax.random.normal(k_z, mean.shape)
        ret = jnp.where(zero_returns, 0.0, (z[:, 0] > 1.0).astype(jnp.float32))
        batch = dict(
            e=e[:, None],
            z=z[:, None],
            logp=gaussian_log_prob(z, mean, log_std)[:, None],
            decision=jnp.ones((64, 1), bool),
        )
        adv = trajectory_advantages(ret, BANDIT.adv_eps)
        params, opt_state, metrics = ppo(params, opt_state, rest, batch, adv, k_ppo)
        # probability of success of the updated policy, averaged over inputs
        _, mean, log_std = nnx.merge(graph, params, rest).step(pol.initial_carry(64), e)
        p_success = 0.5 * jax.scipy.special.erfc(
            (1.0 - mean[:, 0]) / jnp.exp(log_std[0]) / math.sqrt(2)
        )
        return params, opt_state, jnp.mean(p_success), metrics

    return iterate, params, tx.init(params)


def test_zero_returns_leave_the_policy_unchanged(bandit):
    iterate, params, opt_state = bandit
    new, _, _, metrics = iterate(params, opt_state, jax.random.key(0), True)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, new, params)


def test_ppo_learns_a_bandit(bandit):
    iterate, params, opt_state = bandit
    history = []
    for i in range(25):
        params, opt_state, p, metrics = iterate(params, opt_state, jax.random.key(i + 1), False)
        history.append(float(p))
    assert 0.1 < history[0] < 0.4  # starts near the prior's 0.16
    assert history[-1] > 0.9, history


# ------------------------------------------------------------------------ raw-action RL


def test_raw_action_ppo_step_decreases_its_loss(models, reset):
    base = models[0]
    cfg = RLConfig(
        episodes=B,
        batch_episodes=B,
        epochs=2,
        minibatches=2,
        optim=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
    )
    program = make_raw_action_rl(cfg, base, ENV, TASK)
    states, obs = reset

    @jax.jit
    def episodes(params, static, key):
        return raw_episodes(
            ENV, nnx.merge(program.graphdef, params, static), states, obs, key, horizon=T
        )

    traj, ep = episodes(program.params, program.static, jax.random.key(0))
    batch = {k: traj[k] for k in ("obs", "action", "logp", "decision")}
    np.testing.assert_array_equal(ep["decisions"], ep["length"])  # a decision per raw step
    # KV-cached sampling and the full forward of the PPO ratio agree: ρ = 1 on-policy
    logp, _ = program.logp_fn(program.params, program.static, batch)
    valid = np.asarray(traj["valid"])
    np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(traj["logp"])[valid], atol=1e-4)

    # a fixed batch with non-degenerate returns: the surrogate loss goes down
    adv = trajectory_advantages(jnp.arange(B, dtype=jnp.float32) % 3)
    ppo = jax.jit(make_ppo_update(cfg, program.tx, program.logp_fn))
    params, opt_state = program.params, program.tx.init(program.params)
    losses = []
    for i in range(4):
        params, opt_state, metrics = ppo(
            params, opt_state, program.static, batch, adv, jax.random.key(i)
        )
        losses.append(float(metrics["loss_first"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1e-3, losses


# ------------------------------------------------------------------- config and public API


@pytest.mark.parametrize(
    "field,value",
    [
        ("batch_episodes", 0),
        ("minibatches", 3),
        ("clip_eps", 1.5),
        ("beta_threshold", 1.0),
        ("episodes", 4),
        ("raw_trainable", "lora"),
    ],
)
def test_rl_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"RLConfig.{field}"):
        dataclasses.replace(RLConfig(episodes=64, batch_episodes=8), **{field: value})


def test_metacontroller_of_another_width_is_rejected(models):
    mc = Metacontroller(MC_CFG, BASE_CFG.dim * 2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="metacontroller.dim"):
        resolve_metacontroller(mc, models[0])


@pytest.mark.slow
def test_public_runs_return_learning_curves(models):
    from internal_rl.rl import run_internal_rl, run_raw_action_rl

    base, mc, _ = models
    before = jax.tree.map(np.array, nnx.state((base, mc)))
    cfg = RLConfig(episodes=3 * B, batch_episodes=B, updates_per_call=2)  # 2 chunk shapes
    lines = []
    for result in (
        run_internal_rl(cfg, base, mc, ENV, TASK, 0, log=lines.append),
        run_raw_action_rl(cfg, base, ENV, TASK, 0, log=lines.append),
    ):
        np.testing.assert_array_equal(result.episodes, [B, 2 * B, 3 * B])
        assert result.success_rate.shape == result.decisions_per_episode.shape == (3,)
        # success over B episodes per update
        np.testing.assert_allclose(
            result.success_rate * B, np.round(result.success_rate * B), atol=1e-5
        )
        assert (result.decisions_per_episode >= 1).all() and result.wall_seconds > 0
    assert len(lines) == 4
    # the caller's (frozen) modules are neither trained nor donated away
    jax.tree.map(np.testing.assert_array_equal, nnx.state((base, mc)), before)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(models, tmp_path):
    from common.checkpoint import Checkpointer
    from internal_rl.rl import make_internal_rl, run_internal_rl

    base, mc, _ = models
    lines = []

    def run(directory, updates):
        """Internal RL to `updates` updates (one per chunk, checkpointed after each):
        the trained policy and optimizer state of the last checkpoint, and the curves."""
        cfg = RLConfig(episodes=updates * B, batch_episodes=B, updates_per_call=1)
        result = run_internal_rl(
            cfg, base, mc, ENV, TASK, 0, log=lines.append, checkpoint_dir=directory
        )
        program = make_internal_rl(cfg, base, mc, ENV, TASK, 0)
        with Checkpointer(directory) as ckpt:
            state, _ = ckpt.restore(
                dict(params=program.params, opt_state=program.tx.init(program.params))
            )
        return dict(state=state, metrics=result.metrics)

    assert_resume_bit_exact(run, tmp_path, kill_after=2, total=3)
    (resumed_line,) = [line for line in lines if "resumed" in line]
    assert "resumed at update 2" in resumed_line
