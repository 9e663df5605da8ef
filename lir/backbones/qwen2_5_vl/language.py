"""Qwen2.5-VL language model in Flax NNX: GQA with q/k/v bias and M-RoPE, SwiGLU, RMSNorm,
tied or untied head, and a per-layer KV cache (docs/lir.md D20).

Attention is ``common.nn.Attention`` (rotate-half multi-axis RoPE with the t/h/w sections
``mrope_section``, boolean masks, ``common.nn.KVCache``); the MLP is ``common.nn.MLP``
("swiglu", no bias). Projection names follow Hugging Face (``q_proj`` ... ``down_proj``),
which are also the LoRA targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import MLP, Attention, KVCache, RMSNorm, dense, init_cache
from lir.backbones.qwen2_5_vl.config import TextConfig
from lir.backbones.qwen2_5_vl.vision import remat_call


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: ``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, cfg: TextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            qkv_bias=True,
            out_bias=False,
            position="rope",
            rope_theta=cfg.rope_theta,
            rope_sections=cfg.mrope_section,
            **kw,
        )
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, "swiglu", use_bias=False, **kw)

    def __call__(self, x, mask, positions, cache: KVCache | None = None):
        """x [B, T, D], mask bool[B|1, 1, T, K], positions int[3, B, T] -> (x, cache)."""
        h, cache = self.self_attn(
            self.input_layernorm(x), mask=mask, positions=positions, cache=cache
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LanguageModel(nnx.Module):
    """Token embeddings, ``num_layers`` decoder layers, final norm and the LM head.

    Submodules: ``embed_tokens`` (nnx.Embed [V, D]), ``layers``, ``norm``, ``lm_head``
    (Dense D -> V without bias; None when the head is tied to ``embed_tokens``)."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        remat: bool = False,
        attention_chunk: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(cfg, **kw) for _ in range(cfg.num_layers)])
        for layer in self.layers:
            layer.self_attn.query_chunk = attention_chunk
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else dense(cfg.hidden_size, cfg.vocab_size, use_bias=False, **kw)
        )

    def init_caches(self, batch: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
        """One empty cache per layer: k/v [batch, max_len, Hkv, Dh]."""
        c = self.cfg
        return [
            init_cache(batch, max_len, c.num_kv_heads, c.head_dim, dtype)
            for _ in range(c.num_layers)
        ]

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        caches: list[KVCache] | None = None,
        *,
        return_hidden: bool = False,
    ):
        """Decoder stack.

        Args:
          embeds: float[B, T, D] input embeddings.
          positions: int[3, B, T] M-RoPE (t, h, w) position ids.
          mask: bool[B|1, 1, T, K] (K = T, or the cache length with ``caches``).
          caches: per-layer KV caches (written at their ``length``), or None.
          return_hidden: also return the input of every layer and the final normed state.
        Returns:
          (final normed hidden [B, T, D], new caches or None[, list of hiddens]).
        """
        x = embeds
        hidden = []
        new_caches = [] if caches is not None else None

        for i, layer in enumerate(self.layers):
            hidden.append(x)
            if caches is None and self.remat:
                x = remat_call(layer, x, mask, positions)
            elif caches is None:
                x = layer(x, mask, positions)[0]
            else:
                x, c = layer(x, mask, positions, caches[i])
                new_caches.append(c)
        x = self.norm(x)
        hidden.append(x)
        return (x, new_caches, hidden) if return_hidden else (x, new_caches)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden [..., D] -> float32 logits [..., V] (tied: h @ embed_tokens.T)."""
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return out.astype(jnp.float32)
