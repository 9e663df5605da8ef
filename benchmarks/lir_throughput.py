"""lir throughput: phase-F training examples/s (SFT and LIVR stage-1 steps, the jitted
``common.train`` step with the arm's trainable filter) and evaluation examples/s (validation
accuracy and the full test diagnostics of ``lir.evaluate``) at the tiny and small presets.

Weights are random (throughput does not depend on them); batches are real task records at the
preset's layout (the relational task ``relative_reflectance``, padded to the preset's image
slots, so every task has this cost).

Each timed block follows a warm-up (one train step, one eval batch) reported as compile_s;
the machine's background load is in each row's "timing" (`benchmarks/timing.py`). (The file
is not named lir.py: run as a file, this folder is first on sys.path and would shadow lir.)

    python benchmarks/lir_throughput.py [--out benchmarks/results/lir.json]
        [--presets tiny,small] [--steps 40] [--eval-n 400] [--repeats 1]
"""

from __future__ import annotations

import argparse

import numpy as np
from flax import nnx

from common.config import get_preset
from common.data import ArrayIterator
from common.report import hardware, markdown_table, write_json
from common.train import create_train_state, make_optimizer, make_train_step
from lir import evaluate as ev
from lir import train as T
from lir.config import PRESETS, layout, model_config, stage_optimizer
from lir.data import collate, drop_latents
from lir.model import LMM, add_lora
from lir.tasks import generate

if __package__:  # python -m benchmarks.lir_throughput
    from .timing import time_call
else:  # python benchmarks/lir_throughput.py: this folder is first on sys.path
    from timing import time_call

TASK = "relative_reflectance"


def _model(cfg):
    model = LMM(model_config(cfg), rngs=nnx.Rngs(0))
    add_lora(model, cfg.finetune.lora, rngs=nnx.Rngs(1))
    return model


def bench_train(cfg, trainable: str, variant: str, latents: bool, steps: int, repeats: int) -> dict:
    ft = cfg.finetune
    records = generate(TASK, 8 * ft.batch_size, 0, "train", cfg.data.image_size)
    data = collate(records, layout(cfg, ft.num_latents))
    data = data if latents else drop_latents(data)
    opt = stage_optimizer(ft, 1000)
    tx = make_optimizer(opt)
    graphdef, state = create_train_state(_model(cfg), tx, 0, trainable=T.FILTERS[trainable])
    step = make_train_step(graphdef, T._batch_loss(variant), tx)
    it = ArrayIterator(data._asdict(), ft.batch_size, seed=0)
    holder = {"state": state}

    def run(n: int):
        # n steps in a row: the state is carried from step to step as in training
        for _ in range(n):
            holder["state"], m = step(holder["state"], it.next())
        return m

    t = time_call(lambda: run(steps), repeats=repeats, warmup=lambda: run(1))
    sec = t["median_s"]
    return {
        "compile_s": t["compile_s"],
        "step_ms": 1e3 * sec / steps,
        "examples_per_s": steps * ft.batch_size / sec,
        "batch_size": ft.batch_size,
        "seq_len": int(data.tokens.shape[1]),
        "steps": steps,
        "timing": t,
    }


def bench_eval(cfg, kind: str, n: int, repeats: int) -> dict:
    records = generate(TASK, n, 0, "test", cfg.data.image_size)
    data = collate(records, layout(cfg, cfg.finetune.num_latents))
    model = _model(cfg)
    fn = ev.accuracy if kind == "accuracy" else ev.diagnostics
    bs = cfg.finetune.eval_batch_size
    # one batch compiles the per-batch program; the timed call runs all n examples
    t = time_call(
        lambda: fn(model, data, bs),
        repeats=repeats,
        warmup=lambda: fn(model, T.take_rows(data, bs), bs),
    )
    return {
        "compile_s": t["compile_s"],
        "examples_per_s": n / t["median_s"],
        "n": n,
        "batch_size": bs,
        "timing": t,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lir.json")
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=40, help="timed train steps per arm")
    parser.add_argument("--eval-n", type=int, default=400, help="examples per timed eval")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed blocks (of --steps train steps, of one --eval-n eval) per arm",
    )
    args = parser.parse_args(argv)
    rows = []
    for name in args.presets.split(","):
        cfg = get_preset(PRESETS, name)
        for arm, trainable, variant, latents in (
            ("sft", "lora", "causal", False),
            ("livr_stage1", "livr", "bottleneck", True),
        ):
            r = bench_train(cfg, trainable, variant, latents, args.steps, args.repeats)
            rows.append({"preset": name, "what": f"train {arm}", **r})
        for kind in ("accuracy", "diagnostics"):
            r = bench_eval(cfg, kind, args.eval_n, args.repeats)
            rows.append({"preset": name, "what": f"eval {kind}", **r})
    print(
        markdown_table(
            ["preset", "what", "examples/s", "step ms", "batch", "seq len", "compile s"],
            [
                [
                    r["preset"],
                    r["what"],
                    r["examples_per_s"],
                    r.get("step_ms"),
                    r["batch_size"],
                    r.get("seq_len"),
                    r["compile_s"],
                ]
                for r in rows
            ],
            fmt="{:.3g}",
        )
    )
    result = {
        "rows": rows,
        "hardware": hardware(),
        "note": "random weights; relative_reflectance records; CPU shared with other "
        "processes, so treat as approximate",
    }
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
