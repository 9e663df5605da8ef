"""Linear subgoal probes on the Hawk base model's residual streams (spec §5.1).

The probe machinery is `internal_rl.probes.probe_layers`, shared with the gridworld: it
reads the residual streams e_{t,0..L} of any model whose `__call__(obs,
return_residuals=True)` returns them (the Hawk model does) at the valid steps of expert
batches, and fits and evaluates the probes on features and labels only. The label is the next colour (4
classes). `run_probe(cfg, run_dir)` writes run_dir/probe/results.json.
"""

from __future__ import annotations

import pathlib

import jax

from internal_rl.continuous.config import Config
from internal_rl.continuous.pretrain import SEED_PROBE, load_base_model, make_dataset, make_env
from internal_rl.models.hawk import HawkModel
from internal_rl.probes import probe_checkpoints, probe_layers


def probe_model(cfg: Config, model: HawkModel) -> dict:
    """Fits one probe per layer on fresh D trajectories and evaluates it on an independent
    stream. Returns JSON-ready lists: per-layer train/eval accuracy, eval accuracy and
    p(correct) by position within a subgoal segment, chance and majority baselines."""
    return probe_layers(model, make_dataset(cfg, SEED_PROBE), make_dataset(cfg, SEED_PROBE + 10),
                        make_env(cfg).num_subgoals, cfg.probe,
                        jax.random.key(cfg.seed * 100 + SEED_PROBE), cfg.model.depth + 1)


def run_probe(cfg: Config, run_dir: str | pathlib.Path) -> dict:
    """Probes the latest pretraining checkpoint and, for the Fig. A1 view, the earlier
    steps in cfg.probe.checkpoints that exist on disk; writes run_dir/probe/results.json."""
    return probe_checkpoints(run_dir, cfg.probe.checkpoints,
                             lambda step: probe_model(cfg, load_base_model(cfg, run_dir, step)))
