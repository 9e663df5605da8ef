"""Behavioural pretraining of the base model on on-the-fly expert data (internal RL App. C.1,
D.1, Eq. 5).

`run_pretrain(cfg, run_dir)` trains through `internal_rl.stage.run_pretrain_stage`
(`common.train.run_stage`: jitted step on the device mesh, orbax checkpoints of model +
optimizer + RNG + data position, resume, non-finite-loss stop) and logs to
`run_dir/pretrain/metrics.jsonl`. `load_base_model(cfg, run_dir)` restores the
latest (or a given) checkpoint as a frozen module for probes and controllers.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np
from flax import nnx

from common.config import to_dict
from common.rng import stream_key, stream_seed
from common.train import STEPS
from internal_rl.config import Config, EnvConfig
from internal_rl.data import ExpertDataset
from internal_rl.envs.gridworld import (
    POST_TASK,
    GridPinpad,
    post_task,
    pretrain_tasks,
    sample_layout_pool,
    seen_transition_task,
)
from internal_rl.models.transformer import BaseModel, pretrain_loss
from internal_rl.rollouts import make_policy_eval, summarize
from internal_rl.stage import (
    PRETRAIN_IGNORE,
    pretrain_checkpointer,
    restore_pretrained,
    run_pretrain_stage,
)
from internal_rl.stage import init_train_state as _init_train_state

# The task tables the later stages evaluate on, by name (`internal_rl.pipeline`).
TASKS = {"pretrain": pretrain_tasks, "heldout": post_task, "seen_transitions": seen_transition_task}


@functools.lru_cache(maxsize=16)
def _make_env(env_cfg: EnvConfig) -> GridPinpad:
    # Builds the env (and samples its layout pool) once per config; not a compiled program.
    e = env_cfg
    env = GridPinpad(
        size=e.size, num_colours=e.num_colours, num_walls=e.num_walls, horizon=e.horizon
    )
    if e.layout_pool:
        # the pool must serve the pretraining tasks and the held-out task alike
        tasks = np.concatenate([pretrain_tasks(len(POST_TASK)), post_task()[None]])
        pool = sample_layout_pool(env, e.layout_pool, e.layout_seed, tasks)
        env = dataclasses.replace(env, layouts=pool)
    return env


def make_env(cfg: Config) -> GridPinpad:
    """The environment of cfg.env (the layout pool, if any, is built once per config)."""
    return _make_env(cfg.env)


def build_model(cfg: Config) -> BaseModel:
    env = make_env(cfg)
    if cfg.model.obs_dim != env.obs_dim:
        raise ValueError(
            f"model.obs_dim={cfg.model.obs_dim} but the env's observation has {env.obs_dim} dims"
        )
    return BaseModel(cfg.model, rngs=nnx.Rngs(stream_seed(cfg.seed, "model")))


def stream_names(stream: str | tuple) -> tuple:
    """A data stream's name path: "data" or ("metacontroller", "data", 2)."""
    return stream if isinstance(stream, tuple) else (stream,)


def make_dataset(
    cfg: Config, stream: str | tuple, batch_size: int | None = None, *, star: bool = False
) -> ExpertDataset:
    """Expert data on the pretraining tasks, seeded by the named `stream` of cfg.seed
    (`common.rng.stream_seed`). D and D* are generated the same way (App. C.1.1), so `star`
    (the continuous pipeline's noise-free D*) changes nothing here."""
    del star
    return ExpertDataset(
        make_env(cfg),
        pretrain_tasks(),
        batch_size or cfg.data.batch_size,
        cfg.data.max_len,
        cfg.data.epsilon,
        seed=stream_seed(cfg.seed, *stream_names(stream)),
    )


def pretrain_checkpoint_config(cfg: Config) -> dict:
    """The config sections a pretraining checkpoint depends on (checked on restore)."""
    d = to_dict(cfg)
    out = {k: d[k] for k in ("seed", "env", "data", "model", "pretrain")}
    if not cfg.env.layout_pool:
        # fresh layouts: the pool keys do not matter, and checkpoints written before they
        # existed stay loadable
        out["env"] = {
            k: v for k, v in out["env"].items() if k not in ("layout_pool", "layout_seed")
        }
    return out


def init_train_state(cfg: Config):
    """(graphdef, TrainState, tx) of a fresh base model."""
    return _init_train_state(cfg, lambda: build_model(cfg), stream_key(cfg.seed, "pretrain"))


def make_base_eval(cfg: Config, graphdef, tasks, num_episodes: int, horizon: int | None = None):
    """Jitted (params, frozen, key) -> episode dict of the uncontrolled base model."""
    return make_policy_eval(
        make_env(cfg), graphdef, tasks, num_episodes, horizon=horizon, greedy=cfg.control.greedy
    )


def make_loss_fn(obs_coef: float):
    """(model, batch, key) -> (loss, metrics): Eq. 5 with λ = obs_coef."""
    return functools.partial(pretrain_loss, obs_coef=obs_coef)


def run_pretrain(cfg: Config, run_dir: str | pathlib.Path, *, verbose: bool = True) -> dict:
    """Pretrains (or resumes) the base model to cfg.pretrain.steps; returns a summary dict
    (also written to run_dir/pretrain/summary.json)."""
    graphdef, state, _ = init_train_state(cfg)
    obs_coef = cfg.pretrain.obs_coef
    loss_fn = make_loss_fn(obs_coef)
    # host copy: the eval program places it next to the (possibly mesh-replicated) params
    heldout_batch = jax.tree.map(np.asarray, make_dataset(cfg, "heldout").batch_at(0))
    batch_eval = STEPS.get(
        ("internal_rl.grid_pretrain_eval", graphdef, obs_coef),
        lambda: jax.jit(lambda p, f, b: loss_fn(nnx.merge(graphdef, p, f), b, None)[1]),
    )
    rollout_eval = make_base_eval(cfg, graphdef, pretrain_tasks(), cfg.pretrain.eval_episodes)
    eval_key = stream_key(cfg.seed, "eval")

    def evaluate(st):
        metrics = {
            f"heldout_{k}": v for k, v in batch_eval(st.params, st.frozen, heldout_batch).items()
        }
        if cfg.pretrain.eval_episodes:
            key = jax.random.fold_in(eval_key, st.step)
            metrics.update(
                {
                    f"pretrain_task_{k}": v
                    for k, v in summarize(rollout_eval(st.params, st.frozen, key)).items()
                }
            )
        return metrics

    def post_task_eval(st):
        if not cfg.pretrain.eval_episodes:
            return {}
        post = make_base_eval(cfg, graphdef, post_task()[None], cfg.pretrain.eval_episodes)
        return {
            f"post_task_{k}": v for k, v in summarize(post(st.params, st.frozen, eval_key)).items()
        }

    return run_pretrain_stage(
        cfg,
        run_dir,
        graphdef=graphdef,
        state=state,
        loss_fn=loss_fn,
        loss_key=("internal_rl.grid_pretrain", obs_coef),
        data=make_dataset(cfg, "data"),
        checkpoint_config=pretrain_checkpoint_config(cfg),
        ignore=PRETRAIN_IGNORE,
        evaluate=evaluate,
        final_extra=post_task_eval,
        verbose=verbose,
    )


def load_base_model(cfg: Config, run_dir: str | pathlib.Path, step: int | None = None) -> BaseModel:
    """The pretrained base model from run_dir's checkpoints (latest step by default)."""
    graphdef, state, _ = init_train_state(cfg)
    ckpt = pretrain_checkpointer(
        pathlib.Path(run_dir), pretrain_checkpoint_config(cfg), PRETRAIN_IGNORE
    )
    return restore_pretrained(graphdef, state, ckpt, step, "python -m internal_rl pretrain")
