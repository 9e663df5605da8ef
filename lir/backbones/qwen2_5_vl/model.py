"""Qwen2.5-VL in Flax NNX: vision tower + language model, image-feature scatter, forward
with any boolean mask, and greedy generation with a KV cache (docs/lir.md D20).

Inputs are host-prepared arrays with static shapes:

* ``input_ids`` int32[B, S]; ``image_slots`` int32[B, S] = index of the merged visual token
  that replaces the embedding at that position (-1 elsewhere; :func:`image_slots`);
* ``positions`` int32[3, B, S] from :func:`lir.backbones.qwen2_5_vl.processor.rope_index`;
* ``patches`` float[N, 1176] and ``layout`` (``VisionLayout.arrays()``) of every image of the
  batch, packed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.nn import cache_mask
from lir.backbones.qwen2_5_vl.config import QwenVLConfig
from lir.backbones.qwen2_5_vl.language import LanguageModel
from lir.backbones.qwen2_5_vl.vision import VisionTower


def image_slots(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """int32[B, S]: the k-th ``<|image_pad|>`` of the batch (row-major) gets k, others -1,
    matching the packed merged-token order of the batch's images."""
    ids = np.asarray(input_ids)
    is_img = ids == image_token_id
    return np.where(is_img, np.cumsum(is_img.reshape(-1)).reshape(ids.shape) - 1, -1).astype(
        np.int32
    )


def causal_valid_mask(valid: jax.Array) -> jax.Array:
    """Causal mask with key padding: bool[B, S] valid -> bool[B, 1, S, S] (pad rows keep
    their diagonal so their softmax is finite)."""
    s = valid.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))[None]
    m = causal & valid[:, None, :]
    return (m | jnp.eye(s, dtype=bool)[None])[:, None]


class QwenVL(nnx.Module):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` in Flax NNX).

    Submodules: ``visual`` (:class:`VisionTower`), ``language`` (:class:`LanguageModel`).
    ``param_dtype`` is the storage dtype of every weight (bfloat16 for the real models);
    computation follows the weights' dtype, with norms, RoPE and softmax in float32."""

    def __init__(self, cfg: QwenVLConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(remat=cfg.remat, param_dtype=param_dtype, rngs=rngs)
        self.visual = VisionTower(cfg.vision, **kw)
        self.language = LanguageModel(cfg.text, attention_chunk=cfg.attention_chunk, **kw)

    def embed(
        self, input_ids, image_slots=None, patches=None, layout=None, *, features=None
    ) -> jax.Array:
        """Token embeddings with the visual tokens scattered in: float[B, S, D].

        The visual tokens are ``features`` float[T, D] when given (precomputed by the frozen
        tower), else the tower's output on ``patches`` / ``layout``; none: text only."""
        x = self.language.embed_tokens(jnp.asarray(input_ids))
        if features is not None:
            feats = jnp.asarray(features).astype(x.dtype)
        elif patches is not None:
            feats = self.visual(jnp.asarray(patches, x.dtype), layout).astype(x.dtype)
        else:
            return x
        slots = jnp.asarray(image_slots)
        rows = feats[jnp.clip(slots, 0, feats.shape[0] - 1)]
        return jnp.where((slots >= 0)[..., None], rows, x)

    def __call__(
        self,
        input_ids,
        positions,
        mask,
        image_slots=None,
        patches=None,
        layout=None,
        *,
        embeds=None,
        return_hidden: bool = False,
    ):
        """Logits float32[B, S, V] under ``mask`` bool[B|1, 1, S, S] (and the hiddens of
        :meth:`LanguageModel.__call__` with ``return_hidden``). ``embeds`` overrides the
        embedding step (LIVR splices its latents there)."""
        if embeds is None:
            embeds = self.embed(input_ids, image_slots, patches, layout)
        out = self.language(embeds, jnp.asarray(positions), mask, return_hidden=return_hidden)
        logits = self.language.logits(out[0])
        return (logits, out[2]) if return_hidden else logits


def greedy_generate(
    model: QwenVL,
    embeds: jax.Array,
    positions: jax.Array,
    rope_delta: jax.Array,
    valid: jax.Array,
    max_new_tokens: int,
    eos_token_id: int,
    prefill_mask: jax.Array | None = None,
    logit_limit: int | None = None,
) -> jax.Array:
    """Greedy decoding with a KV cache (docs/lir.md D9, D20).

    Args:
      embeds: float[B, S, D] prompt embeddings (images and latents already spliced in).
      positions: int[3, B, S] prompt M-RoPE ids; rope_delta int[B] from ``rope_index``.
      valid: bool[B, S]; prompts are right-padded (a row's valid tokens come first).
      max_new_tokens: static number of decode steps.
      eos_token_id: after it a row emits ``eos_token_id`` again.
      prefill_mask: bool[B, 1, S, S] for the prompt (default causal + padding); decode
        steps see every valid prompt key and every earlier generated token.
      logit_limit: argmax over the first ``logit_limit`` vocabulary rows only.
    Returns:
      int32[B, max_new_tokens] generated ids.
    """
    b, s, _ = embeds.shape
    valid = jnp.asarray(valid, bool)
    total = s + max_new_tokens
    caches = model.language.init_caches(b, total, embeds.dtype)
    key_valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), bool)], 1)
    if prefill_mask is None:
        prefill_mask = causal_valid_mask(valid)
    mask = jnp.pad(prefill_mask, ((0, 0), (0, 0), (0, 0), (0, max_new_tokens)))
    h, caches = model.language(embeds, positions, mask, caches)
    last = jnp.sum(valid, axis=1) - 1
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
    lengths = jnp.sum(valid, axis=1)  # valid tokens seen by each row

    def pick(hidden):
        logits = model.language.logits(hidden[:, 0])
        if logit_limit is not None:
            logits = logits[:, :logit_limit]
        return jnp.argmax(logits, -1).astype(jnp.int32)

    first = pick(h_last)

    def step_fn(carry, step):
        tok, done, caches = carry
        pos = jnp.broadcast_to((lengths + step - 1 + rope_delta)[None, :, None], (3, b, 1))
        m = cache_mask(s + step, 1, total, causal=True) & key_valid[:, None, None, :]
        x = model.language.embed_tokens(tok[:, None])
        h, caches = model.language(x, pos, m, caches)
        nxt = jnp.where(done, eos_token_id, pick(h))
        return (nxt, done | (nxt == eos_token_id), caches), nxt

    init = (first, first == eos_token_id, caches)
    _, rest = jax.lax.scan(step_fn, init, jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T.astype(jnp.int32)], axis=1)
