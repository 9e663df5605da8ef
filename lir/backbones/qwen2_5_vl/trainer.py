"""Two-stage LIVR / direct-SFT fine-tuning of :class:`QwenLIVR` (LIVR §3.2, App. B;
docs/lir.md D5-D6).

Each stage gets a fresh AdamW and a fresh 5%-warmup cosine schedule
(``lir.config.stage_optimizer``), through ``common.train``'s functional train step. Only the
method's parameters train: LoRA for SFT, LoRA + latent rows for LIVR; everything else
(vision tower, merger, LM weights, embedding table, head) is frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from common.train import create_train_state, make_optimizer, make_train_step, merge_model
from lir.backbones.qwen2_5_vl.livr import QwenBatch, QwenLIVR, loss_fn
from lir.config import FinetuneConfig, stage_optimizer
from lir.model import LIVR_FILTER, LORA_FILTER

METHODS = ("sft", "livr")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: the mask variant of its loss and its number of epochs."""

    mask_variant: str
    epochs: int


def method_stages(method: str, ft: FinetuneConfig) -> tuple[tuple[Stage, ...], object]:
    """(stages, trainable nnx filter) of ``method``: SFT = sft_epochs causal on LoRA; LIVR =
    stage1_epochs bottleneck then stage2_epochs causal on LoRA + latents."""
    if method == "sft":
        return (Stage("causal", ft.sft_epochs),), LORA_FILTER
    if method == "livr":
        stages = (Stage("bottleneck", ft.stage1_epochs), Stage("causal", ft.stage2_epochs))
        return tuple(s for s in stages if s.epochs > 0), LIVR_FILTER
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def finetune(model: QwenLIVR, method: str, ft: FinetuneConfig, batches: Sequence[QwenBatch],
             *, seed: int = 42, max_answer_tokens: int | None = None,
             on_epoch: Callable[[QwenLIVR, int, int], float | None] | None = None,
             log: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` and return the history with the trained module under "model".

    The train steps donate their state, so ``model``'s own buffers must not be used
    afterwards: continue with ``history["model"]`` (best validation epoch restored).

    Args:
      batches: one epoch of train-step inputs (each ``ft.batch_size`` rows); the order is
        reshuffled every epoch from ``seed``. Steps per epoch = len(batches) //
        ``ft.accumulation_steps``. Any ``Sequence`` (e.g. one that builds each batch on
        access from cached vision features).
      max_answer_tokens: static bound on a row's answer tokens: the loss projects only those
        positions to the vocabulary (``livr.answer_only_loss``); None: every position.
      on_epoch: ``(model, stage index, epoch) -> validation accuracy or None``; with values
        from the last stage's epochs the best one is kept (ties: later epoch, docs/lir.md D6).
      log: receives one dict of metrics per train-step call.
    Returns:
      {"losses": per-call losses, "val": [(stage, epoch, acc)], "best_epoch": int or None}.
    """
    stages, trainable = method_stages(method, ft)
    spe = len(batches) // ft.accumulation_steps
    if spe < 1:
        raise ValueError(f"{len(batches)} batches give no optimizer step with "
                         f"accumulation_steps={ft.accumulation_steps}")
    history: dict = {"losses": [], "val": [], "best_epoch": None}
    best_acc, best_params = -1.0, None
    rng = np.random.default_rng(seed)
    for si, stage in enumerate(stages):
        tx = make_optimizer(stage_optimizer(ft, stage.epochs * spe))
        graphdef, state = create_train_state(model, tx, seed + si, trainable=trainable)
        step = make_train_step(graphdef, loss_fn(stage.mask_variant, max_answer_tokens), tx)
        for epoch in range(stage.epochs):
            for i in rng.permutation(spe * ft.accumulation_steps):
                state, metrics = step(state, batches[int(i)])
                row = {"stage": si, "epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
                history["losses"].append(row["loss"])
                if log:
                    log(row)
                if not np.isfinite(row["loss"]):
                    raise FloatingPointError(f"non-finite loss at stage {si} epoch {epoch}")
            model = merge_model(graphdef, state)
            acc = on_epoch(model, si, epoch) if on_epoch else None
            if acc is not None:
                history["val"].append((si, epoch, acc))
                if si == len(stages) - 1 and acc >= best_acc:
                    best_acc, history["best_epoch"] = acc, epoch
                    best_params = jax.tree.map(np.asarray, state.params)
        model = merge_model(graphdef, state)
    if best_params is not None:
        nnx.update(model, best_params)
    return history | {"model": model}
