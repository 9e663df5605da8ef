"""The base-model pretraining stage both environment families share.

`internal_rl.pretrain` (grid world, transformer) and `internal_rl.continuous.pretrain`
(MJX pinpads, Hawk) differ in their model, loss, data and closed-loop evaluation; the stage
around them is one: the jitted step from `common.train.STEPS`, `common.train.run_stage`
(checkpoints in run_dir/pretrain/checkpoints, metrics in run_dir/pretrain/metrics.jsonl,
progress, resume, the device mesh), the periodic and final evaluation, and the summary
written to run_dir/pretrain/summary.json.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax

from common.checkpoint import Checkpointer
from common.train import STEPS, TrainState, create_train_state, merge_model, run_stage
from internal_rl.rollouts import host_array

# Extending a run (more steps, other logging or evaluation periods) must not invalidate its
# checkpoints: these keys are not compared on restore.
PRETRAIN_IGNORE = (
    "pretrain.steps",
    "pretrain.optim.total_steps",
    "pretrain.log_every",
    "pretrain.save_every",
    "pretrain.eval_every",
    "pretrain.eval_episodes",
)


def host_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics (jax arrays, possibly replicated over several processes) as floats."""
    return {k: float(host_array(v)) for k, v in metrics.items()}


def init_train_state(cfg, build_model: Callable[[], Any], rng: jax.Array):
    """(graphdef, TrainState, tx) of a fresh base model trained with cfg.pretrain.optim."""
    tx = STEPS.optimizer(cfg.pretrain.optim)
    graphdef, state = create_train_state(build_model(), tx, rng)
    return graphdef, state, tx


def pretrain_checkpointer(
    run_dir: pathlib.Path, checkpoint_config: dict, ignore: tuple[str, ...]
) -> Checkpointer:
    """The checkpointer `run_stage` uses for run_dir/pretrain (for restoring outside it)."""
    return Checkpointer(
        pathlib.Path(run_dir) / "pretrain" / "checkpoints",
        max_to_keep=None,
        config=checkpoint_config,
        ignore_config_keys=list(ignore),
    )


def run_pretrain_stage(
    cfg,
    run_dir: str | pathlib.Path,
    *,
    graphdef,
    state: TrainState,
    loss_fn: Callable,
    loss_key: Any,
    data,
    checkpoint_config: dict,
    ignore: tuple[str, ...],
    evaluate: Callable[[TrainState], dict],
    final_extra: Callable[[TrainState], dict] | None = None,
    verbose: bool = True,
) -> dict:
    """Pretrains (or resumes) to cfg.pretrain.steps; returns the summary dict.

    Args:
      graphdef, state: from the family's `init_train_state`.
      loss_fn, loss_key: the train loss (model, batch, key) -> (loss, metrics) and its
        hashable identity for the step cache.
      data: the checkpointable expert-data iterator.
      checkpoint_config, ignore: the config the checkpoints are checked against, and the
        keys left out of that check.
      evaluate: state -> {name: scalar}, every cfg.pretrain.eval_every steps (0: only at
        the end) and at the end (written to metrics.jsonl with an "eval/" prefix, and into
        the summary).
      final_extra: state -> further summary entries computed once at the end.
    """
    run_dir = pathlib.Path(run_dir)
    out_dir = run_dir / "pretrain"
    p = cfg.pretrain
    step_fn = STEPS.train_step(graphdef, p.optim, loss_fn, loss_key=loss_key)
    last: dict[int, dict] = {}

    def eval_fn(st: TrainState) -> dict:
        # the last step is evaluated by the loop and again for the summary: once is enough
        step = int(host_array(st.step))
        if step not in last:
            last.clear()
            last[step] = evaluate(st)
        return last[step]

    res = run_stage(
        "pretrain",
        state,
        step_fn,
        data,
        p.steps,
        directory=out_dir,
        checkpoint_config=checkpoint_config,
        ignore_config_keys=ignore,
        max_to_keep=None,
        save_every=p.save_every,
        eval_fn=eval_fn,
        eval_every=p.eval_every,
        log_every=p.log_every,
        verbose=verbose,
    )
    final = host_floats(eval_fn(res.state))
    if final_extra is not None:
        final.update(final_extra(res.state))
    summary = dict(
        step=int(host_array(res.state.step)),
        resumed_from=res.start_step,
        wall_seconds_this_session=res.wall_seconds,
        compile_seconds=res.compile_seconds,
        **final,
    )
    if jax.process_index() == 0:  # every process holds the same replicated results
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def restore_pretrained(graphdef, state, ckpt: Checkpointer, step: int | None, command: str):
    """The module of `state` restored from `ckpt` at `step` (latest by default); closes ckpt.
    An empty checkpoint directory raises FileNotFoundError naming the `command` to run."""
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no pretraining checkpoint under {ckpt.directory}; run `{command}` with the "
                "same --run-dir first"
            )
        state, _ = ckpt.restore(state, step)
    finally:
        ckpt.close()
    return merge_model(graphdef, state)
