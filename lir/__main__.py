"""CLI: python -m lir reproduce|pretrain --preset tiny|small|paper --run-dir DIR
[--set key=value ...] [--pretrain-cache DIR] [--quiet]
     python -m lir plan --preset paper [--devices N] [--accelerator h100] [--out reports/plan]

``reproduce`` writes DIR/report.md and DIR/results.json (``lir.reproduce``); ``pretrain``
only runs (or loads) the cached phase-P model and prints its held-out skill accuracy. Both
resume: rerunning the same command continues where an interrupted one stopped. The phase-P
cache defaults to DIR/../lir_pretrain_cache, so runs side by side share one pretrained model.
``plan`` lowers and compiles every training stage of the preset for N simulated devices and
writes ``OUT/lir_<N>dev.{md,json}`` (``lir.plan``).

Every command starts with ``common.runtime.start_process()``: with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, the same command runs as one process of a
multi-host job.

``python -m lir finetune|evaluate --backbone qwen2_5_vl ...`` (LIVR / SFT of a local Qwen2.5-VL
checkpoint on BLINK-format data) is handled by ``lir.finetune_cli``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from common.config import ConfigError, add_config_args, config_from_args
from common.report import command_line
from common.runtime import start_process, start_run_dir
from lir.config import PRESETS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("finetune", "evaluate"):
        # pretrained-backbone fine-tuning / evaluation (Qwen2.5-VL): lir/finetune_cli.py
        from lir import finetune_cli

        return finetune_cli.main(argv)
    if argv and argv[0] == "plan":
        return plan(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m lir", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("reproduce", "pretrain"))
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--run-dir", required=True, help="output directory")
    parser.add_argument(
        "--pretrain-cache",
        default=None,
        help="phase-P cache root (default: RUN_DIR/../lir_pretrain_cache)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(PRESETS, args)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    start_process()
    run_dir = start_run_dir(args.run_dir, cfg)
    cache = (
        pathlib.Path(args.pretrain_cache)
        if args.pretrain_cache
        else (run_dir.resolve().parent / "lir_pretrain_cache")
    )
    # Imported after parsing so `--help` and config errors do not pay for JAX start-up.
    from lir import reproduce, train

    if args.command == "pretrain":
        pre = train.pretrain(cfg, cache, verbose=not args.quiet)
        print(json.dumps({"directory": str(pre.directory), **pre.metrics}, indent=1))
        return 0
    reproduce.reproduce(
        cfg,
        run_dir,
        preset=args.preset,
        cache_root=cache,
        verbose=not args.quiet,
        command=command_line(),
    )
    return 0


def plan(argv: list[str]) -> int:
    """``python -m lir plan``: see the module docstring."""
    from common import plan as cp

    parser = argparse.ArgumentParser(
        prog="python -m lir plan", description="plan every training stage of a preset"
    )
    add_config_args(parser, default_preset="paper")
    cp.add_plan_args(parser)
    parser.add_argument(
        "--models",
        default="lmm,qwen2_5_vl",
        help="comma-separated planners: lmm (this suite's LMM, phases P and F) "
        "and qwen2_5_vl (the pretrained 3B/7B fine-tuning, --devices 1)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(PRESETS, args)
        accelerator = cp.accelerator_from_args(args)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    from lir.plan import PLANNERS

    known = [name for name, _ in PLANNERS]
    unknown = sorted({m.strip() for m in args.models.split(",") if m.strip()} - set(known))
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected a comma-separated subset of {known}")
    # compile times are part of the plan, so compiles are not served from the persistent cache
    start_process(compilation_cache=False)
    # before any JAX array exists (importing lir creates none)
    cp.set_host_device_count(args.devices)
    from common.distributed import make_mesh
    from lir.plan import run_plan

    rows = run_plan(cfg, args, make_mesh(), accelerator)
    path = cp.write_plan(rows, args.out, "lir", args.preset, command_line())
    print(pathlib.Path(path).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
