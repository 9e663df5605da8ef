"""Spatia generator cost: training-step time per stage and sampling time per clip, per preset.

For each preset (default tiny and small, `spatia.config`):

* training: one jitted step (`spatia.train`, AdamW, flow-matching loss) of each stage -- base
  (target + history), control (+ projection; control branch trained), main (+ references; LoRA
  trained) -- on a batch of the preset's layout and batch size;
* sampling: one clip (B = 1) of the base model (no memory) and of the full model (history,
  K references, projection) with the preset's evaluation sampler (`spatia.flow.sample`);
* one clip of the whole loop (`spatia.pipeline.generate_video` on a 2-clip closed loop: memory
  render, retrieval, sampling, memory update), per clip.

Each entry reports the first call (trace + compile + run, "compile_s"), the median wall time
of ``--repeats`` later calls ("s"), and their median process CPU time ("cpu_s"; on a machine
shared with other processes wall time is inflated, CPU time much less), with the machine's
background load in "timing" (`benchmarks/timing.py`). The load average at start and end is
stored. Prints a table and writes JSON (default benchmarks/results/spatia_generate.json).

    python benchmarks/spatia_generate.py [--presets tiny,small] [--repeats 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from common.report import hardware, write_json
from common.runtime import enable_compilation_cache
from spatia import config as C
from spatia import flow
from spatia import pipeline as pl
from spatia import reproduce as R
from spatia import train as T

if __package__:  # python -m benchmarks.spatia_generate
    from .timing import scale, time_call
else:  # python benchmarks/spatia_generate.py: this folder is first on sys.path
    from timing import scale, time_call


def _entry(t: dict) -> dict:
    """A `time_call` record as this file's entry: {"compile_s": first call, "s": median wall,
    "cpu_s": median process CPU time, "timing": the whole record (spread, background load)}."""
    return {"compile_s": t["compile_s"], "s": t["median_s"], "cpu_s": t["cpu_s"], "timing": t}


def _batch(cfg: C.SpatiaConfig, batch_size: int, keys, seed: int = 0) -> dict:
    m = cfg.model
    H, W = m.frame_size
    N, M, K, Ch = m.num_target_frames, m.num_prev_frames, m.max_refs, m.channels
    r = np.random.default_rng(seed)
    full = dict(
        frames=r.random((batch_size, N, H, W, Ch), np.float32),
        prev=r.random((batch_size, M, H, W, Ch), np.float32),
        refs=r.random((batch_size, K, H, W, Ch), np.float32),
        ref_valid=np.ones((batch_size, K), bool),
        proj=r.random((batch_size, M + N, H, W, Ch), np.float32),
        hole=(r.random((batch_size, M + N, H, W, 1)) > 0.5).astype(np.float32),
        instruction=r.integers(0, 4, (batch_size,)).astype(np.int32),
    )
    return {k: full[k] for k in keys}


def bench_training(cfg: C.SpatiaConfig, repeats: int) -> dict:
    out = {}
    for name in ("base", "control", "main"):
        spec = T.STAGES[name]
        gd, state, _ = T.initial_state(cfg, name, None)
        step = T.stage_step(cfg, name, gd)
        batch = _batch(cfg, cfg.train.batch_size, spec.keys)
        holder = {"state": state}

        def run(step=step, batch=batch, holder=holder):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        out[name] = _entry(time_call(run, repeats=repeats))
        n_train = sum(x.size for x in jax.tree.leaves(holder["state"].params))
        n_all = n_train + sum(x.size for x in jax.tree.leaves(holder["state"].frozen))
        out[name].update(
            trainable_params=int(n_train), params=int(n_all), batch_size=cfg.train.batch_size
        )
    return out


def bench_sampling(cfg: C.SpatiaConfig, repeats: int) -> dict:
    e = cfg.eval
    out = {}
    for label, name in (("no_memory", "base"), ("memory", "main")):
        spec = T.STAGES[name]
        gd, state, _ = T.initial_state(cfg, name, None)
        cond = _batch(cfg, 1, [k for k in spec.keys if k != "frames"], seed=1)
        cond = {k: jnp.asarray(v) for k, v in cond.items()}

        def run(gd=gd, state=state, cond=cond):
            return flow.sample(
                gd,
                (state.params, state.frozen),
                cond,
                jax.random.key(0),
                e.sample_steps,
                method=e.sampler,
                guidance_scale=e.guidance_scale,
            )["frames"]

        out[label] = _entry(time_call(run, repeats=repeats))
    out["sampler"] = {
        "steps": e.sample_steps,
        "method": e.sampler,
        "guidance_scale": e.guidance_scale,
    }
    return out


def bench_loop(cfg: C.SpatiaConfig, repeats: int) -> dict:
    gd, state, _ = T.initial_state(cfg, "main", None)
    (loop,) = R.make_loops(dataclass_replace_loops(cfg), 2)
    pcfg = R.pipeline_config(cfg, projection=True, references=True)
    gen = R.model_generator(cfg, (gd, (state.params, state.frozen)))(loop)
    instr = R.clip_instructions(loop.trajectory.w2c, pcfg.clip_frames)

    def run():
        memory, start = pl.start_from_scene(loop.scene, loop.trajectory, pcfg)
        res = pl.generate_video(
            memory,
            loop.trajectory,
            gen,
            pcfg,
            jax.random.key(0),
            start=start,
            scene=loop.scene,
            instructions=instr,
        )
        return jnp.asarray(res.rgb)

    per_clip = scale(time_call(run, repeats=max(1, repeats // 2)), 1 / 2)
    return _entry(per_clip) | {"clips": 2}


def dataclass_replace_loops(cfg: C.SpatiaConfig) -> C.SpatiaConfig:
    from common.config import override

    return override(cfg, ["eval.num_loops=1"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=os.path.join("benchmarks", "results", "spatia_generate.json")
    )
    args = parser.parse_args(argv)
    enable_compilation_cache()
    load0 = os.getloadavg()
    results = {}
    for name in args.presets.split(","):
        cfg = C.PRESETS[name]()
        print(f"== {name}", flush=True)
        results[name] = {
            "train_step": bench_training(cfg, args.repeats),
            "sample_clip": bench_sampling(cfg, args.repeats),
            "loop_per_clip": bench_loop(cfg, args.repeats),
        }
    load1 = os.getloadavg()
    rows = []
    for name, r in results.items():
        for stage, v in r["train_step"].items():
            rows.append(
                (
                    name,
                    f"train step {stage} (B={v['batch_size']})",
                    v["compile_s"],
                    v["s"],
                    v["cpu_s"],
                )
            )
        for label in ("no_memory", "memory"):
            v = r["sample_clip"][label]
            rows.append((name, f"sample 1 clip, {label}", v["compile_s"], v["s"], v["cpu_s"]))
        v = r["loop_per_clip"]
        rows.append((name, "pipeline, per clip", v["compile_s"], v["s"], v["cpu_s"]))
    print(f"{'preset':<7} {'what':<34} {'first call s':>12} {'median s':>9} {'cpu s':>9}")
    for p, w, c, s, cpu in rows:
        print(f"{p:<7} {w:<34} {c:12.2f} {s:9.4f} {cpu:9.4f}")
    write_json(
        args.out,
        {
            "results": results,
            "load_average_start": load0,
            "load_average_end": load1,
            "hardware": hardware(),
            "python": platform.python_version(),
            "command": "python benchmarks/spatia_generate.py " + " ".join(argv or []),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
