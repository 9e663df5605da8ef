"""Internal RL and raw-action RL with critic-free PPO (paper §4, App. C.5, Algs. 1-3).

**Internal RL.** The environment the agent sees is {real env + frozen base model split at
the metacontroller's insertion layer l + frozen switching unit (with its GRU) + frozen
decoder f_hyp}. At every raw step t (Alg. 1):

    e_t        = lower_blocks(o_t)                          (stream l, KV caches advance)
    β_t, h_t   = f_switch(e_t, h_{t-1}, z_{t-1});  fire = β_t >= 0.5, always at t = 0 (Alg. 2)
    z_t        = π(· | e at decisions) if fire else z_{t-1}  (the agent acts only here)
    a_t        ~ upper_blocks(e_t + U(z_t) e_t)             (the base model's action head)
    o_{t+1}, r_t = env.step(a_t)

One abstract step lasts from one decision to the next; its reward is the sum of the raw
rewards in between (`abstract_rewards`). A batch of episodes is one `lax.scan` over the T
raw steps at static shapes, recording a per-step `decision` flag; the policy (a GRU over
the residuals seen at decisions with a Gaussian head over z; the paper uses a 1-layer Hawk
SSM) is evaluated every step and its state committed only where a decision fires
(docs/internal_rl.md D18).

**Raw-action RL.** The same PPO core fine-tunes the base model's own token policy, with a
decision at every raw step (all parameters by default, docs/internal_rl.md D20; `raw_trainable=
"action_head"` trains only the action head as a cheaper variant).

**PPO (App. C.5.2).** Critic-free: the advantage of every decision of a trajectory is its
batch-normalised return `(R − mean_B R) / (std_B R + δ)`; the clipped ratio objective is
summed over the decisions of each trajectory and averaged over trajectories. A whole
update (rollout + PPO epochs) and `updates_per_call` consecutive updates run inside one
jitted `lax.scan` (purejaxrl style); metrics come back per update. With a
`checkpoint_dir` a run saves after every such chunk and resumes bit for bit. The compiled
chunk is cached in `common.train.STEPS` under the program's key, so runs of one shape
(seeds, methods on the same model) compile once.

Variants (β ≡ 1 metacontroller, co-trained metacontroller) run through the same code:
`run_internal_rl` takes whichever `Metacontroller` (or `MetacontrolledModel`) it is given.
Both base models run through the same code: the grid world's transformer (categorical
actions) and the continuous pinpads' Hawk model (diagonal Gaussian actions); the model
supplies its lower/upper halves, its action sampler and its log-probabilities.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common.checkpoint import Checkpointer
from common.config import require
from common.nn import RMSNorm, dense
from common.train import STEPS, OptimizerConfig
from internal_rl.metacontroller import MetacontrolledModel, Metacontroller
from internal_rl.models.hawk import HawkModel
from internal_rl.models.transformer import BaseModel

# Either base model: both implement the policy interface (`lower_step`, `upper_step`,
# `policy_head`, `sample_action`, `action_log_prob`, `action_log_probs`).
PolicyModel = BaseModel | HawkModel

_LOG_2PI = math.log(2.0 * math.pi)
RAW_TRAINABLE = ("all", "action_head")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """PPO settings shared by internal RL and raw-action RL (App. C.5.2,
    docs/internal_rl.md D16, D22)."""

    episodes: int = 100_000  # episode budget; updates = episodes // batch_episodes
    batch_episodes: int = 128  # B episodes per update (one group for the advantage)
    epochs: int = 2  # PPO epochs over each batch
    minibatches: int = 1  # per epoch; minibatches split episodes (the policy is recurrent)
    clip_eps: float = 0.2
    # AdamW (0.9, 0.999), constant LR, global-norm clipping (Table A13, docs/internal_rl.md
    # D16); total_steps counts PPO updates (episodes // batch_episodes)
    optim: OptimizerConfig = OptimizerConfig(
        name="adamw",
        learning_rate=3e-4,
        schedule="constant",
        weight_decay=0.0,
        total_steps=100_000 // 128,
        grad_clip_norm=1.0,
    )
    entropy_coef: float = 0.0  # the paper uses none
    adv_eps: float = 1e-3  # δ in (R − mean) / (std + δ)
    policy_width: int = 64  # GRU width of the abstract policy
    beta_threshold: float = 0.5  # β_t >= threshold ends an abstract action
    horizon: int | None = None  # raw steps per episode; None = the env's horizon T
    updates_per_call: int = 10  # updates scanned inside one compiled call (log period)
    raw_trainable: str = "all"  # raw-action RL: "all" parameters or only the "action_head"

    def __post_init__(self):
        req = functools.partial(require, self)
        for name in ("batch_episodes", "epochs", "minibatches", "policy_width", "updates_per_call"):
            req(name, getattr(self, name) >= 1, ">= 1")
        req(
            "episodes",
            self.episodes >= self.batch_episodes,
            f">= batch_episodes ({self.batch_episodes})",
        )
        req(
            "minibatches",
            self.batch_episodes % self.minibatches == 0,
            f"a divisor of batch_episodes ({self.batch_episodes})",
        )
        req("clip_eps", 0.0 < self.clip_eps < 1.0, "in (0, 1)")
        req("entropy_coef", self.entropy_coef >= 0, ">= 0")
        req("adv_eps", self.adv_eps > 0, "> 0")
        req("beta_threshold", 0.0 < self.beta_threshold < 1.0, "in (0, 1)")
        req("horizon", self.horizon is None or self.horizon >= 1, "None or >= 1")
        req("raw_trainable", self.raw_trainable in RAW_TRAINABLE, f"one of {RAW_TRAINABLE}")

    @property
    def num_updates(self) -> int:
        return self.episodes // self.batch_episodes

    def optimizer(self) -> optax.GradientTransformation:
        """The optax optimizer of `optim`, one object per config (`common.train.STEPS`)."""
        return STEPS.optimizer(self.optim)


class RLResult(NamedTuple):
    """Learning curve, one point per update: cumulative episodes int64 [n], on-policy
    success rate f32 [n] and mean abstract decisions per episode f32 [n] of that update's
    batch, total wall seconds (compiles included), and further per-update metrics."""

    episodes: np.ndarray
    success_rate: np.ndarray
    decisions_per_episode: np.ndarray
    wall_seconds: float
    metrics: dict[str, np.ndarray] | None = None


# ---------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------


def gaussian_log_prob(z: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log N(z; mean, diag exp(log_std)²). z, mean f32 [..., n], log_std [..., n] or [n]
    -> f32 [...]."""
    u = (z - mean) * jnp.exp(-log_std)
    return -0.5 * jnp.sum(jnp.square(u) + 2.0 * log_std + _LOG_2PI, axis=-1)


def trajectory_advantages(returns: jax.Array, eps: float = 1e-3) -> jax.Array:
    """Batch-normalised returns (R − mean) / (std + eps), population std.

    returns f32 [B] -> f32 [B]. A batch of equal returns (e.g. all zero) gives exactly 0.
    """
    centred = returns - jnp.mean(returns)
    return centred / (jnp.sqrt(jnp.mean(jnp.square(centred))) + eps)


def abstract_rewards(reward: jax.Array, decision: jax.Array) -> jax.Array:
    """Reward of each abstract step: the raw rewards summed from one decision to the next.

    reward f32 [B, T], decision bool [B, T] -> f32 [B, T]; entry k is the k-th abstract
    step's reward (0 beyond the number of decisions). Rewards before the first decision
    (none in practice: t = 0 always decides) are dropped.
    """
    t = reward.shape[-1]
    seg = jnp.cumsum(decision.astype(jnp.int32), axis=-1) - 1
    seg = jnp.where(seg >= 0, seg, t)  # out of range: dropped by the scatter

    def one(r, s):
        return jnp.zeros(t, reward.dtype).at[s].add(r, mode="drop")

    return jax.vmap(one)(reward.reshape(-1, t), seg.reshape(-1, t)).reshape(reward.shape)


def clipped_surrogate(
    logp: jax.Array, logp_old: jax.Array, adv: jax.Array, mask: jax.Array, clip_eps: float
) -> tuple[jax.Array, dict]:
    """PPO loss (to minimise) = −mean_τ Σ_{t: mask} min(ρ A_τ, clip(ρ, 1±ε) A_τ).

    logp, logp_old f32 [B, T], adv f32 [B], mask bool [B, T] (decision steps).
    Returns (loss, {approx_kl, clip_frac}) with per-decision means.
    """
    m = mask.astype(jnp.float32)
    log_ratio = jnp.where(mask, logp - logp_old, 0.0)
    ratio = jnp.exp(log_ratio)
    a = adv[:, None]
    obj = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    loss = -jnp.sum(obj * m) / logp.shape[0]
    n = jnp.maximum(jnp.sum(m), 1.0)
    approx_kl = jnp.sum(((ratio - 1.0) - log_ratio) * m) / n
    clip_frac = jnp.sum((jnp.abs(ratio - 1.0) > clip_eps) * m) / n
    return loss, dict(approx_kl=approx_kl, clip_frac=clip_frac)


# ---------------------------------------------------------------------------------------
# The abstract policy
# ---------------------------------------------------------------------------------------


class LatentPolicy(nnx.Module):
    """π(z | e at decisions): RMSNorm -> GRU(width) -> Gaussian over z.

    The mean head is zero-initialised (weights and bias) and the state-independent log-std
    is 0, so the initial policy is exactly the metacontroller's prior N(0, I)
    (docs/internal_rl.md D17).
    The input norm is the policy's own (choice: the residual scale is the base model's).
    """

    def __init__(self, dim: int, n_z: int, width: int, *, rngs: nnx.Rngs):
        self.dim, self.n_z, self.width = dim, n_z, width
        self.norm = RMSNorm(dim, rngs=rngs)
        self.gru = nnx.GRUCell(dim, width, rngs=rngs)
        self.mean = dense(width, n_z, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.log_std = nnx.Param(jnp.zeros((n_z,), jnp.float32))

    def initial_carry(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.width), jnp.float32)

    def step(self, h: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """h f32 [B, W], e f32 [B, D] -> (h' [B, W], mean [B, n_z], log_std [n_z])."""
        h, _ = self.gru(h, self.norm(e))
        return h, self.mean(h), self.log_std[...]

    def log_probs(self, e: jax.Array, z: jax.Array, decision: jax.Array) -> jax.Array:
        """Re-evaluates the rollout's decisions: e f32 [B, T, D], z f32 [B, T, n_z],
        decision bool [B, T] -> log π(z_t | ...) f32 [B, T] (meaningful where decision).
        The carry advances only at decisions, exactly as in the rollout."""

        def body(h, xs):
            e_t, z_t, d_t = xs
            h_new, mean, log_std = self.step(h, e_t)
            return jnp.where(d_t[:, None], h_new, h), gaussian_log_prob(z_t, mean, log_std)

        xs = (jnp.swapaxes(e, 0, 1), jnp.swapaxes(z, 0, 1), jnp.swapaxes(decision, 0, 1))
        _, logp = jax.lax.scan(body, self.initial_carry(e.shape[0]), xs)
        return jnp.swapaxes(logp, 0, 1)

    def entropy(self) -> jax.Array:
        """Entropy of the Gaussian (state-independent std), f32 []."""
        return jnp.sum(self.log_std[...] + 0.5 * (_LOG_2PI + 1.0))


# ---------------------------------------------------------------------------------------
# Rollouts (pure; call them inside jit)
# ---------------------------------------------------------------------------------------


def _reset(env, key: jax.Array, tasks: jax.Array):
    return jax.vmap(env.reset)(jax.random.split(key, tasks.shape[0]), tasks)


def internal_rollout(
    env,
    base: PolicyModel,
    metacontroller: Metacontroller,
    policy: LatentPolicy,
    key: jax.Array,
    tasks: jax.Array,
    **kwargs,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Reset B envs on tasks int32 [B, K], then `internal_episodes` (same kwargs)."""
    k_reset, k_run = jax.random.split(key)
    states, obs = _reset(env, k_reset, tasks)
    return internal_episodes(env, base, metacontroller, policy, states, obs, k_run, **kwargs)


def internal_episodes(
    env,
    base: PolicyModel,
    metacontroller: Metacontroller,
    policy: LatentPolicy,
    states: Any,
    obs: jax.Array,
    key: jax.Array,
    *,
    layer: int,
    horizon: int,
    beta_threshold: float = 0.5,
    record_obs: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """B episodes in the abstract environment (Algs. 1-3), one `lax.scan` over raw time.

    states: B env states (leading axis B) just after reset, obs f32 [B, obs_dim] their
    observations. Returns (traj, episode) with traj leaves [B, T] (T = horizon):
      e f32 [B, T, D]        residual at layer l (the policy's input; before the edit)
      z f32 [B, T, n_z]      code in force at t (new where decision)
      logp f32 [B, T]        log π of z at decisions (0 elsewhere)
      decision bool [B, T]   the agent chose a new code at t (t = 0, or β_t >= threshold)
      beta f32 [B, T], reward f32 [B, T], valid bool [B, T]
      action int32 [B, T] (discrete) or f32 [B, T, A] (continuous)
      obs f32 [B, T, obs_dim] (only with record_obs)
    and episode leaves [B]: success bool, return f32, decisions f32, length int32.
    """
    n = obs.shape[0]
    h_switch, z0 = metacontroller.initial_state(n)
    carry0 = (
        states,
        obs,
        base.init_caches(n, horizon),
        h_switch,
        z0,
        policy.initial_carry(n),
        jnp.int32(0),
    )

    def body(carry, k):
        states, obs, caches, h_switch, z, h_pi, t = carry
        k_z, k_a = jax.random.split(k)
        alive = ~states.done
        e, caches = base.lower_step(obs, caches, layer)
        beta, h_switch = metacontroller.switch_step(e, h_switch, z)
        decision = alive & ((beta >= beta_threshold) | (t == 0))  # first code at t = 1 (Alg. 2)
        h_new, mean, log_std = policy.step(h_pi, e)
        z_new = mean + jnp.exp(log_std) * jax.random.normal(k_z, mean.shape)
        logp = jnp.where(decision, gaussian_log_prob(z_new, mean, log_std), 0.0)
        z = jnp.where(decision[:, None], z_new, z)
        h_pi = jnp.where(decision[:, None], h_new, h_pi)
        head, caches = base.upper_step(metacontroller.control(e, z), caches, layer)
        action = base.sample_action(k_a, head)
        states, next_obs, reward, _, _ = jax.vmap(env.step)(states, action)
        out = dict(
            e=e,
            z=z,
            logp=logp,
            decision=decision,
            beta=beta,
            action=action,
            reward=reward,
            valid=alive,
        )
        if record_obs:
            out["obs"] = obs
        return (states, next_obs, caches, h_switch, z, h_pi, t + 1), out

    (final, *_), traj = jax.lax.scan(body, carry0, jax.random.split(key, horizon))
    traj = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)
    return traj, _episode_stats(final, traj)


def raw_rollout(
    env, base: PolicyModel, key: jax.Array, tasks: jax.Array, *, horizon: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Reset B envs on tasks int32 [B, K], then `raw_episodes`."""
    k_reset, k_run = jax.random.split(key)
    states, obs = _reset(env, k_reset, tasks)
    return raw_episodes(env, base, states, obs, k_run, horizon=horizon)


def raw_episodes(
    env, base: PolicyModel, states: Any, obs: jax.Array, key: jax.Array, *, horizon: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """B episodes sampling the base model's own actions (cached decoding), from reset
    states / obs f32 [B, obs_dim] as in `internal_episodes`.

    Returns (traj, episode) as `internal_episodes` with traj: obs f32 [B, T, obs_dim],
    action (int32 [B, T] or f32 [B, T, A]), logp f32 (log p_θ(a_t | o_1:t)), decision
    (= valid) bool, reward f32, valid bool, all [B, T].
    """
    n = obs.shape[0]

    def body(carry, k):
        states, obs, caches = carry
        alive = ~states.done
        out, caches = base.decode_step(obs, caches, return_residuals=False)
        head = base.policy_head(out)
        action = base.sample_action(k, head)
        logp = base.action_log_prob(head, action)
        states, next_obs, reward, _, _ = jax.vmap(env.step)(states, action)
        rec = dict(
            obs=obs,
            action=action,
            logp=jnp.where(alive, logp, 0.0),
            decision=alive,
            reward=reward,
            valid=alive,
        )
        return (states, next_obs, caches), rec

    (final, _, _), traj = jax.lax.scan(
        body, (states, obs, base.init_caches(n, horizon)), jax.random.split(key, horizon)
    )
    traj = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)
    return traj, _episode_stats(final, traj)


def _episode_stats(final_states, traj) -> dict[str, jax.Array]:
    return dict(
        success=final_states.success,
        ret=jnp.sum(traj["reward"], axis=1),
        decisions=jnp.sum(traj["decision"], axis=1).astype(jnp.float32),
        length=jnp.sum(traj["valid"], axis=1).astype(jnp.int32),
    )


def raw_log_probs(
    base: PolicyModel, obs: jax.Array, action: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Full causal forward: obs f32 [B, T, obs_dim], action [B, T] (int32) or [B, T, A]
    (f32) -> (log p_θ(a_t | o_1:t) f32 [B, T], entropy f32 [B, T] or [])."""
    return base.action_log_probs(obs, action)


# ---------------------------------------------------------------------------------------
# PPO core
# ---------------------------------------------------------------------------------------

# logp_fn(params, static, batch) -> (logp f32 [b, T], entropy f32 [b, T] or [])
LogpFn = Callable[[Any, Any, dict], tuple[jax.Array, jax.Array]]
# rollout_fn(params, static, key) -> (batch dict with logp, decision, ...; episode dict)
RolloutFn = Callable[[Any, Any, jax.Array], tuple[dict, dict]]


def make_ppo_update(cfg: RLConfig, tx: optax.GradientTransformation, logp_fn: LogpFn):
    """ppo(params, opt_state, static, batch, adv f32 [B], key) -> (params, opt_state, metrics).

    batch: leaves with leading axis B, at least logp (old, f32 [B, T]) and decision
    (bool [B, T]) plus whatever logp_fn reads. cfg.epochs passes over cfg.minibatches
    shuffled episode minibatches. Metrics (f32 scalars): loss (mean over minibatch steps),
    loss_first (on-policy surrogate of the first step), grad_norm, approx_kl, clip_frac.
    """

    def loss_fn(params, static, mbatch, madv):
        logp, ent = logp_fn(params, static, mbatch)
        loss, aux = clipped_surrogate(logp, mbatch["logp"], madv, mbatch["decision"], cfg.clip_eps)
        if cfg.entropy_coef:
            m = mbatch["decision"].astype(jnp.float32)
            ent = jnp.broadcast_to(ent, m.shape)
            loss = loss - cfg.entropy_coef * jnp.sum(ent * m) / m.shape[0]
        return loss, aux

    def ppo(params, opt_state, static, batch, adv, key):
        b = adv.shape[0]
        size = b // cfg.minibatches

        def minibatch_step(carry, idx):
            params, opt_state = carry
            mbatch = jax.tree.map(lambda x: x[idx], batch)
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, static, mbatch, adv[idx]
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), dict(loss=loss, grad_norm=optax.tree.norm(grads), **aux)

        def epoch(carry, k):
            perm = jax.random.permutation(k, b).reshape(cfg.minibatches, size)
            return jax.lax.scan(minibatch_step, carry, perm)

        (params, opt_state), ms = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(key, cfg.epochs)
        )
        metrics = {k: jnp.mean(v) for k, v in ms.items()}
        metrics["loss_first"] = ms["loss"][0, 0]
        return params, opt_state, metrics

    return ppo


def make_train_chunk(
    cfg: RLConfig, tx: optax.GradientTransformation, rollout_fn: RolloutFn, logp_fn: LogpFn
):
    """Jitted chunk(params, opt_state, static, keys [K]) -> ((params, opt_state), metrics
    with leaves [K]): K updates, each = one batch of fresh episodes + PPO on it.
    params and opt_state are donated."""
    ppo = make_ppo_update(cfg, tx, logp_fn)

    def chunk(params, opt_state, static, keys):
        def update(carry, key):
            params, opt_state = carry
            k_roll, k_ppo = jax.random.split(key)
            batch, ep = rollout_fn(params, static, k_roll)
            adv = trajectory_advantages(ep["ret"], cfg.adv_eps)
            params, opt_state, metrics = ppo(params, opt_state, static, batch, adv, k_ppo)
            metrics.update(
                success_rate=jnp.mean(ep["success"].astype(jnp.float32)),
                decisions_per_episode=jnp.mean(ep["decisions"]),
                mean_return=jnp.mean(ep["ret"]),
                episode_length=jnp.mean(ep["length"].astype(jnp.float32)),
                nonzero_advantage=jnp.mean((adv != 0).astype(jnp.float32)),
            )
            return (params, opt_state), metrics

        return jax.lax.scan(update, (params, opt_state), keys)

    return jax.jit(chunk, donate_argnums=(0, 1))


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------


def _tasks(task, batch: int) -> jax.Array:
    task = np.asarray(task, np.int32)
    if task.ndim == 2 and task.shape[0] == 1:
        task = task[0]
    if task.ndim != 1:
        raise ValueError(f"task: expected one padded task int32 [K], got shape {task.shape}")
    return jnp.broadcast_to(jnp.asarray(task), (batch, task.shape[0]))


def _task_key(tasks: jax.Array) -> tuple:
    host = np.asarray(tasks)
    return host.shape, host.tobytes()


def _horizon(cfg: RLConfig, env) -> int:
    return int(cfg.horizon or env.horizon)


def _check_env(env, base: PolicyModel) -> None:
    if env.obs_dim != base.cfg.obs_dim:
        raise ValueError(f"env.obs_dim={env.obs_dim} but base.cfg.obs_dim={base.cfg.obs_dim}")
    if isinstance(base, HawkModel):
        if env.action_shape != (base.cfg.action_dim,):
            raise ValueError(
                f"env.action_shape={env.action_shape} but the Gaussian base model "
                f"acts in {base.cfg.action_dim} dimensions"
            )
    elif getattr(env, "num_actions", None) != base.cfg.num_actions:
        raise ValueError(
            f"env.num_actions={getattr(env, 'num_actions', None)} but "
            f"base.cfg.num_actions={base.cfg.num_actions}"
        )


class RLProgram(NamedTuple):
    """The pieces of one RL run, before compilation.

    rollout_fn(params, static, key) -> (batch, episode); logp_fn(params, static, batch) ->
    (logp, entropy); params: the trained nnx.State; static: the frozen rest (an argument of
    the compiled call, not a constant); graphdef: to rebuild the trained module with
    `nnx.merge(graphdef, params, ...)`; tx: the optimizer; key: hashable identity of
    what rollout_fn and logp_fn close over (graphs, env, task, layer, horizon), under which
    the compiled chunk is cached in `common.train.STEPS` (None: not cached).
    """

    rollout_fn: RolloutFn
    logp_fn: LogpFn
    params: Any
    static: Any
    graphdef: Any
    tx: optax.GradientTransformation
    key: Any = None


def _checkpointer(directory, name: str, cfg: RLConfig, seed: int) -> Checkpointer:
    # the budget and the logging period may change between invocations of one run
    config = dict(algorithm=name, seed=seed, rl=dataclasses.asdict(cfg))
    return Checkpointer(
        directory,
        max_to_keep=2,
        config=config,
        ignore_config_keys=["rl.episodes", "rl.updates_per_call", "rl.optim.total_steps"],
    )


def run_program(
    name: str,
    cfg: RLConfig,
    program: RLProgram,
    seed: int,
    log=print,
    checkpoint_dir: str | os.PathLike | None = None,
) -> RLResult:
    """Trains for cfg.num_updates updates in compiled chunks of cfg.updates_per_call
    (a shorter last chunk compiles once more); logs one line per chunk; raises
    FloatingPointError on a non-finite PPO loss.

    checkpoint_dir: save (params, optimizer state, metrics so far) after every chunk and
    resume from the latest checkpoint there. Update i uses `fold_in(key(seed), i)`, so a
    resumed run gives the same curve as an uninterrupted one.
    """
    t0 = time.perf_counter()

    def build():
        return make_train_chunk(cfg, program.tx, program.rollout_fn, program.logp_fn)

    # the episode budget and the chunk length do not change the compiled update
    shape = dataclasses.replace(cfg, episodes=cfg.batch_episodes, updates_per_call=1)
    chunk = (
        build()
        if program.key is None
        else STEPS.get(("internal_rl.rl_chunk", program.key, shape), build)
    )
    # the chunk donates its inputs: copy, so the program's (and a cloned base model's
    # shared) arrays stay valid for the caller
    params = jax.tree.map(jnp.copy, program.params)
    state = dict(params=params, opt_state=program.tx.init(params))
    history: dict[str, list[float]] = {}
    done, wall_before = 0, 0.0
    ckpt = None if checkpoint_dir is None else _checkpointer(checkpoint_dir, name, cfg, seed)
    if ckpt is not None and ckpt.latest_step() is not None:
        state, saved = ckpt.restore(state)
        done, history, wall_before = saved["updates"], saved["metrics"], saved["wall_seconds"]
        log(f"{name}: resumed at update {done} from {ckpt.directory}")
    key = jax.random.key(seed)
    total = cfg.num_updates
    try:
        while done < total:
            k = min(cfg.updates_per_call, total - done)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(done, done + k))
            (params, opt_state), metrics = chunk(
                state["params"], state["opt_state"], program.static, keys
            )
            state = dict(params=params, opt_state=opt_state)
            metrics = jax.tree.map(np.asarray, jax.device_get(metrics))
            if not np.all(np.isfinite(metrics["loss"])):
                raise FloatingPointError(
                    f"{name}: non-finite PPO loss in updates {done + 1}..{done + k}"
                )
            for m, v in metrics.items():
                history.setdefault(m, []).extend(float(x) for x in v)
            done += k
            if ckpt is not None:
                ckpt.save(
                    done,
                    state,
                    dict(
                        updates=done,
                        metrics=history,
                        wall_seconds=wall_before + time.perf_counter() - t0,
                    ),
                )
            log(
                f"{name}: update {done}/{total} episodes {done * cfg.batch_episodes} "
                f"success {metrics['success_rate'].mean():.3f} "
                f"decisions/ep {metrics['decisions_per_episode'].mean():.2f} "
                f"loss {metrics['loss'].mean():.4f} ({time.perf_counter() - t0:.0f}s)"
            )
    finally:
        if ckpt is not None:
            ckpt.close()
    metrics = {k: np.asarray(v[:total], np.float32) for k, v in history.items()}
    return RLResult(
        episodes=np.arange(1, total + 1, dtype=np.int64) * cfg.batch_episodes,
        success_rate=metrics["success_rate"],
        decisions_per_episode=metrics["decisions_per_episode"],
        wall_seconds=wall_before + time.perf_counter() - t0,
        metrics=metrics,
    )


def resolve_metacontroller(metacontroller, base: PolicyModel) -> tuple[Metacontroller, int]:
    """(Metacontroller, insertion layer) from a Metacontroller or a MetacontrolledModel."""
    if isinstance(metacontroller, MetacontrolledModel):
        return metacontroller.metacontroller, metacontroller.layer
    if not isinstance(metacontroller, Metacontroller):
        raise TypeError(
            f"metacontroller: expected a Metacontroller or MetacontrolledModel, "
            f"got {type(metacontroller).__name__}"
        )
    if metacontroller.dim != base.cfg.dim:
        raise ValueError(
            f"metacontroller.dim={metacontroller.dim} but the base model's "
            f"residual width is {base.cfg.dim}"
        )
    return metacontroller, metacontroller.cfg.insertion_layer(base.cfg.depth)


def make_internal_rl(
    cfg: RLConfig, base: PolicyModel, metacontroller, env, task, seed: int = 0
) -> RLProgram:
    """The internal-RL program: params are a fresh `LatentPolicy`'s (seeded by `seed`);
    the base model and metacontroller are frozen in `static`."""
    _check_env(env, base)
    mc, layer = resolve_metacontroller(metacontroller, base)
    horizon = _horizon(cfg, env)
    tasks = _tasks(task, cfg.batch_episodes)
    policy = LatentPolicy(base.cfg.dim, mc.cfg.n_z, cfg.policy_width, rngs=nnx.Rngs(seed))
    p_graph, params, p_rest = nnx.split(policy, nnx.Param, ...)
    e_graph, e_state = nnx.split((base, mc))

    def rollout_fn(params, static, key):
        (b, m), pol = nnx.merge(e_graph, static[0]), nnx.merge(p_graph, params, static[1])
        traj, ep = internal_rollout(
            env,
            b,
            m,
            pol,
            key,
            tasks,
            layer=layer,
            horizon=horizon,
            beta_threshold=cfg.beta_threshold,
        )
        return {k: traj[k] for k in ("e", "z", "logp", "decision")}, ep

    def logp_fn(params, static, batch):
        pol = nnx.merge(p_graph, params, static[1])
        return pol.log_probs(batch["e"], batch["z"], batch["decision"]), pol.entropy()

    key = ("internal", e_graph, p_graph, env, _task_key(tasks), layer, horizon, cfg.beta_threshold)
    return RLProgram(rollout_fn, logp_fn, params, (e_state, p_rest), p_graph, cfg.optimizer(), key)


def run_internal_rl(
    cfg: RLConfig,
    base: PolicyModel,
    metacontroller,
    env,
    task: np.ndarray,
    seed: int,
    *,
    log=print,
    checkpoint_dir: str | os.PathLike | None = None,
) -> RLResult:
    """Internal RL (Alg. 3) on the held-out `task` (int32 [K], -1 padded) for cfg.episodes.

    metacontroller: a trained `Metacontroller` bound to `base` (insertion layer from its
    config: `cfg.insertion_layer(base.cfg.depth)`), or a `MetacontrolledModel` (its layer).
    The β ≡ 1 and co-trained variants are just other metacontrollers. checkpoint_dir: see
    `run_program` (resume a run interrupted between chunks).
    """
    program = make_internal_rl(cfg, base, metacontroller, env, task, seed)
    return run_program("internal RL", cfg, program, seed, log, checkpoint_dir)


def raw_trainable_filter(cfg: RLConfig):
    """nnx filter of the base-model parameters raw-action RL trains."""
    if cfg.raw_trainable == "action_head":
        return nnx.All(nnx.Param, nnx.PathContains("action_head"))
    return nnx.Param


def make_raw_action_rl(cfg: RLConfig, base: PolicyModel, env, task) -> RLProgram:
    """The raw-action RL program: params are the `raw_trainable` parameters of `base`
    (`run_program` trains copies; the caller's module is not changed)."""
    _check_env(env, base)
    horizon = _horizon(cfg, env)
    tasks = _tasks(task, cfg.batch_episodes)
    graph, params, rest = nnx.split(base, raw_trainable_filter(cfg), ...)

    def rollout_fn(params, static, key):
        traj, ep = raw_rollout(env, nnx.merge(graph, params, static), key, tasks, horizon=horizon)
        return {k: traj[k] for k in ("obs", "action", "logp", "decision")}, ep

    def logp_fn(params, static, batch):
        return raw_log_probs(nnx.merge(graph, params, static), batch["obs"], batch["action"])

    key = ("raw", graph, env, _task_key(tasks), horizon)
    return RLProgram(rollout_fn, logp_fn, params, rest, graph, cfg.optimizer(), key)


def run_raw_action_rl(
    cfg: RLConfig,
    base: PolicyModel,
    env,
    task: np.ndarray,
    seed: int,
    *,
    log=print,
    checkpoint_dir: str | os.PathLike | None = None,
) -> RLResult:
    """Raw-action RL baseline (App. C.5.3): PPO on the base model's token policy, one
    decision per raw step; trains cfg.raw_trainable parameters of a copy of `base`.
    checkpoint_dir: see `run_program`."""
    program = make_raw_action_rl(cfg, base, env, task)
    return run_program("raw-action RL", cfg, program, seed, log, checkpoint_dir)
