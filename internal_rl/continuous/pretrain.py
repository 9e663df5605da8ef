"""Behavioural pretraining of the Hawk base model on continuous pinpad expert data
(internal RL App. C.1.1, Eq. 5, Tables A5/A15; docs/internal_rl.md D23).

`run_pretrain(cfg, run_dir)` trains `hawk.pretrain_loss` (action NLL + λ · observation NLL)
through `internal_rl.stage.run_pretrain_stage` (the grid world's stage: jitted step on the
device mesh, orbax checkpoints of model + optimizer + RNG + data position, resume,
non-finite-loss stop) and logs to `run_dir/pretrain/metrics.jsonl`.
Evaluation: losses on a held-out expert batch, and closed-loop episodes of the base model
acting with its own Gaussian head (sampled, and greedy = the mean) on the pretraining tasks
and on the held-out task 0-1-2-3. `load_base_model(cfg, run_dir)` restores a checkpoint as
a module for probes and controllers.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import to_dict
from common.rng import stream_key, stream_seed
from common.train import STEPS
from internal_rl.continuous.config import Config, EnvConfig
from internal_rl.continuous.data import AntExpertDataset, PointExpertDataset
from internal_rl.continuous.rollouts import gaussian_closed_loop
from internal_rl.envs.ant_pinpad import AntPinpad
from internal_rl.envs.pinpad_layout import (
    POST_TASK,
    post_task,
    pretrain_tasks,
    seen_transition_task,
)
from internal_rl.envs.point_pinpad import PointPinpad
from internal_rl.models.hawk import HawkModel, pretrain_loss
from internal_rl.pretrain import stream_names
from internal_rl.rollouts import summarize
from internal_rl.stage import (
    PRETRAIN_IGNORE,
    pretrain_checkpointer,
    restore_pretrained,
    run_pretrain_stage,
)
from internal_rl.stage import init_train_state as _init_train_state

# The task tables the later stages evaluate on, by name (`internal_rl.pipeline`).
TASKS = {"pretrain": pretrain_tasks, "heldout": post_task, "seen_transitions": seen_transition_task}
TASK_WIDTH = len(POST_TASK)  # eval tasks padded to 4 colours: one program for both task sets


@functools.lru_cache(maxsize=8)
def _make_env(env_cfg: EnvConfig) -> PointPinpad | AntPinpad:
    # One env object per config (MJX model loading); not a compiled program. The compiled
    # data and evaluation programs are keyed on this object in `common.train.STEPS`.
    e = env_cfg
    cls = PointPinpad if e.kind == "point" else AntPinpad
    return cls(
        size=e.size,
        cell_size=e.cell_size,
        num_colours=e.num_colours,
        num_walls=e.num_walls,
        horizon=e.horizon,
        frame_skip=e.frame_skip,
    )


def make_env(cfg: Config) -> PointPinpad | AntPinpad:
    """The environment of cfg.env (built once per env config)."""
    return _make_env(cfg.env)


def build_model(cfg: Config) -> HawkModel:
    """A fresh Hawk base model; its I/O sizes must match the env's."""
    env = make_env(cfg)
    if cfg.model.obs_dim != env.obs_dim or cfg.model.action_dim != env.action_shape[0]:
        raise ValueError(
            f"model.obs_dim / model.action_dim = {cfg.model.obs_dim} / "
            f"{cfg.model.action_dim}, but the {cfg.env.kind} env has "
            f"{env.obs_dim} / {env.action_shape[0]}"
        )
    return HawkModel(cfg.model, rngs=nnx.Rngs(stream_seed(cfg.seed, "model")))


def make_dataset(
    cfg: Config, stream: str | tuple, batch_size: int | None = None, *, star: bool = False
) -> PointExpertDataset | AntExpertDataset:
    """Expert data on the pretraining tasks: D (noise cfg.data.noise_std) or, with `star`,
    D* (cfg.data.star_noise_std). `stream` names an independent seed of cfg.seed
    (`common.rng.stream_seed`). The point-mass expert is scripted; the Ant's is the trained
    PPO expert of cfg.data.expert_run_dir."""
    d = cfg.data
    noise = d.star_noise_std if star else d.noise_std
    seed = stream_seed(cfg.seed, *stream_names(stream))
    if cfg.env.kind == "point":
        return PointExpertDataset(
            make_env(cfg),
            pretrain_tasks(),
            batch_size or d.batch_size,
            d.max_len,
            noise,
            seed=seed,
            n_candidates=d.n_candidates,
        )
    expert_cfg, params = _ant_expert(cfg)
    return AntExpertDataset(
        expert_cfg,
        params,
        pretrain_tasks(TASK_WIDTH),
        batch_size or d.batch_size,
        d.max_len,
        noise,
        seed=seed,
        n_candidates=d.n_candidates,
    )


def _ant_expert(cfg: Config):
    """(expert config, params) of cfg.data.expert_run_dir, checked against cfg.env."""
    from internal_rl.ant_expert import build_program, load_expert

    if cfg.data.expert_run_dir is None:
        raise ValueError(
            "data.expert_run_dir: the Ant-pinpad's data come from a trained "
            "expert; train one (python -m internal_rl.ant_expert --run-dir DIR) "
            "and set data.expert_run_dir=DIR"
        )
    expert_cfg, params = load_expert(cfg.data.expert_run_dir)
    expert_env, env = build_program(expert_cfg).env, make_env(cfg)

    def geometry(e):
        return dict(
            size=e.grid.size,
            cell_size=e.grid.cell_size,
            num_colours=e.num_colours,
            num_walls=e.num_walls,
            horizon=e.horizon,
            frame_skip=e.frame_skip,
        )

    theirs, ours = geometry(expert_env), geometry(env)
    mismatch = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if mismatch:
        raise ValueError(
            f"data.expert_run_dir={cfg.data.expert_run_dir}: the expert's env "
            f"differs from cfg.env in {mismatch} (expert, config)"
        )
    return expert_cfg, params


def pretrain_checkpoint_config(cfg: Config) -> dict:
    """The config sections a pretraining checkpoint depends on (checked on restore)."""
    d = to_dict(cfg)
    return {k: d[k] for k in ("seed", "env", "data", "model", "pretrain")}


# Moving the Ant expert's run directory (a path, not the expert) must not invalidate the
# checkpoints either.
IGNORE = PRETRAIN_IGNORE + ("data.star_noise_std", "data.expert_run_dir")


def init_train_state(cfg: Config):
    """(graphdef, TrainState, tx) of a fresh base model."""
    return _init_train_state(cfg, lambda: build_model(cfg), stream_key(cfg.seed, "pretrain"))


def make_loss_fn(obs_coef: float):
    """(model, batch, key) -> (loss, metrics): Eq. 5 plus the mean learned action log-std."""

    def loss_fn(model: HawkModel, batch, key):
        loss, metrics = pretrain_loss(model, batch, key, obs_coef)
        return loss, {**metrics, "action_log_std": jnp.mean(model.log_std())}

    return loss_fn


def eval_tasks(tasks: np.ndarray, num_episodes: int) -> np.ndarray:
    """int32 [num_episodes, 4]: the task rows cycled in order (equal counts per task when
    num_episodes is a multiple of the table size), padded to the held-out task's width."""
    tasks = np.asarray(tasks, np.int32)
    if tasks.ndim == 1:
        tasks = tasks[None]
    padded = np.full((tasks.shape[0], TASK_WIDTH), -1, np.int32)
    padded[:, : tasks.shape[1]] = tasks
    return np.resize(padded, (num_episodes, TASK_WIDTH))


def make_base_eval(cfg: Config, graphdef, horizon: int | None = None):
    """Jitted (params, frozen, key, tasks int32 [N, 4], greedy bool []) -> episode dict of
    the uncontrolled base model acting with its Gaussian head (mean when greedy)."""
    env = make_env(cfg)
    horizon = horizon or env.horizon
    return STEPS.get(
        ("internal_rl.hawk_base_eval", env, graphdef, horizon),
        lambda: _build_base_eval(env, graphdef, horizon),
    )


def _build_base_eval(env, graphdef, horizon: int):
    def run(params, frozen, key, tasks, greedy):
        model = nnx.merge(graphdef, params, frozen)

        def step_fn(obs, caches, subgoal):
            out, caches = model.decode_step(obs, caches, return_residuals=False)
            return out.action_mean[:, 0], out.action_log_std, caches

        return gaussian_closed_loop(
            env, step_fn, model.init_caches(tasks.shape[0]), key, tasks, horizon, greedy
        )

    return jax.jit(run)


def closed_loop_metrics(
    base_eval, params, frozen, key: jax.Array, num_episodes: int
) -> dict[str, float]:
    """Sampled and greedy episode summaries on the pretraining tasks and the held-out task:
    keys {pretrain_task, post_task}[_greedy]_{success_rate, mean_progress, mean_length}."""
    metrics = {}
    for name, tasks in (("pretrain_task", pretrain_tasks()), ("post_task", post_task())):
        rows = jnp.asarray(eval_tasks(tasks, num_episodes))
        for suffix, greedy in (("", False), ("_greedy", True)):
            episodes = base_eval(params, frozen, key, rows, jnp.asarray(greedy))
            metrics.update({f"{name}{suffix}_{k}": v for k, v in summarize(episodes).items()})
    return metrics


def run_pretrain(cfg: Config, run_dir: str | pathlib.Path, *, verbose: bool = True) -> dict:
    """Pretrains (or resumes) the base model to cfg.pretrain.steps; returns a summary dict
    (also written to run_dir/pretrain/summary.json)."""
    graphdef, state, _ = init_train_state(cfg)
    obs_coef = cfg.pretrain.obs_coef
    loss_fn = make_loss_fn(obs_coef)
    # host copy: the eval program places it next to the (possibly mesh-replicated) params
    heldout_batch = jax.tree.map(np.asarray, make_dataset(cfg, "heldout").batch_at(0))
    batch_eval = STEPS.get(
        ("internal_rl.hawk_pretrain_eval", graphdef, obs_coef),
        lambda: jax.jit(lambda p, f, b: loss_fn(nnx.merge(graphdef, p, f), b, None)),
    )
    base_eval = make_base_eval(cfg, graphdef)
    n_eval = cfg.pretrain.eval_episodes
    eval_key = stream_key(cfg.seed, "eval")

    def evaluate(st):
        loss, parts = batch_eval(st.params, st.frozen, heldout_batch)
        metrics = {f"heldout_{k}": v for k, v in {"loss": loss, **parts}.items()}
        if n_eval:
            key = jax.random.fold_in(eval_key, st.step)
            metrics.update(closed_loop_metrics(base_eval, st.params, st.frozen, key, n_eval))
        return metrics

    return run_pretrain_stage(
        cfg,
        run_dir,
        graphdef=graphdef,
        state=state,
        loss_fn=loss_fn,
        loss_key=("internal_rl.hawk_pretrain", obs_coef),
        data=make_dataset(cfg, "data"),
        checkpoint_config=pretrain_checkpoint_config(cfg),
        ignore=IGNORE,
        evaluate=evaluate,
        verbose=verbose,
    )


def load_base_model(cfg: Config, run_dir: str | pathlib.Path, step: int | None = None) -> HawkModel:
    """The pretrained base model from run_dir's checkpoints (latest step by default)."""
    graphdef, state, _ = init_train_state(cfg)
    ckpt = pretrain_checkpointer(pathlib.Path(run_dir), pretrain_checkpoint_config(cfg), IGNORE)
    return restore_pretrained(
        graphdef, state, ckpt, step, "python -m internal_rl pretrain --env point"
    )
