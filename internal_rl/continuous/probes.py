"""Linear subgoal probes on the Hawk base model's residual streams (spec §5.1).

The probe machinery is `internal_rl.probes` unchanged: `collect` reads the residual
streams e_{t,0..L} of any model whose `__call__(obs, return_residuals=True)` returns them
(the Hawk model does) at the valid steps of expert batches, and `fit_probes` /
`evaluate_probes` only see features and labels. The label is the next colour (4
classes). `run_probe(cfg, run_dir)` writes run_dir/probe/results.json.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax

from common.checkpoint import Checkpointer
from internal_rl.continuous.config import Config
from internal_rl.continuous.pretrain import SEED_PROBE, load_base_model, make_dataset, make_env
from internal_rl.models.hawk import HawkModel
from internal_rl.probes import collect, evaluate_probes, fit_probes


def probe_model(cfg: Config, model: HawkModel) -> dict:
    """Fits one probe per layer on fresh D trajectories and evaluates it on an independent
    stream. Returns JSON-ready lists: per-layer train/eval accuracy, eval accuracy and
    p(correct) by position within a subgoal segment, chance and majority baselines."""
    pc = cfg.probe
    num_classes = make_env(cfg).num_subgoals
    train_data = collect(model, make_dataset(cfg, SEED_PROBE), pc.train_trajectories)
    eval_data = collect(model, make_dataset(cfg, SEED_PROBE + 10), pc.eval_trajectories)
    params, losses = fit_probes(train_data, num_classes, jax.random.key(cfg.seed * 100 + SEED_PROBE),
                                pc.steps, pc.batch_size, pc.learning_rate, pc.weight_decay)
    ev = evaluate_probes(params, eval_data, pc.max_position)
    tr = evaluate_probes(params, train_data, pc.max_position)
    return dict(
        layers=list(range(cfg.model.depth + 1)),
        eval_accuracy=ev["accuracy"].tolist(), train_accuracy=tr["accuracy"].tolist(),
        eval_accuracy_by_position=ev["accuracy_by_position"].tolist(),
        eval_p_true_by_position=ev["p_true_by_position"].tolist(),
        position_counts=ev["position_counts"].tolist(), chance=1.0 / num_classes,
        majority_baseline=ev["majority_baseline"], train_tokens=tr["num_tokens"],
        eval_tokens=ev["num_tokens"], first_train_loss=float(losses[:20].mean()),
        final_train_loss=float(losses[-20:].mean()))


def run_probe(cfg: Config, run_dir: str | pathlib.Path) -> dict:
    """Probes the latest pretraining checkpoint and, for the Fig. A1 view, the earlier
    steps in cfg.probe.checkpoints that exist on disk; writes run_dir/probe/results.json."""
    run_dir = pathlib.Path(run_dir)
    out = run_dir / "probe"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = probe_model(cfg, load_base_model(cfg, run_dir))
    with Checkpointer(run_dir / "pretrain" / "checkpoints") as ckpt:
        available = set(ckpt.all_steps())
    by_step = {}
    for step in cfg.probe.checkpoints:
        if step not in available:
            print(f"[probe] no pretraining checkpoint at step {step}; skipped", flush=True)
            continue
        r = probe_model(cfg, load_base_model(cfg, run_dir, step))
        by_step[str(step)] = dict(eval_accuracy=r["eval_accuracy"],
                                  train_accuracy=r["train_accuracy"])
    results.update(by_checkpoint=by_step, wall_seconds=time.time() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
