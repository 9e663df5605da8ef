"""`python -m internal_rl plan --env gridworld|point|ant --preset paper --devices N`.

Builds every training stage of the preset from abstract shapes (nothing is allocated), lowers
and compiles its step on an N-device mesh (`common.plan.plan_step`: state replicated, batch
split over the devices) and writes reports/plan/internal_rl_<env>_<N>dev.{md,json}:

- pretrain: the base model's train step (Eq. 5) on a batch of expert trajectories;
- controllers: one insertion layer's supervised controller step (the sweep repeats it per
  layer);
- metacontroller: the frozen-base step (one per α × seed of the sweep, + β ≡ 1) and the
  co-trained step;
- internal RL: one PPO update (`rl.make_ppo_update`, cfg.rl.epochs × minibatches optimizer
  steps) over a batch of rollouts. The rollout that produces that batch runs in the same
  compiled chunk but is not in the row: its cost is estimated in the note from the base
  model's forward FLOPs.

A batch that N devices cannot split is planned at the nearest smaller multiple of N, and a
step that does not fit the accelerator's memory is re-planned with gradient accumulation
over micro-batches (the same update); both are stated in the row's note.
"""

from __future__ import annotations

import argparse
import dataclasses

# No JAX array may exist before `set_host_device_count`: heavy imports happen in `main`.


def _fit_batch(batch: int, devices: int) -> tuple[int, str]:
    """The largest multiple of `devices` <= batch (at least `devices`), and a note."""
    if batch % devices == 0:
        return batch, ""
    fitted = max(devices, batch // devices * devices)
    return fitted, f"batch {batch} is not divisible by {devices} devices: planned at {fitted}"


def _expert_batch_spec(cfg, batch_size: int) -> dict:
    """ShapeDtypeStructs of one expert-data batch of cfg's family (traced, not run)."""
    import jax
    import jax.numpy as jnp

    from internal_rl.pipeline import is_continuous, stages

    pipe = stages(cfg)
    env = pipe.make_env(cfg)
    tasks = jnp.asarray(pipe.TASKS["pretrain"]())
    if is_continuous(cfg):
        from internal_rl.continuous.data import expert_batch
        from internal_rl.continuous.pretrain import TASK_WIDTH

        tasks = jnp.asarray(pipe.TASKS["pretrain"](TASK_WIDTH))

        def zero_policy(carry, key, obs, state):  # the shapes of the expert's actions
            return carry, jnp.zeros(env.action_shape, jnp.float32)

        def fn(key):
            return expert_batch(
                env, zero_policy, key, tasks, batch_size, cfg.data.max_len, n_candidates=batch_size
            )
    else:
        from internal_rl.data import expert_batch

        def fn(key):
            return expert_batch(env, key, tasks, batch_size, cfg.data.max_len, cfg.data.epsilon)

    return jax.eval_shape(fn, jax.eval_shape(lambda: jax.random.key(0)))


def _count_params(state) -> tuple[int, int]:
    import math

    import jax

    def n(tree):
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))

    return n(state.params) + n(state.frozen), n(state.params)


def _train_row(
    name: str,
    cfg,
    build,
    trainable,
    opt,
    loss_fn,
    loss_key,
    batch_size: int,
    steps: int,
    mesh,
    acc,
    note: str = "",
):
    """plan_step of a supervised `common.train` step, with accumulation if it does not fit."""
    from common.plan import abstract_train_state, plan_step
    from common.train import STEPS

    devices = mesh.size
    batch, fit_note = _fit_batch(batch_size, devices)
    notes = [x for x in (note, fit_note) if x]
    k = 1
    while True:
        micro = batch // k
        o = dataclasses.replace(opt, accumulation_steps=k) if k > 1 else opt
        tx = STEPS.optimizer(o)
        graphdef, state = abstract_train_state(build, tx, trainable)
        step = STEPS.train_step(graphdef, o, loss_fn, loss_key=loss_key)
        spec = _expert_batch_spec(cfg, micro)
        row = plan_step(
            name,
            step,
            state,
            spec,
            mesh,
            steps=steps * k,
            items_per_step=f"{micro} trajectories × {cfg.data.max_len} steps",
            accelerator=acc,
            note="; ".join(notes),
        )
        nxt = 2 * k
        if row.fits or batch % (nxt * devices) or batch // nxt < devices:
            break
        k = nxt
    if k > 1:
        row.note = "; ".join(
            notes
            + [
                f"does not fit at batch {batch}: gradient accumulation "
                f"over {k} micro-batches of {batch // k} (one update "
                f"per {k} step calls)"
            ]
        )
    return row


def plan_rows(cfg, mesh, acc) -> list:
    """The plan rows of every training stage of `cfg` on `mesh` (see the module docstring)."""
    from flax import nnx

    from internal_rl.controllers import CONTROLLER_PARAMS, ControlledModel, controller_loss
    from internal_rl.metacontroller import (
        MetacontrolledModel,
        metacontroller_loss,
        trainable_filter,
    )
    from internal_rl.pipeline import is_continuous, stages

    pipe = stages(cfg)
    env = pipe.make_env(cfg)
    p = cfg.pretrain
    rows = []

    pre = _train_row(
        "pretrain",
        cfg,
        lambda: pipe.build_model(cfg),
        nnx.Param,
        p.optim,
        pipe.make_loss_fn(p.obs_coef),
        ("internal_rl.plan.pretrain", is_continuous(cfg), p.obs_coef),
        cfg.data.batch_size,
        p.steps,
        mesh,
        acc,
    )
    rows.append(pre)

    depth = cfg.model.depth
    layer = cfg.control_layers[0]
    c = cfg.control

    def controlled():
        return ControlledModel(
            pipe.build_model(cfg), layer, env.num_subgoals, c.rank, c.hidden, rngs=nnx.Rngs(0)
        )

    rows.append(
        _train_row(
            f"controller (layer {layer})",
            cfg,
            controlled,
            CONTROLLER_PARAMS,
            c.optim,
            controller_loss,
            None,
            c.batch_size,
            c.steps,
            mesh,
            acc,
            note=f"one per insertion layer: {len(cfg.control_layers)} in the sweep",
        )
    )

    m = cfg.mctrain
    for cotrain in (False, True):
        mc_cfg = dataclasses.replace(cfg.metacontroller, kl_weight=m.alphas[0], cotrain=cotrain)

        def metacontrolled(mc_cfg=mc_cfg):
            return MetacontrolledModel(pipe.build_model(cfg), mc_cfg, rngs=nnx.Rngs(0))

        runs = (
            f"{len(m.alphas)} α × {m.seeds} seeds + β ≡ 1 runs"
            if not cotrain
            else "one run per co-trained α"
        )
        rows.append(
            _train_row(
                "metacontroller (co-trained)" if cotrain else "metacontroller (frozen base)",
                cfg,
                metacontrolled,
                trainable_filter(mc_cfg),
                m.cotrain_optim if cotrain else m.optim,
                metacontroller_loss,
                None,
                m.batch_size,
                m.cotrain_steps if cotrain else m.steps,
                mesh,
                acc,
                note=f"layer {mc_cfg.insertion_layer(depth)}; {runs}; a lower bound on FLOPs: "
                "the recurrences over time of its encoder and switching unit are scans, "
                "whose body XLA's cost analysis counts once",
            )
        )

    rows.append(_rl_row(cfg, pipe, env, pre, mesh, acc))
    return rows


# The policy's recurrence over T is a `lax.scan`, whose body XLA's cost analysis counts once;
# FLOPs are measured on this many steps unrolled and scaled linearly to T.
_UNROLLED_STEPS = 8


def _rl_row(cfg, pipe, env, pre, mesh, acc):
    """One PPO optimizer step of internal RL on a minibatch of rollouts (the update makes
    cfg.rl.epochs × minibatches of them)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from common.plan import plan_step
    from common.train import TrainState
    from internal_rl.metacontroller import MetacontrolledModel
    from internal_rl.rl import LatentPolicy, clipped_surrogate, gaussian_log_prob

    r = cfg.rl
    devices = mesh.size
    horizon = int(r.horizon or env.horizon)
    minibatch, fit_note = _fit_batch(r.batch_episodes // r.minibatches, devices)
    mc_cfg = cfg.metacontroller
    subject = nnx.eval_shape(
        lambda: MetacontrolledModel(pipe.build_model(cfg), mc_cfg, rngs=nnx.Rngs(0))
    )
    policy = nnx.eval_shape(
        lambda: LatentPolicy(cfg.model.dim, mc_cfg.n_z, r.policy_width, rngs=nnx.Rngs(0))
    )
    p_graph, params, p_rest = nnx.split(policy, nnx.Param, ...)
    tx = r.optimizer()

    def make_step(unrolled: bool):
        def log_probs(pol, e, z, decision):
            if not unrolled:
                return pol.log_probs(e, z, decision)
            h, out = pol.initial_carry(e.shape[0]), []
            for t in range(e.shape[1]):  # LatentPolicy.log_probs, unrolled
                h_new, mean, log_std = pol.step(h, e[:, t])
                out.append(gaussian_log_prob(z[:, t], mean, log_std))
                h = jnp.where(decision[:, t, None], h_new, h)
            return jnp.stack(out, axis=1)

        def step(state: TrainState, batch: dict):
            # `rl.make_ppo_update`'s minibatch step (the paper's entropy coefficient is 0)
            def loss_fn(p):
                pol = nnx.merge(p_graph, p, state.frozen[1])
                logp = log_probs(pol, batch["e"], batch["z"], batch["decision"])
                return clipped_surrogate(
                    logp, batch["logp"], batch["adv"], batch["decision"], r.clip_eps
                )

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            new = jax.tree.map(jnp.add, state.params, updates)
            return state.replace(step=state.step + 1, params=new, opt_state=opt_state), aux

        return step

    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        frozen=(nnx.state(subject), p_rest),
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.eval_shape(lambda: jax.random.key(0)),
    )

    def batch_spec(t):
        return {
            "e": jax.ShapeDtypeStruct((minibatch, t, cfg.model.dim), jnp.float32),
            "z": jax.ShapeDtypeStruct((minibatch, t, mc_cfg.n_z), jnp.float32),
            "logp": jax.ShapeDtypeStruct((minibatch, t), jnp.float32),
            "decision": jax.ShapeDtypeStruct((minibatch, t), jnp.bool_),
            "adv": jax.ShapeDtypeStruct((minibatch,), jnp.float32),
        }

    calls = r.epochs * r.minibatches
    row = plan_step(
        "internal RL (PPO step)",
        make_step(False),
        state,
        batch_spec(horizon),
        mesh,
        steps=r.num_updates * calls,
        items_per_step=f"{minibatch} episodes × {horizon} steps",
        accelerator=acc,
    )
    unrolled = plan_step(
        "ppo-unrolled",
        make_step(True),
        state,
        batch_spec(_UNROLLED_STEPS),
        mesh,
        steps=1,
        items_per_step="",
        accelerator=acc,
    )
    row.flops_per_device = unrolled.flops_per_device * horizon / _UNROLLED_STEPS
    row.est_step_seconds = unrolled.est_step_seconds * horizon / _UNROLLED_STEPS
    row.compile_seconds += unrolled.compile_seconds
    # The rollout (B episodes × T decode steps of the frozen base model, the switching unit
    # and the env) precedes each update inside the compiled chunk. Decoding a token costs
    # about one forward pass per token, a third of a train step's FLOPs per token.
    pre_batch = int(pre.items_per_step.split(" ")[0])
    fwd_per_token = pre.flops_per_device / 3 / (pre_batch * cfg.data.max_len / devices)
    rollout = fwd_per_token * r.batch_episodes * horizon / devices
    row.note = "; ".join(
        x
        for x in (
            fit_note,
            (
                f"{calls} of these per update ({r.epochs} epochs × {r.minibatches} minibatches of "
                f"{r.batch_episodes} episodes); FLOPs from {_UNROLLED_STEPS} unrolled steps × "
                f"{horizon}/{_UNROLLED_STEPS}; not in the row: the rollout of {r.batch_episodes} "
                f"episodes × {horizon} steps per update (same compiled chunk), ≈"
                f"{rollout / 1e9:.3g} GFLOP/device of base-model decoding (forward FLOPs per token "
                "× tokens) plus the env steps"
            ),
        )
        if x
    )
    return row


def main(argv: list[str] | None = None) -> int:
    from common.config import add_config_args
    from common.plan import add_plan_args

    parser = argparse.ArgumentParser(
        prog="python -m internal_rl plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--env", choices=("gridworld", "point", "ant"), default="gridworld")
    add_config_args(parser, default_preset="paper")
    add_plan_args(parser)
    args = parser.parse_args(argv)

    from common.plan import set_host_device_count

    set_host_device_count(args.devices)  # before anything creates an array
    from common.config import ConfigError, config_from_args
    from common.distributed import make_mesh
    from common.plan import accelerator_from_args, write_plan
    from common.report import command_line
    from common.runtime import start_process
    from internal_rl.pipeline import presets_for

    start_process()
    try:
        cfg = config_from_args(presets_for(args.env), args)
        acc = accelerator_from_args(args)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    if args.env != "gridworld" and cfg.env.kind != args.env:
        parser.error(
            f"--env {args.env}: the config's env.kind is {cfg.env.kind!r} (set "
            f"--set env.kind={args.env} or pick the preset of that body)"
        )
    rows = plan_rows(cfg, make_mesh(), acc)
    path = write_plan(rows, args.out, f"internal_rl_{args.env}", args.preset, command_line())
    print(f"wrote {path}")
    return 0
