"""Internal-RL throughput: abstract-env episodes/s and PPO updates/s (internal RL App. C.5,
docs/internal_rl.md D22).

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

Compile time (first call) is reported separately from the steady state (median of
--repeats calls), with the CPU seconds this process used per call (on a shared machine
wall time overstates the cost when CPU seconds << 2 x wall on 2 cores) and the machine's
background load (`benchmarks/timing.py`). Prints a table and writes JSON.

(The file is not named internal_rl.py: run as a file, this folder is first on sys.path and
the script would shadow the internal_rl package.)

    python benchmarks/internal_rl_throughput.py [--env gridworld|point] [--out PATH]
                                     [--presets tiny,small] [--batch 128]
    (default --out: benchmarks/results/internal_rl.json, internal_rl_point.json for point)
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from flax import nnx

from common.report import hardware, write_json
from internal_rl.metacontroller import Metacontroller, MetacontrollerConfig
from internal_rl.pipeline import is_continuous, presets_for, stages, task_table
from internal_rl.rl import (
    RLConfig,
    make_internal_rl,
    make_ppo_update,
    make_raw_action_rl,
    make_train_chunk,
    trajectory_advantages,
)

if __package__:  # python -m benchmarks.internal_rl_throughput
    from .timing import fresh_keys, time_call
else:  # python benchmarks/internal_rl_throughput.py: this folder is first on sys.path
    from timing import fresh_keys, time_call


def _measure(fn, *leading, key, repeats: int) -> tuple[dict, dict]:
    """(the row's legacy fields compile_s / seconds / cpu_seconds, the `time_call` record) of
    ``fn(*leading, key)`` with a fresh key folded in per call."""
    t = time_call(fn, repeats=repeats, vary=fresh_keys(key, *leading))
    return dict(
        compile_s=t["compile_s"], seconds=t["median_s"], cpu_seconds=t["cpu_s"], timing=t
    ), t


def bench_preset(preset: str, batch: int, repeats: int, env_name: str = "gridworld") -> list[dict]:
    cfg = presets_for(env_name)[preset]()
    pipe = stages(cfg)
    env = pipe.make_env(cfg)
    base = pipe.build_model(cfg)
    mc_cfg = cfg.metacontroller if is_continuous(cfg) else MetacontrollerConfig()
    mc = Metacontroller(mc_cfg, cfg.model.dim, rngs=nnx.Rngs(1))
    rl_cfg = RLConfig(
        episodes=batch, batch_episodes=batch, epochs=2, minibatches=1, updates_per_call=1
    )
    task = task_table(cfg, "heldout")
    horizon = env.horizon
    prog = make_internal_rl(rl_cfg, base, mc, env, task, seed=0)
    size = dict(
        env=env_name,
        preset=preset,
        dim=cfg.model.dim,
        depth=cfg.model.depth,
        batch=batch,
        horizon=horizon,
    )
    rows = []

    rollout = jax.jit(prog.rollout_fn)
    fields, t = _measure(rollout, prog.params, prog.static, key=jax.random.key(0), repeats=repeats)
    sec = t["median_s"]
    rows.append(
        dict(
            size,
            what="rollout",
            **fields,
            episodes_per_s=batch / sec,
            raw_steps_per_s=batch * horizon / sec,
        )
    )

    batch_data, ep = rollout(prog.params, prog.static, jax.random.key(0))
    adv = trajectory_advantages(jnp.arange(batch, dtype=jnp.float32) % 2)  # non-trivial
    ppo = jax.jit(make_ppo_update(rl_cfg, prog.tx, prog.logp_fn))
    opt_state = prog.tx.init(prog.params)
    fields, t = _measure(
        lambda k: ppo(prog.params, opt_state, prog.static, batch_data, adv, k),
        key=jax.random.key(1),
        repeats=repeats,
    )
    rows.append(
        dict(
            size,
            what="ppo",
            **fields,
            updates_per_s=1 / t["median_s"],
            decisions_per_episode=float(jnp.mean(ep["decisions"])),
        )
    )

    for what, program in (
        ("update", prog),
        ("raw_update", make_raw_action_rl(rl_cfg, base, env, task)),
    ):
        chunk = make_train_chunk(rl_cfg, program.tx, program.rollout_fn, program.logp_fn)
        params = jax.tree.map(jnp.copy, program.params)  # the chunk donates them
        state = {"p": params, "o": program.tx.init(params)}

        def call(key, chunk=chunk, state=state, program=program):
            # params/opt_state are donated: carry them from call to call
            (state["p"], state["o"]), m = chunk(state["p"], state["o"], program.static, key[None])
            return m

        fields, t = _measure(call, key=jax.random.key(2), repeats=repeats)
        sec = t["median_s"]
        rows.append(
            dict(size, what=what, **fields, updates_per_s=1 / sec, episodes_per_s=batch / sec)
        )
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
    print(
        f"{'preset':6s} {'d':>4s} {'L':>2s} {'what':10s} {'B':>4s} {'rate':>28s} {'step s':>8s} "
        f"{'cpu s':>7s} {'compile s':>9s}"
    )
    for r in rows:
        if r["what"] == "rollout":
            rate = f"{r['episodes_per_s']:,.1f} ep/s ({r['raw_steps_per_s']:,.0f} st/s)"
        else:
            rate = f"{r['updates_per_s']:.3f} updates/s"
        print(
            f"{r['preset']:6s} {r['dim']:4d} {r['depth']:2d} {r['what']:10s} {r['batch']:4d} "
            f"{rate:>28s} {r['seconds']:8.2f} {r['cpu_seconds']:7.2f} {r['compile_s']:9.1f}"
        )
    meta = dict(
        hardware=hardware(),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        repeats=args.repeats,
        note=(
            "random weights; full gridworld (637-d obs, T=100), held-out task, "
            "paper-size metacontroller, 2 PPO epochs x 1 minibatch"
        )
        if args.env == "gridworld"
        else (
            "random weights; MJX Point-pinpad (16-d obs, T=200), Hawk base model, "
            "held-out task 0-1-2-3, the preset's metacontroller, 2 PPO epochs x 1 "
            "minibatch"
        ),
    )
    out = args.out or (
        "benchmarks/results/internal_rl.json"
        if args.env == "gridworld"
        else f"benchmarks/results/internal_rl_{args.env}.json"
    )
    print(f"wrote {write_json(out, dict(results=rows, meta=meta))}")


if __name__ == "__main__":
    main()
