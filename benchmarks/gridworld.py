"""Gridworld-pinpad throughput: batched JAX env steps/s and expert-trajectory generation rate.

Measures `jit(vmap(scan))` over the pure env (reset + uniformly random actions, with
auto-reset of finished episodes so every scanned step is a real env step) at batch 1, 64
and 1024, and the rate of `internal_rl.data.expert_batch` (successful, padded expert
trajectories generated inside jit). If `xminigrid` is importable (e.g. run with a throwaway
venv that has it), an empty-room grid of the same size is stepped the same way and the
ratio is reported. Times are the median of --repeats calls after a warm-up (compile) call,
with the machine's background load (`benchmarks/timing.py`) in each entry's "timing".
Prints a table and writes JSON (default benchmarks/results/gridworld.json).

    python benchmarks/gridworld.py [--out PATH] [--steps 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp

from common.report import write_json
from internal_rl.data import expert_batch
from internal_rl.envs import GridPinpad, pretrain_tasks

if __package__:  # python -m benchmarks.gridworld
    from .timing import fresh_keys, time_call
else:  # python benchmarks/gridworld.py: this folder is first on sys.path
    from timing import fresh_keys, time_call


def make_random_rollout(env: GridPinpad, batch: int, steps: int, auto_reset: bool):
    """jit(vmap(scan)) of random actions; returns the total reward (to sync).

    auto_reset: replace finished episodes by fresh layouts (the reset, with its
    rejection sampling and BFS, is then computed every step, branch-free as under vmap);
    otherwise finished episodes stay frozen (the step costs the same either way).
    """
    tasks = jnp.asarray(pretrain_tasks())[jnp.arange(batch) % 16]

    def one(key, task):
        k0, k1 = jax.random.split(key)
        state, _ = env.reset(k0, task)

        def body(carry, k):
            state, total = carry
            ka, kr = jax.random.split(k)
            action = jax.random.randint(ka, (), 0, env.num_actions)
            state, obs, reward, done, _ = env.step(state, action)
            if auto_reset:
                fresh, _ = env.reset(kr, task)
                state = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, state)
            return (state, total + reward + jnp.sum(obs) * 0.0), None  # keep obs live

        (_, total), _ = jax.lax.scan(body, (state, 0.0), jax.random.split(k1, steps))
        return total

    return jax.jit(lambda key: jax.vmap(one)(jax.random.split(key, batch), tasks).sum())


def bench_xminigrid(batch: int, steps: int, repeats: int):
    """Same measurement on xminigrid's 7x7 empty room, or None if it is not installed."""
    try:
        import xminigrid
        from xminigrid.wrappers import GymAutoResetWrapper
    except ImportError:
        return None
    env, params = xminigrid.make("MiniGrid-Empty-8x8")  # 8x8 with walls = 6x6 interior
    env = GymAutoResetWrapper(env)
    num_actions = env.num_actions(params)

    def one(key):
        k0, k1 = jax.random.split(key)
        ts = env.reset(params, k0)

        def body(ts, k):
            ts = env.step(params, ts, jax.random.randint(k, (), 0, num_actions))
            return ts, None

        ts, _ = jax.lax.scan(body, ts, jax.random.split(k1, steps))
        return ts.reward

    fn = jax.jit(lambda key: jax.vmap(one)(jax.random.split(key, batch)).sum())
    return time_call(fn, repeats=repeats, vary=fresh_keys(jax.random.key(0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/gridworld.json")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,64,1024")
    args = p.parse_args()
    env = GridPinpad()
    rows, results = [], dict(env_steps=[], expert=[], xminigrid=[])
    for b in [int(x) for x in args.batches.split(",")]:
        for auto in (False, True):
            t = time_call(
                make_random_rollout(env, b, args.steps, auto),
                repeats=args.repeats,
                vary=fresh_keys(jax.random.key(0)),
            )
            sps = b * args.steps / t["median_s"]
            results["env_steps"].append(
                dict(
                    batch=b,
                    steps=args.steps,
                    auto_reset=auto,
                    compile_s=t["compile_s"],
                    seconds=t["median_s"],
                    steps_per_s=sps,
                    timing=t,
                )
            )
            what = "pinpad random, auto-reset" if auto else "pinpad random, step only"
            rows.append((what, b, f"{sps:,.0f} steps/s", f"{t['compile_s']:.1f}"))
        xm = bench_xminigrid(b, args.steps, args.repeats)
        if xm is not None:
            xsps = b * args.steps / xm["median_s"]
            results["xminigrid"].append(
                dict(
                    batch=b,
                    steps_per_s=xsps,
                    compile_s=xm["compile_s"],
                    pinpad_autoreset_over_xminigrid=sps / xsps,
                    timing=xm,
                )
            )
            rows.append(
                (
                    "xminigrid Empty-8x8 (autoreset)",
                    b,
                    f"{xsps:,.0f} steps/s",
                    f"{xm['compile_s']:.1f}",
                )
            )
    for b in (64, 1024):
        fn = jax.jit(lambda k, b=b: expert_batch(env, k, pretrain_tasks(), b, 40))
        t = time_call(fn, repeats=args.repeats, vary=fresh_keys(jax.random.key(0)))
        sec = t["median_s"]
        results["expert"].append(
            dict(
                batch=b,
                max_len=40,
                compile_s=t["compile_s"],
                seconds=sec,
                trajectories_per_s=b / sec,
                timing=t,
            )
        )
        rows.append(
            ("expert trajectories (L=40)", b, f"{b / sec:,.0f} traj/s", f"{t['compile_s']:.1f}")
        )
    results["meta"] = dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        xminigrid_available=bool(results["xminigrid"]),
    )
    print(f"{'what':30s} {'batch':>6s} {'rate':>20s} {'compile s':>10s}")
    for what, b, rate, comp in rows:
        print(f"{what:30s} {b:6d} {rate:>20s} {comp:>10s}")
    if not results["xminigrid"]:
        print("xminigrid not importable: no side-by-side comparison in this run")
    print(f"wrote {write_json(args.out, results)}")


if __name__ == "__main__":
    main()
