"""Qwen's LM with `attention_chunk` (training attention in query chunks) gives the logits it
gives in one pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def tiny_qwen_config(num_layers: int):
    """A Qwen2.5-VL config small enough to compile in seconds (shared by the lir tests)."""
    from lir.backbones.qwen2_5_vl.config import QwenVLConfig, TextConfig, VisionConfig

    vision = VisionConfig(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=(0,),
    )
    text = TextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(2, 3, 3),
    )
    return QwenVLConfig(vision=vision, text=text)


def test_qwen_language_model_with_attention_chunk_gives_the_same_logits():
    from lir.backbones.qwen2_5_vl.model import QwenVL

    cfg = tiny_qwen_config(2)
    S = 40
    ids = jax.random.randint(jax.random.key(1), (2, S), 0, 97)
    pos = jnp.broadcast_to(jnp.arange(S), (3, 2, S))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((S, S), bool)), (2, 1, S, S))
    want = QwenVL(cfg, rngs=nnx.Rngs(0))(ids, pos, mask)
    chunked = QwenVL(dataclasses.replace(cfg, attention_chunk=16), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(chunked(ids, pos, mask), want, rtol=1e-5, atol=1e-5)
