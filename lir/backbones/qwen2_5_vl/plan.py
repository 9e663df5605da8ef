"""Plan rows of the Qwen2.5-VL fine-tuning steps at the paper's shapes (LIVR §4, App. B).

The paper fine-tunes each task on one GPU at batch 1 × gradient accumulation 8, three
images per example at up to 1280 merged visual tokens each (docs/lir.md D20), with LoRA on
the LM (plus the K latent rows for LIVR) and the vision tower frozen. The trainer feeds
precomputed vision features (`features.VisionFeatureCache`), so the step planned here is the
LM's: embeddings with visual tokens and latents spliced in, the decoder under the stage's
mask, and the answer-only loss.

Compiling a 36-layer 3B step on a CPU takes many minutes, so each step is compiled at 1 and
2 decoder layers and FLOPs and bytes are extrapolated linearly in depth (each layer adds the
same weights, LoRA state and — with remat — the same saved activations). Parameter counts
are exact, from the full model built abstractly.

The bytes are an upper bound: XLA's CPU compiler does not let rematerialisation shorten
buffer lifetimes (a toy chain of checkpointed layers reports the same temporaries with and
without `jax.checkpoint`), so each layer's activations count as if kept for the backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from common import plan as P
from common.train import OptimizerConfig, make_optimizer, make_train_step
from lir.backbones.qwen2_5_vl.config import QwenVLConfig, qwen2_5_vl_3b, qwen2_5_vl_7b
from lir.backbones.qwen2_5_vl.livr import QwenBatch, QwenLIVR, add_lora, loss_fn
from lir.backbones.qwen2_5_vl.model import QwenVL
from lir.model import LIVR_FILTER, LORA_FILTER, LoRAConfig

SIZES = {"3b": qwen2_5_vl_3b, "7b": qwen2_5_vl_7b}
# (stage, mask variant, trainable filter, uses latents, epochs of the single-task recipe)
STAGES = (
    ("LIVR stage 1", "bottleneck", LIVR_FILTER, True, 4),
    ("LIVR stage 2", "causal", LIVR_FILTER, True, 6),
    ("direct SFT", "causal", LORA_FILTER, False, 10),
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of one paper-scale example: three images at the 1280-token budget."""

    images: int = 3
    tokens_per_image: int = 1280
    text_tokens: int = 192
    answer_tokens: int = 8
    train_examples: int = 1000  # a task's training split (LIVR §4.1)
    batch: int = 1
    accumulation: int = 8

    def seq_len(self, num_latents: int) -> int:
        s = self.images * self.tokens_per_image + self.text_tokens + num_latents
        return -(-s // 64) * 64  # the CLI rounds lengths up to 64 tokens


def _model(cfg: QwenVLConfig, lora: LoRAConfig, k: int) -> QwenLIVR:
    base = QwenVL(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = QwenLIVR(base, k, key=jax.random.key(0))
    add_lora(model, lora, rngs=nnx.Rngs(params=0, dropout=1))
    return model


def _batch(cfg: QwenVLConfig, shapes: Shapes, k: int) -> QwenBatch:
    b, s = shapes.batch, shapes.seq_len(k)
    i32 = jnp.int32
    spec = jax.ShapeDtypeStruct
    return QwenBatch(
        input_ids=spec((b, s), i32),
        roles=spec((b, s), i32),
        positions=spec((3, b, s), i32),
        rope_delta=spec((b,), i32),
        image_slots=spec((b, s), i32),
        latent_ids=spec((b, s), i32),
        targets=spec((b, s), i32),
        loss_mask=spec((b, s), jnp.float32),
        patches=None,
        layout=None,
        features=spec(
            (b * shapes.images * shapes.tokens_per_image, cfg.text.hidden_size), jnp.bfloat16
        ),
    )


def _row(cfg, lora, opt, shapes, stage, variant, trainable, k, mesh, acc, steps):
    tx = make_optimizer(opt)
    graphdef, state = P.abstract_train_state(lambda: _model(cfg, lora, k), tx, trainable)
    step = make_train_step(graphdef, loss_fn(variant, shapes.answer_tokens), tx)
    return P.plan_step(
        stage,
        step,
        state,
        _batch(cfg, shapes, k),
        mesh,
        steps=steps,
        items_per_step="",
        accelerator=acc,
        dtype="bfloat16",
    )


def _count(full: QwenVLConfig, lora: LoRAConfig, k: int, trainable=...) -> int:
    state = jax.eval_shape(lambda: nnx.state(_model(full, lora, k), trainable))
    return sum(x.size for x in jax.tree.leaves(state))


def _stage_row(
    full, lora, opt, shapes, stage, variant, trainable, k, mesh, acc, steps, attention_chunk
):
    depth = full.text.num_layers
    one, two = (
        _row(
            dataclasses.replace(full, text=dataclasses.replace(full.text, num_layers=n)),
            lora,
            opt,
            shapes,
            stage,
            variant,
            trainable,
            k,
            mesh,
            acc,
            steps,
        )
        for n in (1, 2)
    )

    def extrapolate(field):
        a, b = getattr(one, field), getattr(two, field)
        return type(a)(a + (depth - 1) * (b - a))

    flops = extrapolate("flops_per_device")
    return dataclasses.replace(
        two,
        params=_count(full, lora, k),
        trainable=_count(full, lora, k, trainable),
        items_per_step=(
            f"{shapes.batch} example × {shapes.images} images, "
            f"S={shapes.seq_len(k)}; 1 of {shapes.accumulation} accumulated"
        ),
        flops_per_device=flops,
        argument_bytes=extrapolate("argument_bytes"),
        output_bytes=extrapolate("output_bytes"),
        alias_bytes=extrapolate("alias_bytes"),
        temp_bytes=extrapolate("temp_bytes"),
        compile_seconds=one.compile_seconds + two.compile_seconds,
        est_step_seconds=two.est_step_seconds * flops / two.flops_per_device,
        note=(
            f"bf16 weights, remat per layer, attention in {attention_chunk}-query chunks, "
            "frozen vision features precomputed; FLOPs/bytes extrapolated from 1 "
            f"and 2 of {depth} layers; bytes an upper bound (CPU ignores remat)"
        ),
    )


def plan_rows(
    mesh,
    acc: P.Accelerator,
    opt: OptimizerConfig,
    lora: LoRAConfig,
    *,
    num_latents: int = 16,
    configs: dict[str, QwenVLConfig] | None = None,
    shapes: Shapes = Shapes(),
    attention_chunk: int | None = 512,
    stages=STAGES,
) -> list:
    """One `PlanRow` per (model, stage) of the single-task recipe, extrapolated to full depth
    from compiles at 1 and 2 decoder layers (see the module docstring).

    Args:
      configs: `{name: QwenVLConfig}` to plan; default the released 3B and 7B shapes.
      stages: a subset of `STAGES` (default all).
    """
    rows = []
    calls_per_epoch = shapes.train_examples // shapes.batch
    if configs is None:
        configs = {f"Qwen2.5-VL-{k.upper()}": make() for k, make in SIZES.items()}
    for name, qcfg in configs.items():
        full = dataclasses.replace(qcfg, remat=True, attention_chunk=attention_chunk)
        for stage, variant, trainable, latents, epochs in stages:
            row = _stage_row(
                full,
                lora,
                opt,
                shapes,
                f"{name} {stage}",
                variant,
                trainable,
                num_latents if latents else 0,
                mesh,
                acc,
                epochs * calls_per_epoch,
                attention_chunk,
            )
            rows.append(row)
    return rows
