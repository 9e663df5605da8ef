"""The environment family of a config and the pretraining module that serves it.

Every stage after pretraining (probes, supervised controllers, the metacontroller, internal
and raw-action RL, `reproduce`) is shared by two families:

* the grid world: `internal_rl.config.Config`, transformer base model (categorical
  actions), `internal_rl.pretrain`;
* the continuous pinpads: `internal_rl.continuous.config.Config`, Hawk base model
  (diagonal Gaussian actions), `internal_rl.continuous.pretrain`.

The two pretraining modules have the same surface, which is what the shared stages use:
`make_env`, `build_model`, `load_base_model`, `make_dataset(cfg, stream, batch_size=None,
*, star=False)` (D, or the noise-free D* for controllers and the metacontroller; `stream`
names its seed, `common.rng.stream_seed(cfg.seed, *stream)`),
`pretrain_checkpoint_config`, `run_pretrain`, `make_loss_fn(obs_coef)`, and `TASKS`
(task-table functions by name: "pretrain", "heldout", and any diagnostic tasks). The base
models share the policy interface (`policy_head`, `sample_action`, `action_log_prob`,
`action_log_probs`, `lower_step`, `upper_step`, `sequence_losses`).
"""

from __future__ import annotations

from types import ModuleType

from internal_rl.config import Config as GridConfig
from internal_rl.continuous.config import Config as ContinuousConfig

PipelineConfig = GridConfig | ContinuousConfig
ENVS = ("gridworld", "point", "ant")  # the CLI's --env: the grid world or a continuous body


def presets_for(env: str) -> dict:
    """The preset table (name -> config factory) of the `--env` family."""
    if env not in ENVS:
        raise ValueError(f"env: expected one of {ENVS}, got {env!r}")
    if env == "gridworld":
        from internal_rl.config import PRESETS
    else:
        from internal_rl.continuous.config import PRESETS
    return PRESETS


def is_continuous(cfg: PipelineConfig) -> bool:
    """True for a continuous-pinpad config (Point- or Ant-pinpad)."""
    return isinstance(cfg, ContinuousConfig)


def stages(cfg: PipelineConfig) -> ModuleType:
    """The pretraining module of cfg's family (see the module docstring)."""
    if is_continuous(cfg):
        from internal_rl.continuous import pretrain
    elif isinstance(cfg, GridConfig):
        from internal_rl import pretrain
    else:
        raise TypeError(
            f"cfg: expected an internal_rl or internal_rl.continuous Config, "
            f"got {type(cfg).__name__}"
        )
    return pretrain


def task_table(cfg: PipelineConfig, name: str):
    """int32 [N, K] (or [K] for a single task): the task table `name` of cfg's family."""
    tasks = stages(cfg).TASKS
    if name not in tasks:
        raise ValueError(f"task {name!r}: expected one of {sorted(tasks)} for this environment")
    return tasks[name]()
