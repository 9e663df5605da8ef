"""The supervised analysis stages on a pretrained base model: probes and controllers.

`run_probe(cfg, run_dir)`   -> run_dir/probe/results.json + plots (Fig. 3 / A1 analogues)
`run_control(cfg, run_dir)` -> run_dir/control/results.json + plot (Fig. 4 analogue)

Both read the base model from run_dir's pretraining checkpoints, for either environment
family (`internal_rl.pipeline`: grid world or continuous pinpad). Controller training is a
`common.train.run_stage` with one checkpoint directory per insertion layer; a layer whose
results file exists is skipped, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from flax import nnx

from common.config import to_dict
from common.report import StageClock, figure, savefig, write_json
from common.rng import stream_key, stream_seed
from common.train import STEPS, create_train_state, run_stage
from internal_rl.controllers import CONTROLLER_PARAMS, ControlledModel, controller_loss
from internal_rl.pipeline import PipelineConfig, stages, task_table
from internal_rl.probes import probe_checkpoints, probe_layers
from internal_rl.rollouts import make_policy_eval, summarize
from internal_rl.stage import PRETRAIN_IGNORE


def _plot_lines(path, xs, series: dict, title: str, xlabel: str, ylabel: str, hline=None):
    fig, ax = figure()
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label, linewidth=1.5, markersize=3)
    if hline is not None:
        ax.axhline(hline[1], linestyle="--", color="gray", linewidth=1.0, label=hline[0])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    savefig(fig, path)


def probe_checkpoint(cfg: PipelineConfig, run_dir: pathlib.Path, step: int | None = None) -> dict:
    """Probes of every layer of the base model at pretraining checkpoint `step` (latest),
    fitted on fresh D trajectories and evaluated on an independent stream: JSON-ready
    per-layer train/eval accuracy, eval accuracy and p(correct) by position within a subgoal
    segment, chance and majority baselines (`probes.probe_layers`)."""
    pipe = stages(cfg)
    model = pipe.load_base_model(cfg, run_dir, step)
    return probe_layers(
        model,
        pipe.make_dataset(cfg, ("probe", "train")),
        pipe.make_dataset(cfg, ("probe", "eval")),
        pipe.make_env(cfg).num_subgoals,
        cfg.probe,
        stream_key(cfg.seed, "probe", "fit"),
        cfg.model.depth + 1,
    )


def run_probe(cfg: PipelineConfig, run_dir: str | pathlib.Path) -> dict:
    """Fits per-layer subgoal probes on fresh expert data; writes results + plots.

    The latest checkpoint is the main result; `probe.checkpoints` adds earlier pretraining
    steps (those present on disk) for the accuracy-vs-training-step view (Fig. A1).
    """
    run_dir = pathlib.Path(run_dir)
    out = run_dir / "probe"
    results = probe_checkpoints(
        run_dir, cfg.probe.checkpoints, lambda step: probe_checkpoint(cfg, run_dir, step)
    )
    by_step = results["by_checkpoint"]
    layers = results["layers"]
    chance = results["chance"]
    _plot_lines(
        out / "probe_accuracy_by_layer.png",
        layers,
        {"held-out": results["eval_accuracy"], "train": results["train_accuracy"]},
        "Linear probe: subgoal decoding per layer",
        "residual layer l",
        "accuracy",
        hline=("chance", chance),
    )
    pos = np.arange(cfg.probe.max_position)
    by_pos = np.asarray(results["eval_accuracy_by_position"], dtype=float)
    _plot_lines(
        out / "probe_accuracy_by_position.png",
        pos,
        {f"layer {i}": by_pos[i] for i in layers},
        "Probe accuracy vs steps since the subgoal began",
        "position in segment",
        "accuracy",
        hline=("chance", chance),
    )
    if by_step:
        _plot_lines(
            out / "probe_accuracy_by_checkpoint.png",
            layers,
            {f"step {k}": v["eval_accuracy"] for k, v in by_step.items()},
            "Held-out probe accuracy per layer across pretraining",
            "residual layer l",
            "accuracy",
            hline=("chance", chance),
        )
    return results


def make_controlled_eval(cfg: PipelineConfig, graphdef, tasks, num_episodes: int):
    """Jitted (params, frozen, key) -> episodes of the label-switched controlled model."""
    return make_policy_eval(
        stages(cfg).make_env(cfg),
        graphdef,
        tasks,
        num_episodes,
        greedy=cfg.control.greedy,
        labelled=True,
    )


# Settings that do not change a controller's training:
CONTROL_IGNORE = PRETRAIN_IGNORE + (
    "control.layers",
    "control.eval_episodes",
    "control.save_every",
    "control.greedy",
)


def init_controller(cfg: PipelineConfig, base, layer: int):
    """(graphdef, TrainState) of a fresh layer-`layer` controller over the frozen `base`."""
    num_codes = stages(cfg).make_env(cfg).num_subgoals
    model = ControlledModel(
        base,
        layer,
        num_codes,
        cfg.control.rank,
        cfg.control.hidden,
        rngs=nnx.Rngs(stream_seed(cfg.seed, "control", "init", layer)),
    )
    return create_train_state(
        model,
        STEPS.optimizer(cfg.control.optim),
        stream_key(cfg.seed, "control", "train", layer),
        trainable=CONTROLLER_PARAMS,
    )


def train_controller(
    cfg: PipelineConfig, run_dir: pathlib.Path, layer: int, *, verbose: bool = True
):
    """Trains (or resumes) the layer-`layer` controller on D*; returns (graphdef,
    TrainState)."""
    pipe = stages(cfg)
    graphdef, state = init_controller(cfg, pipe.load_base_model(cfg, run_dir), layer)
    step_fn = STEPS.train_step(graphdef, cfg.control.optim, controller_loss)
    data = pipe.make_dataset(cfg, ("control", "data"), cfg.control.batch_size, star=True)
    ckpt_cfg = dict(pipe.pretrain_checkpoint_config(cfg), control=to_dict(cfg.control), layer=layer)
    res = run_stage(
        f"control l={layer}",
        state,
        step_fn,
        data,
        cfg.control.steps,
        directory=run_dir / "control" / f"layer_{layer}",
        checkpoint_config=ckpt_cfg,
        ignore_config_keys=CONTROL_IGNORE,
        max_to_keep=1,
        save_every=cfg.control.save_every,
        log_every=25,
        verbose=verbose,
    )
    return graphdef, res.state


def run_control(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    *,
    verbose: bool = True,
    clock: StageClock | None = None,
) -> dict:
    """Sweeps the insertion layer; per layer: train, then evaluate on the held-out task,
    the pretraining tasks and (where the environment has it) the seen-transition task.

    The uncontrolled base model's and each layer's results are cached through `clock` (a
    `common.report.StageClock`, stage "control"): a finished layer is read back with the
    compute seconds it took."""
    run_dir = pathlib.Path(run_dir)
    out = run_dir / "control"
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock() if clock is None else clock
    pipe = stages(cfg)
    post_task = task_table(cfg, "heldout")[None]
    has_seen = "seen_transitions" in pipe.TASKS
    n_eval = cfg.control.eval_episodes
    key = stream_key(cfg.seed, "control", "eval")

    def uncontrolled():
        base = pipe.load_base_model(cfg, run_dir)
        graphdef, params, frozen = nnx.split(base, nnx.Param, ...)
        base_eval = make_policy_eval(
            pipe.make_env(cfg), graphdef, post_task, n_eval, greedy=cfg.control.greedy
        )
        return summarize(base_eval(params, frozen, key))

    base_res = clock.cached("control", out / "uncontrolled.json", uncontrolled)

    def controlled(layer):
        t0 = time.time()
        graphdef, state = train_controller(cfg, run_dir, layer, verbose=verbose)
        t_train = time.time() - t0

        def episodes(table):
            ev = make_controlled_eval(cfg, graphdef, table, n_eval)
            return summarize(ev(state.params, state.frozen, key))

        res = dict(
            layer=layer,
            train_seconds=t_train,
            post_task=episodes(post_task),
            pretrain_tasks=episodes(task_table(cfg, "pretrain")),
        )
        if has_seen:
            res["seen_transition_task"] = episodes(task_table(cfg, "seen_transitions")[None])
        res["wall_seconds"] = time.time() - t0
        if verbose:
            print(
                f"[control] layer {layer}: post-task success "
                f"{res['post_task']['success_rate']:.3f}",
                flush=True,
            )
        return res

    per_layer = {
        layer: clock.cached(
            "control",
            out / f"layer_{layer}" / "results.json",
            lambda layer=layer: controlled(layer),
        )
        for layer in cfg.control_layers
    }
    layers = sorted(per_layer)
    results = dict(
        layers=layers,
        post_task_success=[per_layer[layer]["post_task"]["success_rate"] for layer in layers],
        post_task_progress=[per_layer[layer]["post_task"]["mean_progress"] for layer in layers],
        pretrain_task_success=[
            per_layer[layer]["pretrain_tasks"]["success_rate"] for layer in layers
        ],
        uncontrolled_post_task=base_res,
        eval_episodes=n_eval,
    )
    if has_seen:
        results["seen_transition_task_success"] = [
            per_layer[layer]["seen_transition_task"]["success_rate"] for layer in layers
        ]
    write_json(out / "results.json", results)
    _plot_lines(
        out / "controller_success_by_layer.png",
        layers,
        {
            "held-out task, GT-switched controllers": results["post_task_success"],
            "held-out task, fraction of colours reached": results["post_task_progress"],
        },
        "Supervised controllers vs insertion layer",
        "insertion layer l",
        "success rate",
        hline=("uncontrolled base", base_res["success_rate"]),
    )
    return results
