"""Behavioural pretraining of the base model on on-the-fly expert data (internal RL App. C.1,
D.1, Eq. 5).

`run_pretrain(cfg, run_dir)` trains with `common.train` (jitted functional step, orbax
checkpoints of model + optimizer + RNG + data position, resume, non-finite-loss stop) and
logs to `run_dir/pretrain/metrics.jsonl`. `load_base_model(cfg, run_dir)` restores the
latest (or a given) checkpoint as a frozen module for probes and controllers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from common.checkpoint import Checkpointer
from common.config import to_dict
from common.metrics import MetricsWriter, Progress
from common.train import create_train_state, make_optimizer, make_train_step, merge_model, train
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

# Seed offsets keep the streams of the stages independent but derived from cfg.seed.
SEED_MODEL, SEED_DATA, SEED_EVAL, SEED_PROBE, SEED_CONTROL = 0, 1, 2, 3, 4
# The task tables the later stages evaluate on, by name (`internal_rl.pipeline`).
TASKS = {"pretrain": pretrain_tasks, "heldout": post_task,
         "seen_transitions": seen_transition_task}


@functools.lru_cache(maxsize=16)
def _make_env(env_cfg: EnvConfig) -> GridPinpad:
    e = env_cfg
    env = GridPinpad(size=e.size, num_colours=e.num_colours, num_walls=e.num_walls,
                     horizon=e.horizon)
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
        raise ValueError(f"model.obs_dim={cfg.model.obs_dim} but the env's observation has "
                         f"{env.obs_dim} dims")
    return BaseModel(cfg.model, rngs=nnx.Rngs(cfg.seed * 100 + SEED_MODEL))


def make_dataset(cfg: Config, stream: int, batch_size: int | None = None, *,
                 star: bool = False) -> ExpertDataset:
    """Expert data on the pretraining tasks. D and D* are generated the same way (App. C.1.1),
    so `star` (the continuous pipeline's noise-free D*) changes nothing here."""
    del star
    return ExpertDataset(make_env(cfg), pretrain_tasks(), batch_size or cfg.data.batch_size,
                         cfg.data.max_len, cfg.data.epsilon, seed=cfg.seed * 100 + stream)


def pretrain_checkpoint_config(cfg: Config) -> dict:
    """The config sections a pretraining checkpoint depends on (checked on restore)."""
    d = to_dict(cfg)
    out = {k: d[k] for k in ("seed", "env", "data", "model", "pretrain")}
    if not cfg.env.layout_pool:
        # fresh layouts: the pool keys do not matter, and checkpoints written before they
        # existed stay loadable
        out["env"] = {k: v for k, v in out["env"].items()
                      if k not in ("layout_pool", "layout_seed")}
    return out


def _checkpointer(cfg: Config, run_dir: pathlib.Path) -> Checkpointer:
    # Extending a run (more steps, other logging periods) must not invalidate its checkpoints.
    ignore = ["pretrain.steps", "pretrain.optim.total_steps", "pretrain.log_every",
              "pretrain.save_every", "pretrain.eval_every", "pretrain.eval_episodes"]
    return Checkpointer(run_dir / "pretrain" / "checkpoints", max_to_keep=None,
                        config=pretrain_checkpoint_config(cfg), ignore_config_keys=ignore)


def init_train_state(cfg: Config):
    """(graphdef, TrainState, tx) of a fresh base model."""
    tx = make_optimizer(cfg.pretrain.optim)
    graphdef, state = create_train_state(build_model(cfg), tx, jax.random.key(cfg.seed))
    return graphdef, state, tx


def make_base_eval(cfg: Config, graphdef, tasks, num_episodes: int, horizon: int | None = None):
    """Jitted (params, frozen, key) -> episode dict of the uncontrolled base model."""
    return make_policy_eval(make_env(cfg), graphdef, tasks, num_episodes, horizon=horizon,
                            greedy=cfg.control.greedy)


def run_pretrain(cfg: Config, run_dir: str | pathlib.Path, *, verbose: bool = True) -> dict:
    """Pretrains (or resumes) the base model to cfg.pretrain.steps; returns a summary dict."""
    run_dir = pathlib.Path(run_dir)
    out_dir = run_dir / "pretrain"
    out_dir.mkdir(parents=True, exist_ok=True)
    graphdef, state, tx = init_train_state(cfg)
    obs_coef = cfg.pretrain.obs_coef
    step_fn = make_train_step(graphdef, lambda m, b, k: pretrain_loss(m, b, k, obs_coef), tx)
    data = make_dataset(cfg, SEED_DATA)
    eval_data = make_dataset(cfg, SEED_EVAL)
    heldout_batch = eval_data.batch_at(0)
    batch_eval = jax.jit(lambda p, f, b: pretrain_loss(nnx.merge(graphdef, p, f), b, None,
                                                       obs_coef)[1])
    rollout_eval = make_base_eval(cfg, graphdef, pretrain_tasks(), cfg.pretrain.eval_episodes)

    def eval_fn(st):
        metrics = {f"heldout_{k}": v for k, v in batch_eval(st.params, st.frozen, heldout_batch).items()}
        key = jax.random.fold_in(jax.random.key(cfg.seed * 100 + SEED_EVAL), st.step)
        metrics.update({f"pretrain_task_{k}": v for k, v in
                        summarize(rollout_eval(st.params, st.frozen, key)).items()})
        return metrics

    ckpt = _checkpointer(cfg, run_dir)
    start = ckpt.latest_step() or 0
    progress = Progress(cfg.pretrain.steps, name="pretrain", start_step=start)
    t0 = time.time()
    with MetricsWriter(out_dir / "metrics.jsonl") as writer:
        state = train(state, step_fn, data, cfg.pretrain.steps, checkpointer=ckpt,
                      save_every=cfg.pretrain.save_every, eval_fn=eval_fn,
                      eval_every=cfg.pretrain.eval_every, metrics_writer=writer,
                      log_every=cfg.pretrain.log_every,
                      progress=(lambda s, m=None: progress.update(s, m)) if verbose else None)
    final = {k: float(v) for k, v in jax.device_get(eval_fn(state)).items()}
    post = make_base_eval(cfg, graphdef, post_task()[None], cfg.pretrain.eval_episodes)
    key = jax.random.key(cfg.seed * 100 + SEED_EVAL)
    final.update({f"post_task_{k}": v for k, v in
                  summarize(post(state.params, state.frozen, key)).items()})
    ckpt.close()
    summary = dict(step=int(state.step), resumed_from=start, wall_seconds_this_session=time.time() - t0,
                   compile_seconds=progress.compile_seconds, **final)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def restore_pretrained(graphdef, state, ckpt: Checkpointer, step: int | None, command: str):
    """The module of `state` restored from `ckpt` at `step` (latest by default); closes ckpt.
    An empty checkpoint directory raises FileNotFoundError naming the `command` to run."""
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no pretraining checkpoint under {ckpt.directory}; run `{command}` with the "
                "same --run-dir first")
        state, _ = ckpt.restore(state, step)
    finally:
        ckpt.close()
    return merge_model(graphdef, state)


def load_base_model(cfg: Config, run_dir: str | pathlib.Path, step: int | None = None) -> BaseModel:
    """The pretrained base model from run_dir's checkpoints (latest step by default)."""
    graphdef, state, _ = init_train_state(cfg)
    return restore_pretrained(graphdef, state, _checkpointer(cfg, pathlib.Path(run_dir)), step,
                              "python -m internal_rl pretrain")
