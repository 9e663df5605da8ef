"""Two-stage LIVR / direct-SFT fine-tuning of :class:`QwenLIVR` (LIVR §3.2, App. B;
docs/lir.md D5-D6).

Each stage gets a fresh AdamW and a fresh 5%-warmup cosine schedule
(``lir.config.stage_optimizer``) and runs through ``common.train.run_stage`` (the weights keep
the sharding they were loaded with, FSDP-style on several devices). Only the
method's parameters train: LoRA for SFT, LoRA + latent rows for LIVR; everything else
(vision tower, merger, LM weights, embedding table, head) is frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from common.data import SequenceIterator
from common.rng import stream_seed
from common.train import STEPS, create_train_state, merge_model, run_stage
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


def finetune(
    model: QwenLIVR,
    method: str,
    ft: FinetuneConfig,
    batches: Sequence[QwenBatch],
    *,
    seed: int = 42,
    max_answer_tokens: int | None = None,
    on_epoch: Callable[[QwenLIVR, int, int], float | None] | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
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
        raise ValueError(
            f"{len(batches)} batches give no optimizer step with "
            f"accumulation_steps={ft.accumulation_steps}"
        )
    calls = spe * ft.accumulation_steps  # train-step calls per epoch
    history: dict = {"losses": [], "val": [], "best_epoch": None}
    best: dict = {"acc": -1.0, "params": None}
    epoch0 = 0
    for si, stage in enumerate(stages):
        opt = stage_optimizer(ft, stage.epochs * spe)
        graphdef, state = create_train_state(
            model, STEPS.optimizer(opt), stream_seed(seed, "qwen_finetune", si), trainable=trainable
        )
        step = STEPS.train_step(
            graphdef,
            opt,
            loss_fn(stage.mask_variant, max_answer_tokens),
            loss_key=("qwen_livr", stage.mask_variant, max_answer_tokens),
        )
        # One order per epoch over the whole run: stage 2 continues at epoch `epoch0`.
        data = SequenceIterator(_Prefix(batches, calls), seed=stream_seed(seed, "batch_order"))
        data.set_state({"epoch": epoch0, "position": 0})
        last = si == len(stages) - 1

        def on_eval(st, si=si, graphdef=graphdef, last=last):
            epoch = int(st.step) // calls - 1
            acc = on_epoch(merge_model(graphdef, st), si, epoch) if on_epoch else None
            if acc is None:
                return {}
            history["val"].append((si, epoch, acc))
            if last and acc >= best["acc"]:  # ties: the later epoch (docs/lir.md D6)
                best.update(acc=acc, params=jax.tree.map(np.asarray, st.params))
                history["best_epoch"] = epoch
            return {"val_accuracy": acc}

        result = run_stage(
            f"qwen {method} stage {si + 1}",
            state,
            step,
            data,
            stage.epochs * calls,
            eval_fn=on_eval,
            eval_every=calls,
            log_every=1,
            verbose=False,
            placement="as_given",
            metrics_writer=_Log(history, log, si, calls),
        )
        model = merge_model(graphdef, result.state)
        epoch0 += stage.epochs
    if best["params"] is not None:
        nnx.update(model, best["params"])
    return history | {"model": model}


class _Prefix:
    """The first `n` items of a sequence (whole accumulation groups of an epoch)."""

    def __init__(self, items: Sequence, n: int):
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.items[i]


class _Log:
    """`run_stage`'s metrics writer: losses into the history, each step's row to `log`."""

    def __init__(self, history: dict, log, stage: int, calls: int):
        self.history, self.log, self.stage, self.calls = history, log, stage, calls

    def write(self, step: int, metrics: dict) -> None:
        if "loss" not in metrics:  # an evaluation record
            return
        row = {"stage": self.stage, "epoch": (step - 1) // self.calls, **metrics}
        self.history["losses"].append(row["loss"])
        if self.log:
            self.log(row)
