"""The whole internal-RL reproduction as one resumable chain (docs/internal_rl.md D22).

    pretrain -> probes -> supervised controllers -> metacontroller α sweep (frozen base,
    β ≡ 1, co-trained) -> internal RL vs raw-action RL vs β ≡ 1 vs co-trained (seeds)
    -> report.md + results.json + figures (Figs. 6, 7, 8 analogues, `internal_rl.report`)

`reproduce(cfg, run_dir)` skips every piece whose result is already on disk (and the
trainers resume from their checkpoints), so re-running the same command after an
interruption continues where it stopped. Every cached result goes through a
`common.report.StageClock`, which stores the seconds its computation took, so a report
rebuilt from caches still states what each stage cost. RL runs are cached one file per
(method, seed) in run_dir/rl/.

RL methods: internal RL on the frozen-base metacontroller of the selected α; raw-action RL
on the base model; internal RL on the β ≡ 1 metacontroller (no temporal abstraction) and
on the co-trained metacontroller (with its co-trained base). The α is selected by switch
alignment with the ground-truth subgoals (`metacontroller_train.select_alpha`), not by
downstream RL success as in the paper (C.5.5), which would multiply the RL cost.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from common.report import StageClock
from common.rng import stream_seed
from internal_rl.pipeline import PipelineConfig, stages, task_table
from internal_rl.report import write_report


def stage_pretrain(
    cfg: PipelineConfig, run_dir: pathlib.Path, clock: StageClock, verbose: bool
) -> dict:
    summary = run_dir / "pretrain" / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("step") != cfg.pretrain.steps:
        summary.unlink()  # the run was extended: train on from the checkpoint
    return clock.cached(
        "pretrain", summary, lambda: stages(cfg).run_pretrain(cfg, run_dir, verbose=verbose)
    )


def stage_probe(cfg: PipelineConfig, run_dir: pathlib.Path, clock: StageClock) -> dict:
    from internal_rl.analysis import run_probe

    return clock.cached(
        "probe", run_dir / "probe" / "results.json", lambda: run_probe(cfg, run_dir)
    )


def stage_control(
    cfg: PipelineConfig, run_dir: pathlib.Path, clock: StageClock, verbose: bool
) -> dict:
    from internal_rl.analysis import run_control

    return run_control(cfg, run_dir, verbose=verbose, clock=clock)  # caches per layer


def stage_metacontroller(
    cfg: PipelineConfig, run_dir: pathlib.Path, verbose: bool, clock: StageClock | None = None
) -> dict:
    """Frozen α sweep, β ≡ 1 at the selected α, co-trained sweep."""
    from internal_rl.metacontroller_train import Variant, run_alpha_sweep, run_variant, select_alpha

    clock = StageClock() if clock is None else clock
    frozen = run_alpha_sweep(cfg, run_dir, verbose=verbose, clock=clock)
    alpha = select_alpha(frozen)
    beta1 = run_variant(
        cfg, run_dir, Variant(alpha, temporal_abstraction=False), verbose=verbose, clock=clock
    )
    cot_alphas = cfg.reproduce.cotrain_alphas or cfg.mctrain.alphas
    needs_cotrain = "cotrained" in cfg.reproduce.methods or cfg.reproduce.cotrain_alphas
    cotrained = (
        run_alpha_sweep(
            cfg, run_dir, cot_alphas, cotrain=True, seeds=1, verbose=verbose, clock=clock
        )
        if needs_cotrain
        else []
    )
    cot_alpha = select_alpha(cotrained) if cotrained else None
    return dict(
        frozen=frozen,
        selected_alpha=alpha,
        beta1=beta1,
        cotrained=cotrained,
        cotrained_alpha=cot_alpha,
    )


def _rl_subject(cfg: PipelineConfig, run_dir: pathlib.Path, method: str, mc: dict):
    """(base model, metacontrolled model or None) that `method` runs RL on."""
    from internal_rl.metacontroller_train import Variant, load_variant

    if method == "raw_action_rl":
        return stages(cfg).load_base_model(cfg, run_dir), None
    variant = {
        "internal_rl": Variant(mc["selected_alpha"]),
        "no_temporal_abstraction": Variant(mc["selected_alpha"], temporal_abstraction=False),
        "cotrained": Variant(
            mc["cotrained_alpha"] if mc["cotrained_alpha"] is not None else mc["selected_alpha"],
            cotrain=True,
        ),
    }[method]
    model = load_variant(cfg, run_dir, variant)
    return model.base, model


def rl_cache_path(run_dir: pathlib.Path, task: str, method: str, seed: int) -> pathlib.Path:
    """One JSON per (task, method, seed); the held-out task's directly under rl/."""
    sub = run_dir / "rl" if task == "heldout" else run_dir / "rl" / task
    return sub / f"{method}_seed{seed}.json"


def stage_rl(
    cfg: PipelineConfig, run_dir: pathlib.Path, mc: dict, clock: StageClock, verbose: bool
) -> dict:
    """{task: {method: [per-seed curve dicts]}}; each (task, method, seed) cached."""
    from internal_rl.rl import run_internal_rl, run_raw_action_rl

    env = stages(cfg).make_env(cfg)
    log = print if verbose else (lambda *a, **k: None)
    curves: dict[str, dict[str, list[dict]]] = {}
    for task_name in cfg.reproduce.rl_tasks:
        task = task_table(cfg, task_name)
        curves[task_name] = by_method = {}
        methods = [
            m
            for m in cfg.reproduce.methods
            if task_name == "heldout" or m in cfg.reproduce.diagnostic_methods
        ]
        for method in methods:
            by_method[method] = []
            for seed in range(cfg.reproduce.rl_seeds):

                def compute(method=method, seed=seed, task=task):
                    base, model = _rl_subject(cfg, run_dir, method, mc)
                    rl_seed = stream_seed(cfg.seed, "rl", seed)
                    if method == "raw_action_rl":
                        rl_cfg = dataclasses.replace(
                            cfg.rl,
                            optim=dataclasses.replace(
                                cfg.rl.optim, learning_rate=cfg.reproduce.raw_learning_rate
                            ),
                        )
                        res = run_raw_action_rl(rl_cfg, base, env, task, rl_seed, log=log)
                    else:
                        res = run_internal_rl(cfg.rl, base, model, env, task, rl_seed, log=log)
                    return dict(
                        method=method,
                        seed=seed,
                        episodes=res.episodes.tolist(),
                        success_rate=res.success_rate.tolist(),
                        decisions_per_episode=res.decisions_per_episode.tolist(),
                        wall_seconds=float(res.wall_seconds),
                    )

                path = rl_cache_path(run_dir, task_name, method, seed)
                by_method[method].append(clock.cached("rl", path, compute))
    return curves


def run_stages(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    clock: StageClock,
    *,
    rl: bool = True,
    verbose: bool = True,
) -> dict:
    """Runs (or reads back) every stage; returns their outputs by stage name (what
    `internal_rl.report.write_report` reads). rl=False stops after the metacontroller."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parts: dict = {}

    def stage(name, fn):
        before = clock.seconds.get(name, 0.0)
        parts[name] = fn()
        if verbose:
            print(
                f"== reproduce: {name} ({clock.seconds.get(name, 0.0) - before:.0f} s of compute)",
                flush=True,
            )

    stage("pretrain", lambda: stage_pretrain(cfg, run_dir, clock, verbose))
    stage("probe", lambda: stage_probe(cfg, run_dir, clock))
    stage("control", lambda: stage_control(cfg, run_dir, clock, verbose))
    stage("metacontroller", lambda: stage_metacontroller(cfg, run_dir, verbose, clock))
    if rl and cfg.reproduce.methods:
        stage("rl", lambda: stage_rl(cfg, run_dir, parts["metacontroller"], clock, verbose))
    return parts


def reproduce(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    *,
    preset: str | None = None,
    verbose: bool = True,
    rl: bool = True,
    command: str | None = None,
) -> dict:
    """Runs (or resumes) every stage and writes report.md + results.json into run_dir;
    returns the results dict (the "results" of results.json). rl=False stops after the
    metacontroller stage (the report then has no Fig. 8)."""
    clock = StageClock()
    parts = run_stages(cfg, run_dir, clock, rl=rl, verbose=verbose)
    md, js = write_report(
        cfg, pathlib.Path(run_dir), parts, preset=preset, command=command, clock=clock
    )
    if verbose:
        print(f"wrote {md} and {js}", flush=True)
    return json.loads(pathlib.Path(js).read_text())["results"]
