"""Shared Flax NNX layers of paperjax.

Conventions: activations are [B, T, D]; attention tensors are q [B, Q, H, Dh], k/v
[B, K, Hkv, Dh]; masks are bool [B|1, 1|H, Q, K] with True = "may attend"; params are
float32 unless `param_dtype` says otherwise; every layer takes `rngs` as a keyword and
every linear projection accepts `kernel_init`.
"""

from common.nn.adaln import AdaLNBlock, AdaLNFinal, TimestepEmbedder, modulate
from common.nn.attention import (
    Attention,
    KVCache,
    attention_weights,
    cache_mask,
    causal_mask,
    chunked_attention,
    dot_product_attention,
    init_cache,
    padding_mask,
    update_cache,
)
from common.nn.linear import default_kernel_init, dense
from common.nn.lora import LoRALinear, apply_lora, merge_lora
from common.nn.mlp import MLP
from common.nn.norms import LayerNorm, RMSNorm
from common.nn.positions import (
    RelativePositionBias,
    apply_multi_axis_rope,
    apply_rope,
    relative_position_bucket,
    rope_frequencies,
    sinusoidal_embedding,
)
from common.nn.transformer import StackOutput, TransformerBlock, TransformerStack, make_norm
from common.nn.vit import PatchEmbed, ViTEncoder, patchify

__all__ = [
    "AdaLNBlock",
    "AdaLNFinal",
    "Attention",
    "KVCache",
    "LayerNorm",
    "LoRALinear",
    "MLP",
    "PatchEmbed",
    "RMSNorm",
    "RelativePositionBias",
    "StackOutput",
    "TimestepEmbedder",
    "TransformerBlock",
    "TransformerStack",
    "ViTEncoder",
    "apply_lora",
    "apply_multi_axis_rope",
    "apply_rope",
    "attention_weights",
    "cache_mask",
    "causal_mask",
    "default_kernel_init",
    "dense",
    "chunked_attention",
    "dot_product_attention",
    "init_cache",
    "make_norm",
    "merge_lora",
    "modulate",
    "padding_mask",
    "patchify",
    "relative_position_bucket",
    "rope_frequencies",
    "sinusoidal_embedding",
    "update_cache",
]
