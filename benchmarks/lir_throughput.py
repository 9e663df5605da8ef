"""lir throughput: phase-F training examples/s (SFT and LIVR stage-1 steps, the jitted
``common.train`` step with the arm's trainable filter) and evaluation examples/s (validation
accuracy and the full test diagnostics of ``lir.evaluate``) at the tiny and small presets.

Weights are random (throughput does not depend on them); batches are real task records at the
preset's layout (the relational task ``relative_reflectance``, padded to the preset's image
slots, so every task has this cost).

    python benchmarks/lir.py [--out benchmarks/results/lir.json] [--presets tiny,small]
        [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common.config import get_preset  # noqa: E402
from common.data import ArrayIterator  # noqa: E402
from common.report import hardware, markdown_table, write_json  # noqa: E402
from common.train import create_train_state, make_optimizer, make_train_step  # noqa: E402
from lir import evaluate as ev  # noqa: E402
from lir import train as T  # noqa: E402
from lir.config import PRESETS, layout, model_config, stage_optimizer  # noqa: E402
from lir.data import collate, drop_latents  # noqa: E402
from lir.model import LMM, add_lora  # noqa: E402
from lir.tasks import generate  # noqa: E402

TASK = "relative_reflectance"


def _model(cfg):
    model = LMM(model_config(cfg), rngs=nnx.Rngs(0))
    add_lora(model, cfg.finetune.lora, rngs=nnx.Rngs(1))
    return model


def bench_train(cfg, trainable: str, variant: str, latents: bool, steps: int) -> dict:
    ft = cfg.finetune
    records = generate(TASK, 8 * ft.batch_size, 0, "train", cfg.data.image_size)
    data = collate(records, layout(cfg, ft.num_latents))
    data = data if latents else drop_latents(data)
    opt = stage_optimizer(ft, 1000)
    tx = make_optimizer(opt)
    graphdef, state = create_train_state(_model(cfg), tx, 0, trainable=T.FILTERS[trainable])
    step = make_train_step(graphdef, T._batch_loss(variant), tx)
    it = ArrayIterator(data._asdict(), ft.batch_size, seed=0)
    t0 = time.perf_counter()
    state, m = step(state, it.next())
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, it.next())
    jax.block_until_ready(m)
    sec = time.perf_counter() - t0
    return {"compile_s": compile_s, "step_ms": 1e3 * sec / steps,
            "examples_per_s": steps * ft.batch_size / sec, "batch_size": ft.batch_size,
            "seq_len": int(data.tokens.shape[1])}


def bench_eval(cfg, kind: str, n: int) -> dict:
    records = generate(TASK, n, 0, "test", cfg.data.image_size)
    data = collate(records, layout(cfg, cfg.finetune.num_latents))
    model = _model(cfg)
    fn = ev.accuracy if kind == "accuracy" else ev.diagnostics
    bs = cfg.finetune.eval_batch_size
    t0 = time.perf_counter()
    fn(model, T.take_rows(data, bs), bs)  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn(model, data, bs)
    sec = time.perf_counter() - t0
    return {"compile_s": compile_s, "examples_per_s": n / sec, "n": n, "batch_size": bs}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lir.json")
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=40, help="timed train steps per arm")
    parser.add_argument("--eval-n", type=int, default=400, help="examples per timed eval")
    args = parser.parse_args(argv)
    rows = []
    for name in args.presets.split(","):
        cfg = get_preset(PRESETS, name)
        for arm, trainable, variant, latents in (("sft", "lora", "causal", False),
                                                 ("livr_stage1", "livr", "bottleneck", True)):
            r = bench_train(cfg, trainable, variant, latents, args.steps)
            rows.append({"preset": name, "what": f"train {arm}", **r})
        for kind in ("accuracy", "diagnostics"):
            r = bench_eval(cfg, kind, args.eval_n)
            rows.append({"preset": name, "what": f"eval {kind}", **r})
    print(markdown_table(
        ["preset", "what", "examples/s", "step ms", "batch", "seq len", "compile s"],
        [[r["preset"], r["what"], r["examples_per_s"], r.get("step_ms"), r["batch_size"],
          r.get("seq_len"), r["compile_s"]] for r in rows], fmt="{:.3g}"))
    result = {"rows": rows, "hardware": hardware(),
              "note": "random weights; relative_reflectance records; CPU shared with other "
                      "processes, so treat as approximate"}
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
