"""``python -m lir plan``: every training stage of a preset, lowered and compiled for an
N-device mesh from abstract shapes (``common.plan``), before anything runs.

Stages of lir's own LMM (:func:`lmm_plan_rows`), each with the train step the trainer uses
(``lir.train.finetune_step`` / the phase-P step, same optimizer config, same filter):

* phase P: the whole LMM (``PRETRAIN_FILTER``) on the single-image mixture (K = 0 layout);
* phase F, LIVR stage 1: LoRA + latents under the bottleneck mask (LIVR §3.2);
* phase F, LIVR stage 2: LoRA + latents under the causal mask;
* phase F, SFT arm: LoRA only, causal mask, latent slots dropped (same sequence length).

Phase-F step counts are per (task, arm, seed) run; the other arms (latents-only, mask-only,
prompt tuning) and the ablations reuse these programs with another filter or mask, at the
same shapes. The fine-tuning of a pretrained Qwen2.5-VL (``python -m lir finetune``) is a
separate stage whose rows come from :func:`qwen_plan_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from common.plan import PlanRow, abstract_batch, abstract_train_state, plan_step
from common.rng import stream_seed
from common.train import STEPS, OptimizerConfig
from lir.config import LIRConfig, layout, model_config, stage_optimizer, steps_per_epoch
from lir.data import collate, drop_latents
from lir.model import LIVR_FILTER, LMM, LORA_FILTER, PRETRAIN_FILTER, add_lora
from lir.tasks import PRETRAIN_NAMES, generate
from lir.train import _batch_loss, _pretrain_model, finetune_step


def divisible_batch(batch: int, devices: int) -> tuple[int, str]:
    """(the batch to plan, a note): ``batch`` itself when ``devices`` divide it, else the
    nearest multiple of ``devices`` (ties round up; at least ``devices``)."""
    if batch % devices == 0:
        return batch, ""
    lower = batch // devices * devices
    upper = lower + devices
    planned = upper if lower == 0 or upper - batch <= batch - lower else lower
    return planned, (
        f"the preset's batch {batch} is not divisible by {devices} devices: "
        f"planned at batch {planned}"
    )


def _batch_spec(records, lay, batch: int, drop: bool = False) -> dict[str, Any]:
    """Abstract ``lir.data.Batch`` dict of ``batch`` rows at layout ``lay`` (shapes and
    dtypes of one collated record; numpy only, so no JAX array is made)."""
    one = collate(records[:1], lay)
    if drop:
        one = drop_latents(one)
    return abstract_batch({k: ((batch,) + v.shape[1:], v.dtype) for k, v in one._asdict().items()})


def _finetune_model(cfg: LIRConfig) -> Callable[[], LMM]:
    ft = cfg.finetune

    def build() -> LMM:
        model = LMM(model_config(cfg, ft.num_latents), rngs=nnx.Rngs(0))
        add_lora(model, ft.lora, rngs=nnx.Rngs(1))
        return model

    return build


def _row(
    stage: str,
    build: Callable[[], Any],
    trainable,
    opt: OptimizerConfig,
    step_for,
    batch_spec: dict,
    mesh,
    *,
    steps: int,
    note: str,
    accelerator,
) -> PlanRow:
    graphdef, state = abstract_train_state(build, STEPS.optimizer(opt), trainable)
    b, s = batch_spec["tokens"].shape
    return plan_step(
        stage,
        step_for(graphdef),
        state,
        batch_spec,
        mesh,
        steps=steps,
        items_per_step=f"{b} sequences × {s} tokens",
        dtype="float32",
        note=note,
        accelerator=accelerator,
    )


def lmm_plan_rows(
    cfg: LIRConfig, mesh, *, accelerator, n_train: int | None = None
) -> list[PlanRow]:
    """One :class:`common.plan.PlanRow` per training stage of lir's LMM under ``cfg`` (module
    docstring), on ``mesh``. ``n_train``: examples per task for the phase-F step counts
    (default ``cfg.data.n_train``)."""
    devices = mesh.size
    p, ft = cfg.pretrain, cfg.finetune
    notes = ["float32 (the tiny LMM trains in float32)"]
    rows = []

    # phase P
    pb, pnote = divisible_batch(p.batch_size, devices)
    recs = generate(
        PRETRAIN_NAMES[0], 1, stream_seed(cfg.seed, "plan"), "train", cfg.data.image_size
    )
    spec = _batch_spec(recs, layout(cfg, 0), pb)
    acc = p.optim.accumulation_steps
    rows.append(
        _row(
            "phase P: pretrain (whole LMM, causal)",
            lambda: _pretrain_model(cfg),
            PRETRAIN_FILTER,
            p.optim,
            lambda gd: STEPS.train_step(
                gd, p.optim, _batch_loss("causal"), loss_key=("lir.pretrain", "causal")
            ),
            spec,
            mesh,
            steps=p.calls,
            accelerator=accelerator,
            note="; ".join(
                n for n in [pnote, *notes] + ([f"× {acc} accumulation"] if acc > 1 else []) if n
            ),
        )
    )

    # phase F: one (task, arm, seed) run
    fb, fnote = divisible_batch(ft.batch_size, devices)
    spe = steps_per_epoch(ft, cfg.data.n_train if n_train is None else n_train)
    if spe < 1:
        raise ValueError(
            f"n_train gives no full batch of {ft.batch_size} × {ft.accumulation_steps}"
        )
    calls = spe * ft.accumulation_steps
    task = cfg.tasks[0] if cfg.tasks else "jigsaw"
    recs = generate(task, 1, stream_seed(cfg.seed, "plan"), "train", cfg.data.image_size)
    lay = layout(cfg, ft.num_latents)
    per_run = f"per (task, seed) run: {spe} updates/epoch"
    extra = [f"× {ft.accumulation_steps} accumulation"] if ft.accumulation_steps > 1 else []
    for stage, variant, epochs, trainable, name, drop in (
        (
            f"phase F: LIVR stage 1 (bottleneck, K={ft.num_latents})",
            "bottleneck",
            ft.stage1_epochs,
            LIVR_FILTER,
            "livr",
            False,
        ),
        (
            f"phase F: LIVR stage 2 (causal, K={ft.num_latents})",
            "causal",
            ft.stage2_epochs,
            LIVR_FILTER,
            "livr",
            False,
        ),
        (
            "phase F: SFT (causal, LoRA only, latents dropped)",
            "causal",
            ft.sft_epochs,
            LORA_FILTER,
            "lora",
            True,
        ),
    ):
        if epochs == 0:
            continue
        opt = stage_optimizer(ft, epochs * spe)
        rows.append(
            _row(
                stage,
                _finetune_model(cfg),
                trainable,
                opt,
                lambda gd, _n=name, _v=variant, _o=opt: finetune_step(gd, _n, _v, _o),
                _batch_spec(recs, lay, fb, drop),
                mesh,
                steps=epochs * calls,
                accelerator=accelerator,
                note="; ".join(
                    n for n in [fnote, f"{per_run}, {epochs} epochs", *notes, *extra] if n
                ),
            )
        )
    return rows


def qwen_plan_rows(cfg: LIRConfig, args, mesh, accelerator) -> list[PlanRow]:
    """The rows of the Qwen2.5-VL fine-tuning stage (``python -m lir finetune``): LIVR stage 1
    and 2 and direct SFT of the pretrained 3B and 7B backbones at the paper's recipe
    (``lir.backbones.qwen2_5_vl.plan``). The paper runs each of these jobs on one GPU at
    batch 1 × accumulation 8, so they are planned on a one-device mesh only; on more devices
    this raises NotImplementedError, which the plan verb reports and skips."""
    if mesh.size != 1:
        raise NotImplementedError(
            "the Qwen2.5-VL fine-tuning runs on one GPU per job (LIVR App. B): plan it with "
            "--devices 1"
        )
    from lir.backbones.qwen2_5_vl import plan as qwen_plan

    shapes = qwen_plan.Shapes()
    ft = dataclasses.replace(
        cfg.finetune, batch_size=shapes.batch, accumulation_steps=shapes.accumulation
    )
    opt = stage_optimizer(ft, shapes.train_examples // shapes.accumulation)
    return qwen_plan.plan_rows(
        mesh,
        accelerator,
        opt,
        cfg.finetune.lora,
        num_latents=cfg.finetune.num_latents,
        shapes=shapes,
    )


#: The row builders of ``python -m lir plan``: ``(name, fn(cfg, args, mesh, accelerator))``.
PLANNERS: tuple[tuple[str, Callable], ...] = (
    ("lmm", lambda cfg, args, mesh, acc: lmm_plan_rows(cfg, mesh, accelerator=acc)),
    ("qwen2_5_vl", qwen_plan_rows),
)


def run_plan(cfg: LIRConfig, args, mesh, accelerator, log=print) -> list[PlanRow]:
    """The rows of every planner in :data:`PLANNERS`; a planner that raises
    NotImplementedError is skipped with a logged note."""
    rows: list[PlanRow] = []
    wanted = getattr(args, "models", None)
    wanted = None if wanted is None else {m.strip() for m in wanted.split(",") if m.strip()}
    unknown = (wanted or set()) - {name for name, _ in PLANNERS}
    if unknown:
        raise ValueError(
            f"--models: unknown {sorted(unknown)}; expected some of "
            f"{[name for name, _ in PLANNERS]}"
        )
    for name, planner in PLANNERS:
        if wanted is not None and name not in wanted:
            continue
        try:
            rows += planner(cfg, args, mesh, accelerator)
        except NotImplementedError as err:
            log(f"plan: skipped {name}: {err}")
    return rows


def param_count(model: nnx.Module) -> int:
    """Number of ``nnx.Param`` entries (LoRA and latents included) of a real model."""
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))
