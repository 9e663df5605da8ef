"""``python -m spatia plan``: every training stage of a preset, compiled for an N-device mesh from
abstract shapes (`common.plan`), before anything runs.

Each stage's model is built with `nnx.eval_shape` (its structure: LoRA on the main blocks in
the LoRA stage, the control branch everywhere), its train step is `spatia.train.stage_step`
(the step the trainer runs) and its batch holds the stage's keys at the preset's shapes. The
global batch is split over the `data` axis; with `per_device_batch` set, each step call takes
that many clips per device and `optax.MultiSteps` accumulates the gradients of
batch / (devices x per_device_batch) calls into one update of the preset's batch.

Stages with 0 steps (the paper preset's base stage: the paper starts from the pretrained
Wan2.2-TI2V-5B) are not planned; the first row's note says so.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from common import plan as cplan
from common.distributed import DATA_AXIS
from common.train import STEPS
from spatia import train as T
from spatia.config import SpatiaConfig

__all__ = ["stage_batch_shapes", "plan_stages"]

_GIB = 2**30


def stage_batch_shapes(cfg: SpatiaConfig, name: str, batch: int) -> dict:
    """{key: (shape, dtype)} of a stage's batch of `batch` clips (`spatia.model`'s layout)."""
    m = cfg.model
    H, W = m.frame_size
    N, M, K, C = m.num_target_frames, m.num_prev_frames, m.max_refs, m.channels
    every = {
        "frames": ((batch, N, H, W, C), jnp.float32),
        "prev": ((batch, M, H, W, C), jnp.float32),
        "refs": ((batch, K, H, W, C), jnp.float32),
        "ref_valid": ((batch, K), jnp.bool_),
        "proj": ((batch, M + N, H, W, C), jnp.float32),
        "hole": ((batch, M + N, H, W, m.hole_channels), jnp.float32),
        "instruction": ((batch,), jnp.int32),
    }
    return {k: every[k] for k in T.STAGES[name].keys}


def _tokens(cfg: SpatiaConfig, name: str) -> tuple[int, int]:
    """(main-stream tokens, control-branch tokens) of one clip of a stage."""
    m = cfg.model
    pt, ph, pw = m.patch_size
    per_frame = (m.frame_size[0] // ph) * (m.frame_size[1] // pw)
    spec = T.STAGES[name]
    frames = (m.num_prev_frames + m.num_target_frames) // pt
    main = (frames + (m.max_refs if spec.uses_refs else 0)) * per_frame
    return main, (frames * per_frame if spec.uses_proj else 0)


def plan_stages(
    cfg: SpatiaConfig,
    mesh,
    *,
    accelerator: cplan.Accelerator = cplan.ACCELERATORS["h100"],
    per_device_batch: int | None = None,
    note: str = "",
) -> list[cplan.PlanRow]:
    """One `common.plan.PlanRow` per training stage of `cfg` with steps > 0, on `mesh`.

    Args:
      per_device_batch: clips per device and step call (None: the whole batch in one call).
        When the batch is not a multiple of devices x per_device_batch, the nearest larger
        multiple is planned and the row's note says so.
      note: appended to every row's note.
    """
    n = mesh.shape[DATA_AXIS]
    batch = cfg.train.batch_size
    rows, skipped = [], []
    for name in T.stage_order(cfg):
        steps = T.stage_steps(cfg, name)
        if steps == 0:
            skipped.append(name)
            continue
        notes = []
        per_call = n * per_device_batch if per_device_batch else batch
        if per_call % n:
            per_call = -(-per_call // n) * n
        accum = -(-batch // per_call)
        if per_call * accum != batch:
            notes.append(
                f"batch {batch} is not divisible into {n} devices x "
                f"{per_call // n} clips x accumulation steps: planned {per_call * accum}"
            )
        opt = T.stage_optimizer(cfg, name)
        if accum > 1:
            opt = dataclasses.replace(opt, accumulation_steps=accum)
            notes.append(
                f"batch {per_call * accum} = {n} device(s) x {per_call // n} clip(s) x {accum} "
                "accumulated calls (optax.MultiSteps); steps count calls"
            )
        stage_cfg = _with_optimizer(cfg, name, opt)
        graphdef, state = cplan.abstract_train_state(
            lambda name=name, c=stage_cfg: T.build_model(c, name, None),
            STEPS.optimizer(opt),
            T.trainable_filter(stage_cfg, name),
        )
        step = T.stage_step(stage_cfg, name, graphdef)
        main, control = _tokens(cfg, name)
        m = cfg.model
        chunk = m.attention_chunk or main
        scores = (per_call // n) * m.num_heads * min(chunk, main) * main * 4
        notes.append(
            f"{main} main + {control} control tokens per clip; float32 weights and compute "
            f"(as implemented); self-attention in {min(chunk, main)}-query chunks: "
            f"{m.num_heads} x {min(chunk, main)} x {main} float32 scores live per block and "
            f"clip ({scores / _GIB:.2f} GiB per device)"
        )
        if m.remat:
            notes.append(
                "model.remat recomputes each block in the backward pass, but XLA:CPU's memory "
                "analysis keeps every block's buffers either way (measured with jax.checkpoint), "
                "so temp bytes here are an upper bound"
            )
        if not rows and skipped:
            notes.append(f"stage(s) {', '.join(skipped)} have 0 steps in this preset: not planned")
        if note:
            notes.append(note)
        batch_spec = cplan.abstract_batch(stage_batch_shapes(cfg, name, per_call))
        rows.append(
            cplan.plan_step(
                name,
                step,
                state,
                batch_spec,
                mesh,
                steps=steps * accum,
                items_per_step=f"{per_call} clips ({per_call // n}/device)",
                accelerator=accelerator,
                dtype="float32",
                note="; ".join(notes),
            )
        )
    return rows


def _with_optimizer(cfg: SpatiaConfig, name: str, opt) -> SpatiaConfig:
    """`cfg` with the optimiser of stage `name`'s section replaced by `opt`."""
    kind = T.STAGES[name].kind
    section = dataclasses.replace(getattr(cfg.train, kind), optim=opt)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{kind: section}))
