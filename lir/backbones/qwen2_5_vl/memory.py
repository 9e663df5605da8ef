"""Parameter counts and device-memory estimates of LIVR fine-tuning from a config alone
(no weights; the module is built with ``nnx.eval_shape``), for sizing 3B / 7B runs.

Estimate per device at the paper's settings (LIVR App. B, docs/lir.md D8): bf16 frozen weights
(sharded FSDP-style over ``n_devices``), float32 LoRA + latents with AdamW moments and a
gradient (4 copies), and activations with per-layer rematerialisation: the bf16 residual
stream kept at every LM layer boundary, plus one layer's recomputed working set (float32
attention logits and probabilities over the dense S x S mask, the SwiGLU intermediates),
and float32 logits at the answer positions only (``livr.answer_only_loss``). The vision
tower is frozen and runs once per example outside the train step
(``features.VisionFeatureCache``); :func:`vision_attention_memory` sizes its attention.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from lir.backbones.qwen2_5_vl.config import QwenVLConfig
from lir.backbones.qwen2_5_vl.model import QwenVL

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=8)
def parameter_counts(cfg: QwenVLConfig) -> dict[str, int]:
    """Exact parameter counts of the port: vision tower + merger, LM (with embeddings and
    head), total."""
    model = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    vision = size(nnx.state(model.visual, nnx.Param))
    lm = size(nnx.state(model.language, nnx.Param))
    return {"vision": vision, "language": lm, "total": vision + lm}


def lora_parameters(cfg: QwenVLConfig, rank: int = 16) -> int:
    """LoRA A + B parameters on the 7 LM projections of every decoder layer."""
    t = cfg.text
    d, f, kv = t.hidden_size, t.intermediate_size, t.num_kv_heads * t.head_dim
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return t.num_layers * sum(rank * (i + o) for i, o in shapes)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    trainable_gb: float
    activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.trainable_gb + self.activations_gb


def vision_attention_memory(
    cfg: QwenVLConfig, n_patches: int, *, query_chunk: int = 512
) -> dict[str, float]:
    """Peak bytes (GB = 1e9) of one vision attention layer over ``n_patches`` packed patches:
    float32 logits + probabilities and the boolean mask.

    "dense": the [H, N, N] logits of a segment mask over all N patches (plus the two [N, N]
    window / image masks, held across layers); "window" / "full": ``vision.segment_attention``
    (3W-key bands of W-patch blocks; ``query_chunk``-row chunks against all N keys)."""
    v = cfg.vision
    h, n = v.num_heads, n_patches
    w = (v.window_size // v.patch_size) ** 2
    nw = -(-n // w) * w
    c = min(query_chunk, n)
    dense = 2 * h * n * n * 4 + 2 * n * n
    window = 2 * h * nw * 3 * w * 4 + nw * 3 * w
    full = 2 * h * c * n * 4 + c * n
    return {"dense": dense / 1e9, "window": window / 1e9, "full": full / 1e9}


def training_memory(
    cfg: QwenVLConfig,
    seq_len: int,
    batch: int = 1,
    rank: int = 16,
    num_latents: int = 16,
    n_devices: int = 1,
    weight_bytes: int = 2,
    max_answer_tokens: int = 32,
) -> MemoryEstimate:
    """Rough per-device memory (GB = 1e9 bytes) of one LIVR train step (module docstring)."""
    t = cfg.text
    counts = parameter_counts(cfg)
    weights = counts["total"] * weight_bytes / n_devices
    trainable = (lora_parameters(cfg, rank) + num_latents * t.hidden_size) * 4 * 4
    residual = t.num_layers * batch * seq_len * t.hidden_size * 2
    attn = 2 * batch * t.num_heads * seq_len * seq_len * 4
    mlp = 3 * batch * seq_len * t.intermediate_size * 4
    logits = 2 * batch * min(max_answer_tokens, seq_len) * t.vocab_size * 4
    acts = residual + attn + mlp + logits
    return MemoryEstimate(weights / 1e9, trainable / 1e9, acts / 1e9)
