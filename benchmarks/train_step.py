"""Decoder-only transformer train-step throughput vs the machine's measured matmul peak.

For a few model sizes: tokens/s of the jitted `common.train` step (AdamW, causal LM loss)
and the achieved GFLOP/s, next to the GFLOP/s of a large float32 `jnp.dot` timed in the same
run; the ratio is the fraction of the matmul peak the train step reaches. FLOPs per step come
from XLA's cost analysis of the compiled step (what actually runs), with the analytic
6·N·tokens + attention estimate alongside for reference.

    python benchmarks/train_step.py [--out benchmarks/results/train_step.json] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from common import nn, train
from common.report import hardware, markdown_table, write_json

if __package__:  # python -m benchmarks.train_step
    from .timing import time_call
else:  # python benchmarks/train_step.py: this folder is first on sys.path
    from timing import time_call


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    depth: int
    width: int
    heads: int
    seq_len: int
    batch: int
    vocab: int = 512


SIZES = (
    Size("xs", depth=2, width=128, heads=4, seq_len=128, batch=8),
    Size("s", depth=4, width=256, heads=4, seq_len=256, batch=8),
    Size("m", depth=6, width=512, heads=8, seq_len=256, batch=8),
)


class DecoderLM(nnx.Module):
    def __init__(self, size: Size, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(size.vocab, size.width, rngs=rngs)
        self.stack = nn.TransformerStack(
            size.depth,
            size.width,
            size.heads,
            4 * size.width,
            activation="swiglu",
            position="rope",
            rngs=rngs,
        )
        self.head = nnx.Linear(size.width, size.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        T = tokens.shape[1]
        return self.head(self.stack(self.embed(tokens), mask=nn.causal_mask(T)).out)


def lm_loss(model, batch, key):
    del key
    logits = model(batch[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()
    return nll, {}


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, dict]:
    """(GFLOP/s of a float32 n x n jnp.dot at the median time, its timing record)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    rec = time_call(lambda: dot(a, b), repeats=repeats)
    return 2 * n**3 / rec["median_s"] / 1e9, rec


def bench_size(size: Size, repeats: int) -> dict:
    model = DecoderLM(size, rngs=nnx.Rngs(0))
    tx = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-3, total_steps=1000))
    graphdef, state = train.create_train_state(model, tx, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step = train.make_train_step(graphdef, lm_loss, tx, donate=True)
    tokens = jax.random.randint(jax.random.key(1), (size.batch, size.seq_len + 1), 0, size.vocab)

    t0 = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], tokens)
        return metrics["loss"]

    rec = time_call(run, repeats=repeats)
    seconds = rec["median_s"]
    tokens_per_step = size.batch * size.seq_len
    non_embed = n_params - size.vocab * size.width
    analytic = (
        6 * non_embed * tokens_per_step
        + 12 * size.depth * size.seq_len * size.width * tokens_per_step
    )
    return {
        **dataclasses.asdict(size),
        "params": int(n_params),
        "compile_s": round(compile_s, 2),
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens_per_step / seconds,
        "xla_gflop_per_step": xla_flops / 1e9,
        "analytic_gflop_per_step": analytic / 1e9,
        "achieved_gflops": xla_flops / seconds / 1e9,
        "timing": rec,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("--quick", action="store_true", help="smallest size only, 2 repeats")
    args = parser.parse_args(argv)
    sizes = SIZES[:1] if args.quick else SIZES
    repeats = 2 if args.quick else 5

    peak, peak_timing = matmul_peak(1024 if args.quick else 2048)
    rows = [bench_size(s, repeats) for s in sizes]
    for row in rows:
        row["fraction_of_matmul_peak"] = row["achieved_gflops"] / peak
    print(f"matmul peak (float32 jnp.dot): {peak:.1f} GFLOP/s on {jax.default_backend()}")
    print(
        markdown_table(
            [
                "size",
                "params",
                "B x T",
                "step ms",
                "tokens/s",
                "GFLOP/step (XLA)",
                "GFLOP/s",
                "/ peak",
            ],
            [
                [
                    r["name"],
                    r["params"],
                    f"{r['batch']}x{r['seq_len']}",
                    r["step_ms"],
                    r["tokens_per_s"],
                    r["xla_gflop_per_step"],
                    r["achieved_gflops"],
                    r["fraction_of_matmul_peak"],
                ]
                for r in rows
            ],
            fmt="{:.3g}",
        )
    )
    # Other processes on a small machine skew both numbers; the ratio is less sensitive.
    result = {
        "matmul_peak_gflops": peak,
        "matmul_peak_timing": peak_timing,
        "sizes": rows,
        "hardware": hardware(),
        "load_average_1m": os.getloadavg()[0],
    }
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
