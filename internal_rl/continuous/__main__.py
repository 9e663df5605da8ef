"""CLI: python -m internal_rl.continuous pretrain|probe|all
--preset tiny|small|paper [--set key=value ...] --run-dir DIR

Each stage resumes from what the run directory already holds: re-running `pretrain` after
an interruption continues from the latest checkpoint (or extends a finished run when
pretrain.steps grew).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common.config import ConfigError, add_config_args, config_from_args
from common.runtime import enable_compilation_cache, start_run_dir
from internal_rl.continuous.config import PRESETS

STAGES = ("pretrain", "probe", "all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internal_rl.continuous",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--run-dir", required=True, help="directory for checkpoints and results")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(PRESETS, args)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    run_dir = start_run_dir(args.run_dir, cfg)
    enable_compilation_cache()

    # Imported after parsing so `--help` and config errors do not pay for JAX start-up.
    from internal_rl.continuous.pretrain import run_pretrain
    from internal_rl.continuous.probes import run_probe

    stages = ("pretrain", "probe") if args.stage == "all" else (args.stage,)
    for stage in stages:
        t0 = time.time()
        if stage == "pretrain":
            result = run_pretrain(cfg, run_dir, verbose=not args.quiet)
        else:
            result = run_probe(cfg, run_dir)
        with open(run_dir / "stage_times.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage, "seconds": time.time() - t0}) + "\n")
        print(f"== {stage} ({time.time() - t0:.0f} s)")
        print(json.dumps(result, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
