"""Qwen2.5-VL (3B / 7B Instruct) in Flax NNX, with LIVR on top (docs/lir.md D20).

Modules: ``config`` (shapes, config.json reader), ``processor`` (images, vision layout,
M-RoPE ids; NumPy), ``vision`` (tower + merger), ``language`` (decoder LM + KV cache),
``model`` (full model, greedy generation), ``weights`` (local safetensors loader),
``sharding`` (FSDP placement of frozen weights), ``features`` (per-example cache of the
frozen vision tower's output), ``livr`` (latents, LoRA, masks, batches, answer-only loss,
generation), ``trainer`` (two-stage schedule), ``memory`` (parameter counts, memory estimates).
"""

from lir.backbones.qwen2_5_vl.config import (
    QwenVLConfig,
    TextConfig,
    VisionConfig,
    qwen2_5_vl_3b,
    qwen2_5_vl_7b,
    read_config,
)
from lir.backbones.qwen2_5_vl.model import QwenVL, greedy_generate
from lir.backbones.qwen2_5_vl.weights import load_checkpoint

__all__ = [
    "QwenVL",
    "QwenVLConfig",
    "TextConfig",
    "VisionConfig",
    "greedy_generate",
    "load_checkpoint",
    "qwen2_5_vl_3b",
    "qwen2_5_vl_7b",
    "read_config",
]
