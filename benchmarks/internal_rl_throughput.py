"""Internal-RL throughput: abstract-env episodes/s and PPO updates/s (spec §7, §10.2).

For the base-model sizes of the `tiny` and `small` presets (random weights; the cost does
not depend on them) on the full Gridworld-pinpad (637-d obs, T = 100 raw steps, transformer)
or with `--env point` on the MJX Point-pinpad (16-d obs, T = 200 raw steps, Hawk), with the
preset's metacontroller (the grid world: the paper-size one), measures with a batch of B
episodes on the held-out task:

  rollout       internal-RL rollout (reset + T raw steps of lower blocks, switch unit,
                policy, controlled upper blocks, env) -> episodes/s and raw steps/s
  ppo           the PPO epochs on one collected batch (no rollout) -> updates/s
  update        one full update (rollout + PPO), as run by `run_internal_rl` -> updates/s
  raw_update    one full raw-action RL update (KV-cached sampling + PPO on all base
                parameters) -> updates/s

Compile time (first call) is reported separately from the steady state (best of
--repeats), with the CPU seconds this process used during that call (on a shared machine
wall time overstates the cost when CPU seconds << 2 x wall on 2 cores). Prints a table and writes JSON (default benchmarks/results/internal_rl.json).

    python benchmarks/internal_rl.py [--env gridworld|point] [--out PATH]
                                     [--presets tiny,small] [--batch 128]
    (default --out: benchmarks/results/internal_rl.json, internal_rl_point.json for point)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The script's own name shadows the `internal_rl` package when run as a file: put the
# repository root first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from common.report import hardware, write_json  # noqa: E402
from internal_rl.metacontroller import Metacontroller, MetacontrollerConfig  # noqa: E402
from internal_rl.pipeline import is_continuous, presets_for, stages, task_table  # noqa: E402
from internal_rl.rl import (  # noqa: E402
    RLConfig,
    make_internal_rl,
    make_ppo_update,
    make_raw_action_rl,
    make_train_chunk,
    trajectory_advantages,
)


def _time(fn, *args, repeats: int) -> tuple[float, float, float]:
    """(compile + first call seconds, best steady-state wall seconds, CPU seconds of this
    process during that best call); the last arg is a key. On a shared machine the CPU
    seconds show how much of the wall time this process actually ran."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best, cpu = float("inf"), float("nan")
    for i in range(repeats):
        args = args[:-1] + (jax.random.fold_in(args[-1], i + 1),)
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return first, best, cpu


def bench_preset(preset: str, batch: int, repeats: int, env_name: str = "gridworld"
                 ) -> list[dict]:
    cfg = presets_for(env_name)[preset]()
    pipe = stages(cfg)
    env = pipe.make_env(cfg)
    base = pipe.build_model(cfg)
    mc_cfg = cfg.metacontroller if is_continuous(cfg) else MetacontrollerConfig()
    mc = Metacontroller(mc_cfg, cfg.model.dim, rngs=nnx.Rngs(1))
    rl_cfg = RLConfig(episodes=batch, batch_episodes=batch, epochs=2, minibatches=1,
                      updates_per_call=1)
    task = task_table(cfg, "heldout")
    horizon = env.horizon
    prog = make_internal_rl(rl_cfg, base, mc, env, task, seed=0)
    size = dict(env=env_name, preset=preset, dim=cfg.model.dim, depth=cfg.model.depth,
                batch=batch, horizon=horizon)
    rows = []

    rollout = jax.jit(prog.rollout_fn)
    first, best, cpu = _time(rollout, prog.params, prog.static, jax.random.key(0),
                             repeats=repeats)
    rows.append(dict(size, what="rollout", compile_s=first, seconds=best, cpu_seconds=cpu,
                     episodes_per_s=batch / best, raw_steps_per_s=batch * horizon / best))

    batch_data, ep = rollout(prog.params, prog.static, jax.random.key(0))
    adv = trajectory_advantages(jnp.arange(batch, dtype=jnp.float32) % 2)  # non-trivial
    ppo = jax.jit(make_ppo_update(rl_cfg, prog.tx, prog.logp_fn))
    opt_state = prog.tx.init(prog.params)
    first, best, cpu = _time(lambda k: ppo(prog.params, opt_state, prog.static, batch_data, adv, k),
                        jax.random.key(1), repeats=repeats)
    rows.append(dict(size, what="ppo", compile_s=first, seconds=best, cpu_seconds=cpu,
                     updates_per_s=1 / best, decisions_per_episode=float(jnp.mean(ep["decisions"]))))

    for what, program in (("update", prog),
                          ("raw_update", make_raw_action_rl(rl_cfg, base, env, task))):
        chunk = make_train_chunk(rl_cfg, program.tx, program.rollout_fn, program.logp_fn)
        params = jax.tree.map(jnp.copy, program.params)  # the chunk donates them
        state = {"p": params, "o": program.tx.init(params)}

        def call(key, chunk=chunk, state=state, program=program):
            # params/opt_state are donated: carry them from call to call
            (state["p"], state["o"]), m = chunk(state["p"], state["o"], program.static,
                                                key[None])
            return m

        first, best, cpu = _time(call, jax.random.key(2), repeats=repeats)
        rows.append(dict(size, what=what, compile_s=first, seconds=best, cpu_seconds=cpu,
                         updates_per_s=1 / best, episodes_per_s=batch / best))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", choices=("gridworld", "point"), default="gridworld")
    p.add_argument("--out", default=None)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = []
    for preset in args.presets.split(","):
        rows.extend(bench_preset(preset, args.batch, args.repeats, args.env))
    print(f"{'preset':6s} {'d':>4s} {'L':>2s} {'what':10s} {'B':>4s} {'rate':>28s} {'step s':>8s} "
          f"{'cpu s':>7s} {'compile s':>9s}")
    for r in rows:
        if r["what"] == "rollout":
            rate = f"{r['episodes_per_s']:,.1f} ep/s ({r['raw_steps_per_s']:,.0f} st/s)"
        else:
            rate = f"{r['updates_per_s']:.3f} updates/s"
        print(f"{r['preset']:6s} {r['dim']:4d} {r['depth']:2d} {r['what']:10s} {r['batch']:4d} "
              f"{rate:>28s} {r['seconds']:8.2f} {r['cpu_seconds']:7.2f} {r['compile_s']:9.1f}")
    meta = dict(hardware=hardware(), load_average_before=load_before,
                load_average_after=os.getloadavg(), repeats=args.repeats,
                note=("random weights; full gridworld (637-d obs, T=100), held-out task, "
                      "paper-size metacontroller, 2 PPO epochs x 1 minibatch")
                if args.env == "gridworld" else
                ("random weights; MJX Point-pinpad (16-d obs, T=200), Hawk base model, "
                 "held-out task 0-1-2-3, the preset's metacontroller, 2 PPO epochs x 1 "
                 "minibatch"))
    out = args.out or ("benchmarks/results/internal_rl.json" if args.env == "gridworld"
                       else f"benchmarks/results/internal_rl_{args.env}.json")
    print(f"wrote {write_json(out, dict(results=rows, meta=meta))}")


if __name__ == "__main__":
    main()
