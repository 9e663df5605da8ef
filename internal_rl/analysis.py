"""The supervised analysis stages on a pretrained base model: probes and controllers.

`run_probe(cfg, run_dir)`   -> run_dir/probe/results.json + plots (Fig. 3 / A1 analogues)
`run_control(cfg, run_dir)` -> run_dir/control/results.json + plot (Fig. 4 analogue)

Both read the base model from run_dir's pretraining checkpoints, for either environment
family (`internal_rl.pipeline`: grid world or continuous pinpad). Controller training uses
`common.train` with one checkpoint directory per insertion layer; a layer whose results
file exists is skipped, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from common.checkpoint import Checkpointer
from common.config import to_dict
from common.metrics import MetricsWriter, Progress
from common.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step, train
from internal_rl.controllers import CONTROLLER_PARAMS, ControlledModel, controller_loss
from internal_rl.pipeline import PipelineConfig, stages, task_table
from internal_rl.probes import probe_checkpoints, probe_layers
from internal_rl.rollouts import make_policy_eval, summarize


def _plot_lines(path, xs, series: dict, title: str, xlabel: str, ylabel: str, hline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label, linewidth=1.5, markersize=3)
    if hline is not None:
        ax.axhline(hline[1], linestyle="--", color="gray", linewidth=1.0, label=hline[0])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def probe_checkpoint(cfg: PipelineConfig, run_dir: pathlib.Path, step: int | None = None
                     ) -> dict:
    """Probes of every layer of the base model at pretraining checkpoint `step` (latest),
    fitted on fresh D trajectories and evaluated on an independent stream: JSON-ready
    per-layer train/eval accuracy, eval accuracy and p(correct) by position within a subgoal
    segment, chance and majority baselines (`probes.probe_layers`)."""
    pipe = stages(cfg)
    model = pipe.load_base_model(cfg, run_dir, step)
    return probe_layers(model, pipe.make_dataset(cfg, pipe.SEED_PROBE),
                        pipe.make_dataset(cfg, pipe.SEED_PROBE + 10),
                        pipe.make_env(cfg).num_subgoals, cfg.probe,
                        jax.random.key(cfg.seed * 100 + pipe.SEED_PROBE), cfg.model.depth + 1)


def run_probe(cfg: PipelineConfig, run_dir: str | pathlib.Path) -> dict:
    """Fits per-layer subgoal probes on fresh expert data; writes results + plots.

    The latest checkpoint is the main result; `probe.checkpoints` adds earlier pretraining
    steps (those present on disk) for the accuracy-vs-training-step view (Fig. A1).
    """
    run_dir = pathlib.Path(run_dir)
    out = run_dir / "probe"
    results = probe_checkpoints(run_dir, cfg.probe.checkpoints,
                                lambda step: probe_checkpoint(cfg, run_dir, step))
    by_step = results["by_checkpoint"]
    layers = results["layers"]
    chance = results["chance"]
    _plot_lines(out / "probe_accuracy_by_layer.png", layers,
                {"held-out": results["eval_accuracy"], "train": results["train_accuracy"]},
                "Linear probe: subgoal decoding per layer", "residual layer l",
                "accuracy", hline=("chance", chance))
    pos = np.arange(cfg.probe.max_position)
    by_pos = np.asarray(results["eval_accuracy_by_position"], dtype=float)
    _plot_lines(out / "probe_accuracy_by_position.png", pos,
                {f"layer {i}": by_pos[i] for i in layers},
                "Probe accuracy vs steps since the subgoal began", "position in segment",
                "accuracy", hline=("chance", chance))
    if by_step:
        _plot_lines(out / "probe_accuracy_by_checkpoint.png", layers,
                    {f"step {k}": v["eval_accuracy"] for k, v in by_step.items()},
                    "Held-out probe accuracy per layer across pretraining", "residual layer l",
                    "accuracy", hline=("chance", chance))
    return results


def _control_optimizer(cfg: PipelineConfig) -> OptimizerConfig:
    c = cfg.control
    return OptimizerConfig(name="adamw", learning_rate=c.learning_rate, schedule="constant",
                           weight_decay=c.weight_decay, total_steps=c.steps, grad_clip_norm=1.0)


def make_controlled_eval(cfg: PipelineConfig, graphdef, tasks, num_episodes: int):
    """Jitted (params, frozen, key) -> episodes of the label-switched controlled model."""
    return make_policy_eval(stages(cfg).make_env(cfg), graphdef, tasks, num_episodes,
                            greedy=cfg.control.greedy, labelled=True)


def train_controller(cfg: PipelineConfig, run_dir: pathlib.Path, layer: int, *,
                     verbose: bool = True):
    """Trains (or resumes) the layer-`layer` controller on D*; returns (graphdef,
    TrainState)."""
    pipe = stages(cfg)
    base = pipe.load_base_model(cfg, run_dir)
    num_codes = pipe.make_env(cfg).num_subgoals
    model = ControlledModel(base, layer, num_codes, cfg.control.rank, cfg.control.hidden,
                            rngs=nnx.Rngs(cfg.seed * 100 + pipe.SEED_CONTROL + layer))
    tx = make_optimizer(_control_optimizer(cfg))
    graphdef, state = create_train_state(model, tx, jax.random.key(cfg.seed * 100 + layer),
                                         trainable=CONTROLLER_PARAMS)
    step_fn = make_train_step(graphdef, controller_loss, tx)
    data = pipe.make_dataset(cfg, pipe.SEED_CONTROL, cfg.control.batch_size, star=True)
    layer_dir = run_dir / "control" / f"layer_{layer}"
    ckpt_cfg = dict(pipe.pretrain_checkpoint_config(cfg), control=to_dict(cfg.control),
                    layer=layer)
    ckpt = Checkpointer(layer_dir / "checkpoints", max_to_keep=1, config=ckpt_cfg,
                        ignore_config_keys=["control.layers", "control.eval_episodes",
                                            "control.save_every", "control.greedy",
                                            "pretrain.eval_every", "pretrain.eval_episodes",
                                            "pretrain.log_every", "pretrain.save_every"])
    progress = Progress(cfg.control.steps, name=f"control l={layer}",
                        start_step=ckpt.latest_step() or 0)
    with MetricsWriter(layer_dir / "metrics.jsonl") as writer:
        state = train(state, step_fn, data, cfg.control.steps, checkpointer=ckpt,
                      save_every=cfg.control.save_every, metrics_writer=writer, log_every=25,
                      progress=(lambda s, m=None: progress.update(s, m)) if verbose else None)
    ckpt.close()
    return graphdef, state


def run_control(cfg: PipelineConfig, run_dir: str | pathlib.Path, *, verbose: bool = True
                ) -> dict:
    """Sweeps the insertion layer; per layer: train, then evaluate on the held-out task,
    the pretraining tasks and (where the environment has it) the seen-transition task."""
    run_dir = pathlib.Path(run_dir)
    out = run_dir / "control"
    out.mkdir(parents=True, exist_ok=True)
    pipe = stages(cfg)
    post_task = task_table(cfg, "heldout")[None]
    has_seen = "seen_transitions" in pipe.TASKS
    n_eval = cfg.control.eval_episodes
    key = jax.random.key(cfg.seed * 100 + pipe.SEED_EVAL + 7)
    base_file = out / "uncontrolled.json"
    if not base_file.exists():
        base = pipe.load_base_model(cfg, run_dir)
        graphdef, params, frozen = nnx.split(base, nnx.Param, ...)
        base_eval = make_policy_eval(pipe.make_env(cfg), graphdef, post_task, n_eval,
                                     greedy=cfg.control.greedy)
        base_res = summarize(base_eval(params, frozen, key))
        base_file.write_text(json.dumps(base_res, indent=2))
    base_res = json.loads(base_file.read_text())

    per_layer = {}
    for layer in cfg.control_layers:
        f = out / f"layer_{layer}" / "results.json"
        if not f.exists():
            t0 = time.time()
            graphdef, state = train_controller(cfg, run_dir, layer, verbose=verbose)
            t_train = time.time() - t0
            post = make_controlled_eval(cfg, graphdef, post_task, n_eval)
            pre = make_controlled_eval(cfg, graphdef, task_table(cfg, "pretrain"), n_eval)
            res = dict(layer=layer, train_seconds=t_train,
                       post_task=summarize(post(state.params, state.frozen, key)),
                       pretrain_tasks=summarize(pre(state.params, state.frozen, key)),
                       wall_seconds=time.time() - t0)
            f.write_text(json.dumps(res, indent=2))
            if verbose:
                print(f"[control] layer {layer}: post-task success "
                      f"{res['post_task']['success_rate']:.3f}", flush=True)
        res = json.loads(f.read_text())
        if has_seen and "seen_transition_task" not in res:
            # the diagnostic task's evaluation, added to results of earlier runs without
            # retraining (train_controller restores the finished controller)
            graphdef, state = train_controller(cfg, run_dir, layer, verbose=False)
            seen = make_controlled_eval(cfg, graphdef, task_table(cfg, "seen_transitions")[None],
                                        n_eval)
            res["seen_transition_task"] = summarize(seen(state.params, state.frozen, key))
            f.write_text(json.dumps(res, indent=2))
        per_layer[layer] = res

    layers = sorted(per_layer)
    results = dict(
        layers=layers,
        post_task_success=[per_layer[layer]["post_task"]["success_rate"] for layer in layers],
        post_task_progress=[per_layer[layer]["post_task"]["mean_progress"] for layer in layers],
        pretrain_task_success=[per_layer[layer]["pretrain_tasks"]["success_rate"] for layer in layers],
        uncontrolled_post_task=base_res, eval_episodes=n_eval)
    if has_seen:
        results["seen_transition_task_success"] = [
            per_layer[layer]["seen_transition_task"]["success_rate"] for layer in layers]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot_lines(out / "controller_success_by_layer.png", layers,
                {"held-out task, GT-switched controllers": results["post_task_success"],
                 "held-out task, fraction of colours reached": results["post_task_progress"]},
                "Supervised controllers vs insertion layer", "insertion layer l",
                "success rate", hline=("uncontrolled base", base_res["success_rate"]))
    return results
