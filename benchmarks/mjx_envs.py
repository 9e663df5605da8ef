"""MJX pinpad throughput: Ant-pinpad and Point-pinpad env steps/s vs C MuJoCo on the same MJCF.

For each env and batch size, `jit(vmap(scan(env.step)))` runs `--steps` env steps (each
`frame_skip` MJX physics steps plus the pinpad task logic) under uniformly random actions
from freshly reset states; compile time (first call) is reported separately from the
steady-state time. The peer is C MuJoCo's threaded
`mujoco.rollout.rollout` (all cores) on the same MjModel, the same initial states and the
same random controls, each held for `frame_skip` physics steps (physics only, no task
logic); the table reports env steps/s of both and the MJX / C ratio. Steady-state times are
the median of `--repeats` calls, with the machine's background load (`benchmarks/timing.py`)
in each entry's "timing".

    python benchmarks/mjx_envs.py [--out PATH] [--batches 1,32,256] [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

from common.report import write_json
from internal_rl.envs.ant_pinpad import AntPinpad
from internal_rl.envs.pinpad_layout import pretrain_tasks
from internal_rl.envs.point_pinpad import PointPinpad

if __package__:  # python -m benchmarks.mjx_envs
    from .timing import time_call
else:  # python benchmarks/mjx_envs.py: this folder is first on sys.path
    from timing import time_call


def make_mjx_run(env, steps: int):
    """jit(vmap(scan)) of `steps` env steps under uniform random actions; returns the
    summed reward (forces every step to be computed)."""
    action_dim = env.action_shape[0]

    def one(state, key):
        def body(s, k):
            a = jax.random.uniform(k, (action_dim,), minval=-1.0, maxval=1.0)
            s, obs, reward, _, _ = env.step(s, a)
            return s, reward + 0.0 * jnp.sum(obs)

        _, rewards = jax.lax.scan(body, state, jax.random.split(key, steps))
        return jnp.sum(rewards)

    return jax.jit(
        lambda states, key: jax.vmap(one)(
            states, jax.random.split(key, states.pad.t.shape[0])
        ).sum()
    )


def reset_batch(env, batch: int):
    """`batch` freshly reset states (pretraining tasks in turn)."""
    tasks = jnp.asarray(pretrain_tasks())[jnp.arange(batch) % 16]
    states, _ = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(0), batch), tasks)
    return states


def time_mjx(env, states, steps: int, repeats: int) -> dict:
    batch = states.pad.t.shape[0]
    run = make_mjx_run(env, steps)
    t = time_call(run, repeats=repeats, vary=lambda n: (states, jax.random.key(1 + n)))
    return dict(
        compile_s=t["compile_s"],
        seconds=t["median_s"],
        env_steps_per_s=batch * steps / t["median_s"],
        timing=t,
    )


def time_c_mujoco(env, states, steps: int, repeats: int, threads: int) -> dict:
    """mujoco.rollout from the same initial (qpos, qvel), random controls held frame_skip."""
    m = env.mj_model
    batch = states.data.qpos.shape[0]
    data = mujoco.MjData(m)
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    init = np.zeros((batch, mujoco.mj_stateSize(m, spec)))
    for b in range(batch):
        data.qpos[:] = np.asarray(states.data.qpos[b])
        data.qvel[:] = np.asarray(states.data.qvel[b])
        mujoco.mj_forward(m, data)
        mujoco.mj_getState(m, data, init[b], spec)
    rng = np.random.default_rng(0)
    ctrl = rng.uniform(-1.0, 1.0, (batch, steps, m.nu)).repeat(env.frame_skip, axis=1)
    datas = [mujoco.MjData(m) for _ in range(threads)]
    nstep = steps * env.frame_skip
    # the first call starts the thread pool (persistent_pool): the warm-up
    t = time_call(
        lambda: mj_rollout.rollout(m, datas, init, ctrl, nstep=nstep, persistent_pool=True),
        repeats=repeats,
    )
    return dict(
        first_s=t["compile_s"],
        seconds=t["median_s"],
        env_steps_per_s=batch * steps / t["median_s"],
        threads=threads,
        timing=t,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/mjx_envs.json")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--steps", type=int, default=100, help="env steps per timed call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--envs", default="ant,point")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    makers = dict(ant=AntPinpad, point=PointPinpad)
    rows, results = [], []
    for name in args.envs.split(","):
        env = makers[name]()
        batches = [int(b) for b in args.batches.split(",")]
        # one reset program per env: smaller batches are slices of the largest
        all_states = reset_batch(env, max(batches))
        for batch in batches:
            states = jax.tree.map(lambda x, b=batch: x[:b], all_states)
            mjx_res = time_mjx(env, states, args.steps, args.repeats)
            c_res = time_c_mujoco(env, states, args.steps, args.repeats, args.threads)
            ratio = mjx_res["env_steps_per_s"] / c_res["env_steps_per_s"]
            results.append(
                dict(
                    env=name,
                    batch=batch,
                    steps=args.steps,
                    frame_skip=env.frame_skip,
                    mjx=mjx_res,
                    c_mujoco=c_res,
                    mjx_over_c=ratio,
                )
            )
            rows.append(
                (
                    name,
                    batch,
                    mjx_res["env_steps_per_s"],
                    mjx_res["compile_s"],
                    c_res["env_steps_per_s"],
                    ratio,
                )
            )
            print(
                f"{name} B={batch}: MJX {mjx_res['env_steps_per_s']:,.0f} env steps/s "
                f"(compile {mjx_res['compile_s']:.1f} s), C {c_res['env_steps_per_s']:,.0f}",
                flush=True,
            )
    meta = dict(
        jax=jax.__version__,
        mujoco=mujoco.__version__,
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        threads=args.threads,
        mjx_impl="jax",
        steps_per_call=args.steps,
        repeats=args.repeats,
    )
    print(
        f"\n{'env':6s} {'batch':>6s} {'MJX env steps/s':>16s} {'compile s':>10s} "
        f"{'C env steps/s':>14s} {'MJX/C':>7s}"
    )
    for name, b, mjx_sps, comp, c_sps, ratio in rows:
        print(f"{name:6s} {b:6d} {mjx_sps:16,.0f} {comp:10.1f} {c_sps:14,.0f} {ratio:7.3f}")
    print(f"wrote {write_json(args.out, dict(results=results, meta=meta))}")


if __name__ == "__main__":
    main()
