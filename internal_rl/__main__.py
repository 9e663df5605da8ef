"""CLI: python -m internal_rl pretrain|probe|control|metacontroller|all|reproduce
[--env gridworld|point|ant] --preset tiny|small|paper [--set key=value ...] --run-dir DIR
(and: report --run-dir DIR [--out reports/internal_rl]; plan [--env E] --preset paper
--devices N, see `internal_rl.plan`)

--env picks the environment family: the grid world (transformer base model, the default)
or a continuous pinpad in MJX (Hawk base model; `point` uses the continuous presets as they
are, `ant` is their `paper` preset's environment and needs a trained Ant expert for data).

`reproduce` runs the whole chain (pretrain -> probes -> controllers -> metacontroller α
sweep -> internal RL and its baselines) and writes report.md + results.json into DIR;
`metacontroller` runs only the α sweep (frozen base, β ≡ 1, co-trained).

Every stage resumes from what the run directory already holds (pretraining and controller
checkpoints, finished per-layer controller results), so re-running the same command after
an interruption continues the run.

Multi-process: with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, every
process runs the same command on a shared --run-dir and the train steps run data-parallel
over all processes' devices (`common.runtime.start_process`); process 0 writes the run
directory's config, metrics and summaries, every process takes part in checkpointing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from common.config import ConfigError, add_config_args, config_from_args
from common.runtime import start_process, start_run_dir
from internal_rl.pipeline import ENVS, presets_for

STAGES = ("pretrain", "probe", "control", "metacontroller", "all", "reproduce", "report", "plan")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        from internal_rl.plan import main as plan_main

        return plan_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m internal_rl", description=__doc__.split("\n")[0]
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument(
        "--env", choices=ENVS, default="gridworld", help="environment family (default: gridworld)"
    )
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--run-dir", required=True, help="directory for checkpoints and results")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--no-rl", action="store_true", help="reproduce: stop before the RL stage")
    parser.add_argument(
        "--out", default="reports/internal_rl", help="report stage: where base.md and its plots go"
    )
    args = parser.parse_args(argv)
    if args.stage == "report":
        from internal_rl.base_report import write_base_report

        print(f"wrote {write_base_report(args.run_dir, args.out)}")
        return 0
    try:
        cfg = config_from_args(presets_for(args.env), args)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    if args.env != "gridworld" and cfg.env.kind != args.env:
        parser.error(
            f"--env {args.env}: the config's env.kind is {cfg.env.kind!r} (set "
            f"--set env.kind={args.env} or pick the preset of that body)"
        )
    start_process()
    import jax

    # every process of a multi-process run shares run_dir: process 0 writes its config
    run_dir = (
        start_run_dir(args.run_dir, cfg) if jax.process_index() == 0 else pathlib.Path(args.run_dir)
    )

    if args.stage == "reproduce":
        from internal_rl.reproduce import reproduce

        reproduce(cfg, run_dir, preset=args.preset, rl=not args.no_rl, verbose=not args.quiet)
        return 0
    if args.stage == "metacontroller":
        from internal_rl.reproduce import stage_metacontroller

        result = stage_metacontroller(cfg, run_dir, verbose=not args.quiet)
        print(json.dumps({k: v for k, v in result.items() if "alpha" in k}))
        return 0

    # Imported after parsing so `--help` and config errors do not pay for JAX start-up.
    from internal_rl.analysis import run_control, run_probe
    from internal_rl.pipeline import stages as pipeline_stages

    run_pretrain = pipeline_stages(cfg).run_pretrain

    stages = ("pretrain", "probe", "control") if args.stage == "all" else (args.stage,)
    for stage in stages:
        t0 = time.time()
        if stage == "pretrain":
            result = run_pretrain(cfg, run_dir, verbose=not args.quiet)
        elif stage == "probe":
            result = run_probe(cfg, run_dir)
        else:
            result = run_control(cfg, run_dir, verbose=not args.quiet)
        if jax.process_index() == 0:
            with open(run_dir / "stage_times.jsonl", "a") as f:
                f.write(json.dumps({"stage": stage, "seconds": time.time() - t0}) + "\n")
            print(f"== {stage} ({time.time() - t0:.0f} s)")
            print(json.dumps(result, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
