"""The Ant-pinpad expert: PPO in MJX told the grid-level BFS plan (internal RL App. C.1.1;
docs/internal_rl.md D10).

**Observation** (f32 [41 + 64]): AntPinpad's observation followed by, for each of the 16
cells (cell id order), a 4-d one-hot of the cardinal move (the order of
`gridworld.neighbour_table`: -y, +x, +y, -x in the world frame) that leads one step closer
to the current target colour on the grid-level shortest path (`plan_features`); a cell
gets all zeros where no move is defined (the target itself, the wall, cells cut off from
the target). This is the paper's 16 x 4 plan, and the per-cell map is kept rather than the
cheaper 4-d direction at the ant's cell (`plan_obs="cell"` selects that variant): the map
tells the policy where the path turns *next*, so it can start the turn before it crosses
into the next cell, which a 4-d feature cannot; the 64 extra inputs cost one gather per
step, nothing beside the MJX physics. The direction out of a cell is the move to the
neighbour with the smallest BFS distance (ties: the first move), exactly the neighbour
`point_expert.next_cell` picks, and it is also defined in the colour cell just visited
(blocked in the BFS map, but the ant stands there after a visit).

**Reward** (`shaped_reward`, per env step; choice): velocity_coef · (v · d) with v the
torso's planar velocity over the step (displacement / dt, m/s) and d the unit world
vector of the planned move at the ant's cell before the step (0 where none) — the
paper's intrinsic term; + subgoal_bonus for every correct colour visit; + success_bonus ·
the task reward (1 on success); − failure_penalty when the episode ends by a wall, a
wrong colour, leaving the arena or the torso height (under N(0, 0.6²) random torques
half the episodes end within ~20 steps; this is its reason to stay up, and unlike a per-step alive bonus it does not
pay the agent for *not* finishing the task); − ctrl_cost · |a|² (small: at 0.05 the control
cost of ~100 more steps of standing, ≈ 0.06 per step, exceeds the penalty discounted by
0.99^100, so nothing taught the agent to stay up; a 1M-step CPU run at 0.05 gained
no return); + alive_bonus (0 by default, for the same reason). Termination as the env
(wall, wrong colour, out of arena, torso height, success, horizon); at the horizon the
episode is truncated, not terminated, so its last reward is bootstrapped with
γ·V(final observation). Known loophole of a per-cell direction field: moving orthogonally
back into a cell whose direction points forward again can earn intrinsic reward in a loop
(not guarded against; the visit bonuses are the counterweight).

**PPO** (standard actor-critic, unlike the critic-free internal RL of `rl.py`; purejaxrl
layout): Gaussian policy MLP (tanh) with a state-independent log-std, a separate value MLP,
observations normalised by running mean / variance (updated after each PPO update from
that update's rollout, so the rollout and its PPO epochs see the same statistics),
`num_envs` envs stepped by one `lax.scan` of `rollout_len` steps, GAE(γ, λ), `epochs` passes
over `minibatches` shuffled minibatches, clipped policy and value losses, entropy bonus.
Finished envs restart from a reset state drawn at the start of the rollout (an env that
finishes twice in one rollout restarts from the same state). Each env's task is drawn
uniformly from the pretraining tasks (Table A2; `train_tasks="all"` adds 0-1-2-3): the
expert reads its target from the plan, so the held-out task is only a new order of legs.

**Runs**: `train_ant_expert(cfg, run_dir)` runs `updates_per_call` updates per compiled
call and saves (params, optimizer, obs normaliser, env states, RNG, update count and the
metric history) atomically with `common.checkpoint.Checkpointer` after every call; calling
it again resumes from the latest checkpoint and reproduces the uninterrupted run bit for
bit. `evaluate_expert` gives the success rate of the mean action on the pretraining tasks
and the held-out task; `expert_policy` is the `envs.base.rollout` policy for the data
generator (sampled actions for D, the mean for D*).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common.checkpoint import Checkpointer
from common.config import add_config_args, config_from_args, from_json, require
from common.metrics import MetricsWriter
from common.nn import dense
from common.rng import stream_key
from common.train import STEPS, OptimizerConfig
from internal_rl.envs.ant_pinpad import AntPinpad
from internal_rl.envs.base import PolicyFn, batch_rollout
from internal_rl.envs.gridworld import INF, GridState, neighbour_table
from internal_rl.envs.pinpad_layout import ContinuousState, next_colour, post_task, pretrain_tasks
from internal_rl.rl import gaussian_log_prob

TASK_LEN = 4  # every task padded to the held-out task's length: one compiled shape
PLAN_OBS = ("grid", "cell")
TRAIN_TASKS = ("pretrain", "all")
_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class AntExpertConfig:
    """Environment, reward and PPO settings of the Ant expert (module docstring)."""

    seed: int = 0
    # environment
    horizon: int = 500  # T (internal RL App. A.2)
    train_tasks: str = "pretrain"  # "pretrain" (Table A2) | "all" (+ the held-out task)
    plan_obs: str = "grid"  # "grid": 16 x 4 plan one-hots | "cell": the ant's cell only
    # reward
    velocity_coef: float = 1.0
    subgoal_bonus: float = 10.0
    success_bonus: float = 10.0
    failure_penalty: float = 10.0
    ctrl_cost: float = 0.005  # small: see the module docstring
    alive_bonus: float = 0.0
    # PPO
    num_envs: int = 2048
    rollout_len: int = 32
    total_env_steps: int = 100_000_000
    epochs: int = 4
    minibatches: int = 32
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 3e-4  # Table A3
    # Table A3: AdamW (0.9, 0.999) at a constant 3e-4; weight decay 0 (Table A3 prints 0.03,
    # likely copied from the model table); total_steps counts PPO updates
    optim: OptimizerConfig = OptimizerConfig(
        name="adamw",
        learning_rate=3e-4,
        schedule="constant",
        weight_decay=0.0,
        total_steps=100_000_000 // (2048 * 32),
        grad_clip_norm=0.5,
    )
    hidden: tuple[int, ...] = (256, 256)
    log_std_init: float = -1.0  # std 0.37: wider random torques flip the ant at once
    obs_clip: float = 10.0
    updates_per_call: int = 10  # updates scanned in one compiled call (= save period)
    eval_episodes: int = 8  # per task in evaluate_expert

    def __post_init__(self):
        req = functools.partial(require, self)
        for name in (
            "horizon",
            "num_envs",
            "rollout_len",
            "epochs",
            "minibatches",
            "updates_per_call",
            "eval_episodes",
        ):
            req(name, getattr(self, name) >= 1, ">= 1")
        req("train_tasks", self.train_tasks in TRAIN_TASKS, f"one of {TRAIN_TASKS}")
        req("plan_obs", self.plan_obs in PLAN_OBS, f"one of {PLAN_OBS}")
        req(
            "minibatches",
            (self.num_envs * self.rollout_len) % self.minibatches == 0,
            f"a divisor of num_envs * rollout_len ({self.num_envs * self.rollout_len})",
        )
        req(
            "total_env_steps",
            self.total_env_steps >= self.num_envs * self.rollout_len,
            f">= num_envs * rollout_len ({self.num_envs * self.rollout_len})",
        )
        req("gamma", 0.0 < self.gamma <= 1.0, "in (0, 1]")
        req("gae_lambda", 0.0 <= self.gae_lambda <= 1.0, "in [0, 1]")
        req("clip_eps", 0.0 < self.clip_eps < 1.0, "in (0, 1)")
        for name in ("vf_coef", "entropy_coef", "ctrl_cost", "failure_penalty"):
            req(name, getattr(self, name) >= 0, ">= 0")
        req(
            "hidden",
            bool(self.hidden) and min(self.hidden) >= 1,
            "a non-empty tuple of widths >= 1",
        )
        req("obs_clip", self.obs_clip > 0, "> 0")

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.rollout_len

    @property
    def num_updates(self) -> int:
        return self.total_env_steps // self.steps_per_update

    def optimizer(self) -> optax.GradientTransformation:
        """The optax optimizer of `optim`, one object per config (`common.train.STEPS`)."""
        return STEPS.optimizer(self.optim)


_OPTIM = AntExpertConfig().optim
ANT_EXPERT_PRESETS = {
    # test scale: 4 envs x 16 steps per update, 2 x 2 minibatch steps, small nets
    "tiny": lambda: AntExpertConfig(
        num_envs=4,
        rollout_len=16,
        total_env_steps=4 * 16 * 8,
        epochs=2,
        minibatches=2,
        hidden=(32, 32),
        optim=dataclasses.replace(_OPTIM, total_steps=8),
        updates_per_call=1,
        eval_episodes=1,
    ),
    # a CPU run of hours: 64 envs x 32 steps per update, 10M env steps
    "small": lambda: AntExpertConfig(
        num_envs=64,
        rollout_len=32,
        total_env_steps=10_000_000,
        epochs=4,
        minibatches=4,
        hidden=(64, 64),
        optim=dataclasses.replace(_OPTIM, total_steps=4882),
        updates_per_call=10,
    ),
    # GPU: 2048 envs x 32 steps per update, 1e8 env steps (~1500 updates)
    "paper": AntExpertConfig,
}


# ---------------------------------------------------------------------------------------
# The plan the expert is told
# ---------------------------------------------------------------------------------------


@functools.cache
def move_vectors(size: int) -> np.ndarray:
    """f32 [4, 2]: world-frame unit vector of each move of `neighbour_table(size)`
    (cells: col along +x, row along +y)."""
    table = neighbour_table(size)
    cells = np.arange(size * size)
    out = np.zeros((4, 2), np.float32)
    for k in range(4):
        moved = table[:, k] != cells
        d = np.stack(
            [
                table[moved, k] % size - cells[moved] % size,
                table[moved, k] // size - cells[moved] // size,
            ],
            -1,
        )
        out[k] = d[0]
    return out


def plan_directions(size: int, pad: GridState) -> jax.Array:
    """int32 [G²]: per cell, the move (0..3) one step closer to the current target colour
    on a grid shortest path, -1 at the target, at walls and where the target is cut off."""
    n = size * size
    target = next_colour(pad)
    dist = pad.dist[target]  # [n]
    nbr_dist = dist[jnp.asarray(neighbour_table(size))]  # [n, 4]
    best = jnp.argmin(nbr_dist, axis=-1).astype(jnp.int32)
    cells = jnp.arange(n)
    defined = (
        (jnp.min(nbr_dist, axis=-1) < INF)
        & (cells != pad.colours[target])
        & ~jnp.any(cells[:, None] == pad.walls[None], axis=-1)
    )
    return jnp.where(defined, best, -1)


def plan_features(size: int, pad: GridState) -> jax.Array:
    """f32 [G² * 4]: the one-hot of `plan_directions` per cell (zeros where -1)."""
    return jax.nn.one_hot(plan_directions(size, pad), 4, dtype=jnp.float32).reshape(-1)


def plan_vector(size: int, pad: GridState) -> jax.Array:
    """f32 [2]: world unit vector of the planned move at the ant's cell (0 where none)."""
    k = plan_directions(size, pad)[pad.agent]
    return jnp.where(k >= 0, jnp.asarray(move_vectors(size))[jnp.maximum(k, 0)], 0.0)


def plan_obs_dim(cfg: AntExpertConfig, env: AntPinpad) -> int:
    return 4 * env.grid.size**2 if cfg.plan_obs == "grid" else 4


def expert_obs_dim(cfg: AntExpertConfig, env: AntPinpad) -> int:
    return env.obs_dim + plan_obs_dim(cfg, env)


def expert_observation(
    cfg: AntExpertConfig, env: AntPinpad, state: ContinuousState, obs: jax.Array
) -> jax.Array:
    """The env observation f32 [obs_dim] of `state` + its plan -> f32 [expert_obs_dim]."""
    size = env.grid.size
    if cfg.plan_obs == "grid":
        plan = plan_features(size, state.pad)
    else:
        k = plan_directions(size, state.pad)[state.pad.agent]
        plan = jax.nn.one_hot(k, 4, dtype=jnp.float32)
    return jnp.concatenate([obs, plan])


def intrinsic_reward(env: AntPinpad, prev: ContinuousState, new: ContinuousState) -> jax.Array:
    """f32 []: v · d, the torso's planar velocity over the step (m/s) along the planned move
    at its cell before the step."""
    v = (new.data.qpos[:2] - prev.data.qpos[:2]) / env.dt
    return jnp.dot(v, plan_vector(env.grid.size, prev.pad))


def shaped_reward(
    cfg: AntExpertConfig,
    env: AntPinpad,
    prev: ContinuousState,
    new: ContinuousState,
    action: jax.Array,
    task_reward: jax.Array,
    info: dict,
) -> jax.Array:
    """f32 []: the expert's training reward for one env step (module docstring)."""
    a = jnp.clip(action, -1.0, 1.0)
    failed = info["wrong_colour"] | info["wall"] | info["out_of_arena"] | info["failure"]
    return (
        cfg.velocity_coef * intrinsic_reward(env, prev, new)
        + cfg.subgoal_bonus * info["colour_visited"].astype(jnp.float32)
        + cfg.success_bonus * task_reward
        - cfg.failure_penalty * failed.astype(jnp.float32)
        - cfg.ctrl_cost * jnp.sum(jnp.square(a))
        + cfg.alive_bonus
    )


# ---------------------------------------------------------------------------------------
# Pure PPO pieces
# ---------------------------------------------------------------------------------------


class ObsNorm(NamedTuple):
    """Running observation statistics: mean f32 [D], var f32 [D], count f32 []."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_obs_norm(dim: int) -> ObsNorm:
    """Identity normaliser (count 0: the first update takes the batch statistics)."""
    return ObsNorm(
        jnp.zeros(dim, jnp.float32), jnp.ones(dim, jnp.float32), jnp.zeros((), jnp.float32)
    )


def update_obs_norm(norm: ObsNorm, x: jax.Array) -> ObsNorm:
    """Merge a batch x f32 [N, D] into the statistics (parallel-variance formula)."""
    n = jnp.float32(x.shape[0])
    b_mean = jnp.mean(x, axis=0)
    b_var = jnp.mean(jnp.square(x - b_mean), axis=0)
    total = norm.count + n
    delta = b_mean - norm.mean
    mean = norm.mean + delta * n / total
    m2 = norm.var * norm.count + b_var * n + jnp.square(delta) * norm.count * n / total
    return ObsNorm(mean, m2 / total, total)


def normalise(norm: ObsNorm, x: jax.Array, clip: float = 10.0) -> jax.Array:
    """f32 [..., D] -> clip((x - mean) / sqrt(var + 1e-8), ±clip)."""
    return jnp.clip((x - norm.mean) * jax.lax.rsqrt(norm.var + 1e-8), -clip, clip)


def gae(
    reward: jax.Array,
    value: jax.Array,
    done: jax.Array,
    last_value: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a rollout.

    reward, value f32 [T, B], done bool [T, B] (the episode ended at step t: no bootstrap
    across it), last_value f32 [B] = V(obs after step T-1). Returns (advantages, returns =
    advantages + value), both f32 [T, B].
    """

    def body(carry, xs):
        adv_next, v_next = carry
        r, v, d = xs
        keep = 1.0 - d.astype(jnp.float32)
        delta = r + gamma * v_next * keep - v
        adv = delta + gamma * lam * keep * adv_next
        return (adv, v), adv

    _, adv = jax.lax.scan(
        body, (jnp.zeros_like(last_value), last_value), (reward, value, done), reverse=True
    )
    return adv, adv + value


class ActorCritic(nnx.Module):
    """Gaussian policy MLP (state-independent log-std) and a separate value MLP, tanh.

    Orthogonal init (gain √2 hidden, 0.01 for the action mean, 1 for the value), zero biases.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: tuple[int, ...],
        log_std_init: float = -1.0,
        *,
        rngs: nnx.Rngs,
    ):
        def mlp(out: int, out_gain: float) -> nnx.Sequential:
            layers, width = [], obs_dim
            for h in hidden:
                layers += [
                    dense(
                        width, h, kernel_init=nnx.initializers.orthogonal(math.sqrt(2)), rngs=rngs
                    ),
                    jnp.tanh,
                ]
                width = h
            layers.append(
                dense(width, out, kernel_init=nnx.initializers.orthogonal(out_gain), rngs=rngs)
            )
            return nnx.Sequential(*layers)

        self.actor = mlp(action_dim, 0.01)
        self.critic = mlp(1, 1.0)
        self.log_std = nnx.Param(jnp.full((action_dim,), log_std_init, jnp.float32))

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """obs f32 [..., D] (normalised) -> (mean [..., A], log_std [A], value [...])."""
        return self.actor(obs), self.log_std[...], self.value(obs)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic(obs)[..., 0]


def make_model(cfg: AntExpertConfig, obs_dim: int, action_dim: int, seed: int) -> ActorCritic:
    return ActorCritic(
        obs_dim, action_dim, tuple(cfg.hidden), cfg.log_std_init, rngs=nnx.Rngs(seed)
    )


def ppo_loss(
    cfg: AntExpertConfig, graphdef: nnx.GraphDef, params: nnx.State, batch: dict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO loss on a minibatch (to minimise).

    batch: obs f32 [N, D] (normalised), action f32 [N, A], logp f32 [N] (behaviour),
    value f32 [N] (behaviour), adv f32 [N], ret f32 [N]. Advantages are normalised over
    the minibatch. loss = policy + vf_coef · value − entropy_coef · entropy, with the
    value loss clipped around the behaviour value (purejaxrl).
    """
    model = nnx.merge(graphdef, params)
    mean, log_std, value = model(batch["obs"])
    logp = gaussian_log_prob(batch["action"], mean, log_std)
    adv = batch["adv"]
    adv = (adv - jnp.mean(adv)) / (jnp.std(adv) + 1e-8)
    log_ratio = logp - batch["logp"]
    ratio = jnp.exp(log_ratio)
    policy = -jnp.mean(
        jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv)
    )
    v_clipped = batch["value"] + jnp.clip(value - batch["value"], -cfg.clip_eps, cfg.clip_eps)
    value_loss = 0.5 * jnp.mean(
        jnp.maximum(jnp.square(value - batch["ret"]), jnp.square(v_clipped - batch["ret"]))
    )
    entropy = jnp.sum(log_std + 0.5 * (_LOG_2PI + 1.0))
    loss = policy + cfg.vf_coef * value_loss - cfg.entropy_coef * entropy
    aux = dict(
        policy_loss=policy,
        value_loss=value_loss,
        entropy=entropy,
        approx_kl=jnp.mean((ratio - 1.0) - log_ratio),
        clip_frac=jnp.mean((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32)),
    )
    return loss, aux


def make_ppo_update(cfg: AntExpertConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """ppo(params, opt_state, batch, key) -> (params, opt_state, metrics): cfg.epochs passes
    over cfg.minibatches shuffled minibatches of the flat batch (leaves [N, ...], keys of
    `ppo_loss`). Metrics: means over all minibatch steps of the loss and its parts, plus
    grad_norm and loss_first (the on-policy loss of the first minibatch)."""

    def minibatch_step(carry, mbatch):
        params, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(
            lambda p: ppo_loss(cfg, graphdef, p, mbatch), has_aux=True
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), dict(loss=loss, grad_norm=optax.tree.norm(grads), **aux)

    def ppo(params, opt_state, batch, key):
        n = batch["adv"].shape[0]
        size = n // cfg.minibatches

        def epoch(carry, k):
            perm = jax.random.permutation(k, n).reshape(cfg.minibatches, size)
            mbatches = jax.tree.map(lambda x: x[perm], batch)
            return jax.lax.scan(minibatch_step, carry, mbatches)

        (params, opt_state), ms = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(key, cfg.epochs)
        )
        metrics = {k: jnp.mean(v) for k, v in ms.items()}
        metrics["loss_first"] = ms["loss"][0, 0]
        return params, opt_state, metrics

    return ppo


# ---------------------------------------------------------------------------------------
# Vectorised rollouts and the training update
# ---------------------------------------------------------------------------------------


def task_table(cfg: AntExpertConfig) -> np.ndarray:
    """int32 [N, TASK_LEN]: the tasks envs are reset on during training."""
    tasks = pretrain_tasks(TASK_LEN)
    if cfg.train_tasks == "all":
        tasks = np.concatenate([tasks, post_task(TASK_LEN)[None]])
    return tasks


def eval_tasks() -> np.ndarray:
    """int32 [17, TASK_LEN]: the 16 pretraining tasks then the held-out task 0-1-2-3."""
    return np.concatenate([pretrain_tasks(TASK_LEN), post_task(TASK_LEN)[None]])


def _where(mask: jax.Array, a: Any, b: Any) -> Any:
    """Per-env select between two batched pytrees (mask bool [B])."""
    return jax.tree.map(
        lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b
    )


class Runner(NamedTuple):
    """Envs in flight: env states (leading axis B), their expert observations f32 [B, D],
    and the running shaped return f32 [B] and length int32 [B] of each episode."""

    env_state: Any
    obs: jax.Array
    ep_return: jax.Array
    ep_length: jax.Array


class ExpertParams(NamedTuple):
    """What the trained expert needs to act: the ActorCritic's nnx.State and the ObsNorm."""

    net: Any
    norm: ObsNorm


class Program(NamedTuple):
    """The compiled pieces for one config (built once per config and process)."""

    env: AntPinpad
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    init: Any  # jitted init(seed_key) -> train state
    chunk: Any  # jitted chunk(train state, num_updates static) -> (state, metrics [K])
    evaluate: Any  # jitted evaluate(net, norm, key, tasks [N, K]) -> (success [N], length [N])


def _reset_envs(cfg, env, key, n):
    k_task, k_reset = jax.random.split(key)
    tasks = jnp.asarray(task_table(cfg))
    tasks = tasks[jax.random.randint(k_task, (n,), 0, tasks.shape[0])]
    states, obs = jax.vmap(env.reset)(jax.random.split(k_reset, n), tasks)
    return states, jax.vmap(lambda s, o: expert_observation(cfg, env, s, o))(states, obs)


def _update_fn(cfg: AntExpertConfig, env: AntPinpad, graphdef, tx):
    """update(ts, key) -> (ts, metrics): one rollout of num_envs x rollout_len steps, GAE,
    the PPO epochs, then the observation statistics."""
    ppo = make_ppo_update(cfg, graphdef, tx)
    step_env = jax.vmap(env.step)
    observe = jax.vmap(lambda s, o: expert_observation(cfg, env, s, o))
    reward_fn = jax.vmap(lambda p, s, a, r, i: shaped_reward(cfg, env, p, s, a, r, i))

    def update(ts, key):
        k_spare, k_roll, k_ppo = jax.random.split(key, 3)
        model = nnx.merge(graphdef, ts["params"])
        norm = ts["norm"]
        spare_state, spare_obs = _reset_envs(cfg, env, k_spare, cfg.num_envs)

        def env_step(runner: Runner, k):
            obs_n = normalise(norm, runner.obs, cfg.obs_clip)
            mean, log_std, value = model(obs_n)
            action = mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
            logp = gaussian_log_prob(action, mean, log_std)
            state, env_obs, task_r, done, info = step_env(runner.env_state, action)
            obs = observe(state, env_obs)
            reward = reward_fn(runner.env_state, state, action, task_r, info)
            # truncation at the horizon: bootstrap from the final observation
            final_v = model.value(normalise(norm, obs, cfg.obs_clip))
            train_reward = reward + cfg.gamma * final_v * info["timeout"].astype(jnp.float32)
            ep_return = runner.ep_return + reward
            ep_length = runner.ep_length + 1
            out = dict(
                obs=runner.obs,
                action=action,
                logp=logp,
                value=value,
                reward=train_reward,
                done=done,
                success=info["success"],
                finished_return=jnp.where(done, ep_return, 0.0),
                finished_length=jnp.where(done, ep_length, 0),
                intrinsic=jax.vmap(lambda p, s: intrinsic_reward(env, p, s))(
                    runner.env_state, state
                ),
            )
            runner = Runner(
                _where(done, spare_state, state),
                jnp.where(done[:, None], spare_obs, obs),
                jnp.where(done, 0.0, ep_return),
                jnp.where(done, 0, ep_length),
            )
            return runner, out

        runner, traj = jax.lax.scan(
            env_step, ts["runner"], jax.random.split(k_roll, cfg.rollout_len)
        )
        last_value = model.value(normalise(norm, runner.obs, cfg.obs_clip))
        adv, ret = gae(
            traj["reward"], traj["value"], traj["done"], last_value, cfg.gamma, cfg.gae_lambda
        )
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
        batch = dict(
            obs=normalise(norm, flat(traj["obs"]), cfg.obs_clip),
            action=flat(traj["action"]),
            logp=flat(traj["logp"]),
            value=flat(traj["value"]),
            adv=flat(adv),
            ret=flat(ret),
        )
        params, opt_state, metrics = ppo(ts["params"], ts["opt_state"], batch, k_ppo)
        norm = update_obs_norm(norm, flat(traj["obs"]))
        episodes = jnp.sum(traj["done"]).astype(jnp.float32)
        per_ep = jnp.maximum(episodes, 1.0)
        metrics.update(
            episodes=episodes,
            success_rate=jnp.sum(traj["success"]) / per_ep,
            episode_return=jnp.sum(traj["finished_return"]) / per_ep,
            episode_length=jnp.sum(traj["finished_length"]) / per_ep,
            step_reward=jnp.mean(traj["reward"]),
            intrinsic=jnp.mean(traj["intrinsic"]),
            log_std=jnp.mean(nnx.merge(graphdef, params).log_std[...]),
        )
        ts = dict(
            params=params,
            opt_state=opt_state,
            norm=norm,
            runner=runner,
            rng=ts["rng"],
            updates=ts["updates"] + 1,
        )
        return ts, metrics

    return update


def build_program(cfg: AntExpertConfig) -> Program:
    """Env, model graph, optimizer and the jitted init / train-chunk / evaluation functions
    for `cfg` (cached in `common.train.STEPS`: one compile of each per config and process)."""
    return STEPS.get(("internal_rl.ant_expert", cfg), lambda: _build_program(cfg))


def _build_program(cfg: AntExpertConfig) -> Program:
    env = AntPinpad(horizon=cfg.horizon)
    obs_dim = expert_obs_dim(cfg, env)
    graphdef, _ = nnx.split(make_model(cfg, obs_dim, env.action_shape[0], 0))
    tx = cfg.optimizer()
    update = _update_fn(cfg, env, graphdef, tx)

    def init(key):
        k_env, k_rng = jax.random.split(key)
        _, params = nnx.split(make_model(cfg, obs_dim, env.action_shape[0], cfg.seed))
        states, obs = _reset_envs(cfg, env, k_env, cfg.num_envs)
        runner = Runner(
            states, obs, jnp.zeros(cfg.num_envs, jnp.float32), jnp.zeros(cfg.num_envs, jnp.int32)
        )
        return dict(
            params=params,
            opt_state=tx.init(params),
            norm=init_obs_norm(obs_dim),
            runner=runner,
            rng=jax.random.key_data(k_rng),
            updates=jnp.zeros((), jnp.int32),
        )

    def chunk(ts, num_updates):
        def body(ts, _):
            key, k = jax.random.split(jax.random.wrap_key_data(ts["rng"]))
            ts, metrics = update(dict(ts, rng=jax.random.key_data(key)), k)
            return ts, metrics

        return jax.lax.scan(body, ts, None, length=num_updates)

    def evaluate(net, norm, key, tasks):
        policy = expert_policy(cfg, ExpertParams(net, norm), noise=0.0, env=env, graphdef=graphdef)
        traj, final = batch_rollout(env, policy, key, tasks, cfg.horizon)
        return final.success, jnp.sum(traj["valid"], axis=1)

    return Program(
        env,
        graphdef,
        tx,
        jax.jit(init),
        jax.jit(chunk, static_argnums=1, donate_argnums=0),
        jax.jit(evaluate),
    )


# ---------------------------------------------------------------------------------------
# Acting, evaluation, training runs
# ---------------------------------------------------------------------------------------


def expert_policy(
    cfg: AntExpertConfig,
    params: ExpertParams,
    noise: bool | float | jax.Array = False,
    *,
    env: AntPinpad | None = None,
    graphdef: nnx.GraphDef | None = None,
) -> PolicyFn:
    """Policy for `envs.base.rollout`: (carry, key, obs f32 [41], state) -> (carry,
    action f32 [8] in [-1, 1]).

    noise: False / 0 = the Gaussian mean (data D*), True / 1 = a sample of the trained
    Gaussian (data D); a float (possibly traced) scales the policy's std. Build it inside
    the jitted function that rolls out, with `params` as an argument of that function, so
    new params do not recompile the rollout.
    """
    if isinstance(noise, (bool, int, float)) and float(noise) < 0:
        raise ValueError(f"noise: expected >= 0 (a std scale) or a bool, got {noise}")
    scale = jnp.float32(noise) if isinstance(noise, (bool, int, float)) else noise
    program = None if env is not None and graphdef is not None else build_program(cfg)
    env = env if env is not None else program.env
    graphdef = graphdef if graphdef is not None else program.graphdef

    def policy(carry, key, obs, state):
        model = nnx.merge(graphdef, params.net)
        x = normalise(params.norm, expert_observation(cfg, env, state, obs), cfg.obs_clip)
        mean, log_std, _ = model(x)
        action = mean + scale * jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return carry, jnp.clip(action, -1.0, 1.0)

    return policy


def evaluate_expert(
    cfg: AntExpertConfig,
    params: ExpertParams,
    key: jax.Array | None = None,
    tasks: np.ndarray | None = None,
    episodes_per_task: int | None = None,
) -> dict[str, Any]:
    """Success of the mean action over full episodes (cfg.horizon steps).

    tasks: int32 [N, TASK_LEN] (-1 padded); default `eval_tasks()` = the 16 pretraining
    tasks then 0-1-2-3. Returns {"per_task" f32 [N], "pretrain_success" (mean over the
    Table A2 tasks among `tasks`), "post_success" (the held-out task, NaN if absent),
    "mean_length" (steps per episode), "episodes"}.
    """
    tasks = eval_tasks() if tasks is None else np.asarray(tasks, np.int32)
    if tasks.ndim != 2 or tasks.shape[1] != TASK_LEN:
        raise ValueError(f"tasks: expected int32 [N, {TASK_LEN}], got shape {tasks.shape}")
    e = int(episodes_per_task or cfg.eval_episodes)
    key = stream_key(cfg.seed, "ant_expert", "eval") if key is None else key
    program = build_program(cfg)
    batch = jnp.asarray(np.repeat(tasks, e, axis=0))
    success, length = program.evaluate(params.net, params.norm, key, batch)
    per_task = np.asarray(success, np.float32).reshape(len(tasks), e).mean(1)
    post = post_task(TASK_LEN)
    is_post = np.all(tasks == post[None], axis=1)
    return dict(
        per_task=per_task,
        pretrain_success=float(per_task[~is_post].mean()) if (~is_post).any() else math.nan,
        post_success=float(per_task[is_post].mean()) if is_post.any() else math.nan,
        mean_length=float(np.mean(np.asarray(length))),
        episodes=int(len(tasks) * e),
    )


class AntExpertRun(NamedTuple):
    """A finished (or resumed-and-finished) training run: the expert's params, the metric
    history (name -> f32 [updates]), updates and env steps done, wall seconds (this
    process, compiles included) and the steady-state env steps/s of this process's chunks
    after the first (NaN if fewer than two)."""

    params: ExpertParams
    history: dict[str, np.ndarray]
    updates: int
    env_steps: int
    wall_seconds: float
    steps_per_second: float


def _ckpt_tree(ts: dict) -> dict:
    """The train state with the env states flattened to a list of arrays (orbax stores
    plain containers; the mjx.Data structure comes back from a freshly initialised state)."""
    runner = ts["runner"]
    # orbax refuses empty arrays (mjx.Data has some): they come back from `like` instead
    env = [x for x in jax.tree.leaves(runner.env_state) if x.size]
    return dict(
        ts,
        runner=dict(
            env=env, obs=runner.obs, ep_return=runner.ep_return, ep_length=runner.ep_length
        ),
    )


def _from_ckpt_tree(tree: dict, like: dict) -> dict:
    r = tree["runner"]
    saved = iter(r["env"])
    leaves, treedef = jax.tree.flatten(like["runner"].env_state)
    env_state = jax.tree.unflatten(treedef, [next(saved) if x.size else x for x in leaves])
    return dict(tree, runner=Runner(env_state, r["obs"], r["ep_return"], r["ep_length"]))


def _checkpointer(run_dir: pathlib.Path, cfg: AntExpertConfig) -> Checkpointer:
    return Checkpointer(
        run_dir / "checkpoints",
        max_to_keep=2,
        config=dict(ant_expert=dataclasses.asdict(cfg)),
        # the budget, the save period and the eval size may change on resume
        ignore_config_keys=[
            "ant_expert.total_env_steps",
            "ant_expert.updates_per_call",
            "ant_expert.eval_episodes",
        ],
    )


def train_ant_expert(
    cfg: AntExpertConfig, run_dir: str | os.PathLike, num_updates: int | None = None, log=print
) -> AntExpertRun:
    """Train (or resume) the expert in `run_dir` up to `num_updates` updates in total
    (default cfg.num_updates), saving after every chunk of cfg.updates_per_call updates.

    Resumes from the latest checkpoint in `run_dir/checkpoints` (a checkpoint of another
    config raises `CheckpointMismatchError`); metrics go to `run_dir/metrics.jsonl`, one
    line per update. Raises FloatingPointError on a non-finite PPO loss (the last good
    checkpoint is kept).
    """
    total = cfg.num_updates if num_updates is None else int(num_updates)
    if total < 0:
        raise ValueError(f"num_updates: expected >= 0, got {num_updates}")
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    program = build_program(cfg)
    ts = program.init(jax.random.key(cfg.seed))
    history: dict[str, list[float]] = {}
    ckpt = _checkpointer(run_dir, cfg)
    if ckpt.latest_step() is not None:
        tree, saved = ckpt.restore(_ckpt_tree(ts))
        ts, history = _from_ckpt_tree(tree, ts), saved["metrics"]
        log(f"ant expert: resumed at update {int(ts['updates'])} from {ckpt.directory}")
    done = int(ts["updates"])
    chunk_times: list[tuple[int, float]] = []
    try:
        with MetricsWriter(run_dir / "metrics.jsonl") as writer:
            while done < total:
                k = min(cfg.updates_per_call, total - done)
                t_chunk = time.perf_counter()
                ts, metrics = program.chunk(ts, k)
                metrics = jax.tree.map(np.asarray, jax.device_get(metrics))
                chunk_times.append((k, time.perf_counter() - t_chunk))
                if not np.all(np.isfinite(metrics["loss"])):
                    raise FloatingPointError(
                        f"ant expert: non-finite PPO loss in updates {done + 1}..{done + k}"
                    )
                for name, v in metrics.items():
                    history.setdefault(name, []).extend(float(x) for x in v)
                ckpt.save(done + k, _ckpt_tree(ts), dict(updates=done + k, metrics=history))
                for i in range(k):
                    writer.write(
                        done + i + 1,
                        dict(
                            env_steps=(done + i + 1) * cfg.steps_per_update,
                            **{m: v[i] for m, v in metrics.items()},
                        ),
                    )
                done += k
                log(
                    f"ant expert: update {done}/{total} env steps {done * cfg.steps_per_update} "
                    f"success {metrics['success_rate'].mean():.3f} "
                    f"return {metrics['episode_return'].mean():.2f} "
                    f"episodes {metrics['episodes'].sum():.0f} "
                    f"loss {metrics['loss'].mean():.4f} ({time.perf_counter() - t0:.0f}s)"
                )
    finally:
        ckpt.close()
    steady = chunk_times[1:]
    sps = (
        sum(k for k, _ in steady) * cfg.steps_per_update / sum(s for _, s in steady)
        if steady
        else math.nan
    )
    return AntExpertRun(
        params=ExpertParams(ts["params"], ts["norm"]),
        history={k: np.asarray(v, np.float32) for k, v in history.items()},
        updates=done,
        env_steps=done * cfg.steps_per_update,
        wall_seconds=time.perf_counter() - t0,
        steps_per_second=sps,
    )


def load_expert(run_dir: str | os.PathLike) -> tuple[AntExpertConfig, ExpertParams]:
    """(config, params) of the expert trained in `run_dir` (its config.json and latest
    checkpoint), for data generation. Raises FileNotFoundError naming what is missing."""
    run_dir = pathlib.Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"no Ant expert run at {run_dir} (no config.json); train one "
            f"with: python -m internal_rl.ant_expert --run-dir {run_dir}"
        )
    cfg = from_json(AntExpertConfig, config_file.read_text())
    ckpt = _checkpointer(run_dir, cfg)
    latest = ckpt.latest_step()
    ckpt.close()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir / 'checkpoints'}")
    run = train_ant_expert(cfg, run_dir, num_updates=0, log=lambda *a: None)  # restore only
    return cfg, run.params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m internal_rl.ant_expert",
        description="Train (or resume) the Ant-pinpad PPO expert, then evaluate it.",
    )
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument(
        "--updates",
        type=int,
        default=None,
        help="train up to this many updates in total (default: the preset's)",
    )
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args(argv)
    from common.runtime import start_process, start_run_dir

    start_process()
    try:
        cfg = config_from_args(ANT_EXPERT_PRESETS, args)
    except ValueError as err:  # ConfigError included
        parser.error(str(err))
    run_dir = start_run_dir(args.run_dir, cfg)
    run = train_ant_expert(cfg, run_dir, args.updates)
    print(
        f"ant expert: {run.updates} updates, {run.env_steps} env steps, "
        f"{run.steps_per_second:.0f} env steps/s after the first chunk, "
        f"{run.wall_seconds:.0f}s"
    )
    if not args.no_eval:
        res = evaluate_expert(cfg, run.params)
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()}
        (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
        print(
            f"ant expert: success pretraining {res['pretrain_success']:.3f} "
            f"held-out {res['post_success']:.3f} (mean action, {res['episodes']} episodes)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
