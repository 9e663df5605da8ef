"""LIVR on Qwen2.5-VL (LIVR §3.2-3.3, docs/lir.md D20): K latent tokens as a separate trainable
(K, D) table spliced after the prompt, the role masks of ``lir.masks`` on Qwen's chat
template, LoRA on the LM's q,k,v,o,gate,up,down only, answer-only loss, and the train /
predict steps.

Sequence of one example (LIVR §3.2, docs/lir.md D3-D4), with roles from :class:`lir.masks.Role`:

  SYSTEM  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
  IMAGE   <|vision_start|> <|image_pad|> x n_i <|vision_end|>   (per image; markers included)
  PROMPT  question + options
  LATENT  K latent slots (input ids = ``latent_token_id``; embeddings replaced by the table)
  TAIL    <|im_end|>\\n<|im_start|>assistant\\n
  ANSWER  answer text + <|im_end|>

The latents are never in the output vocabulary (docs/lir.md D1): logits cover the checkpoint's
vocabulary only, and the latent rows live in :attr:`QwenLIVR.latents` (``LatentParam``,
float32) rather than in the (frozen, bf16) embedding table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.nn import LoRALinear, apply_lora
from lir.backbones.qwen2_5_vl.model import QwenVL, greedy_generate, image_slots
from lir.backbones.qwen2_5_vl.processor import VisionLayout, rope_index, vision_layout
from lir.masks import Role, attention_mask
from lir.model import LM_LORA_TARGETS, LatentParam, LoRAConfig, answer_loss

SYSTEM_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n")
TAIL_TEXT = "<|im_end|>\n<|im_start|>assistant\n"
END_TEXT = "<|im_end|>"


@flax.struct.dataclass
class QwenBatch:
    """A fixed-shape batch (host NumPy or device arrays).

    input_ids, roles, image_slots, latent_ids, targets: int32[B, S]; loss_mask float32[B, S]
    (1 where the next token is an answer token); positions int32[3, B, S]; rope_delta
    int32[B]; patches float32[N, 1176] of every image of the batch; layout: the
    ``VisionLayout`` arrays of those patches (dict of int32 arrays).
    """

    input_ids: np.ndarray
    roles: np.ndarray
    positions: np.ndarray
    rope_delta: np.ndarray
    image_slots: np.ndarray
    latent_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    patches: np.ndarray
    layout: dict


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example's token ids and roles before padding (host lists)."""

    ids: list[int]
    roles: list[int]


def encode_example(encode: Callable[[str], list[int]], prompt: str, image_tokens: Sequence[int],
                   answer: str | None, num_latents: int, *, vision_start: int, vision_end: int,
                   image_pad: int, latent_token_id: int) -> Encoded:
    """Token ids and roles of one example (module docstring layout).

    Args:
      encode: text -> token ids (a Qwen tokenizer maps the ``<|...|>`` markers to their
        special ids).
      prompt: question and options. image_tokens: ``<|image_pad|>`` count of each image.
      answer: answer text (None: the prompt only, for generation).
      num_latents: K latent slots after the prompt (0 for direct SFT).
    """
    ids, roles = [], []

    def add(tokens, role):
        ids.extend(int(t) for t in tokens)
        roles.extend([int(role)] * len(tokens))

    add(encode(SYSTEM_TEXT), Role.SYSTEM)
    for n in image_tokens:
        add([vision_start] + [image_pad] * int(n) + [vision_end], Role.IMAGE)
    add(encode(prompt), Role.PROMPT)
    add([latent_token_id] * num_latents, Role.LATENT)
    add(encode(TAIL_TEXT), Role.TAIL)
    if answer is not None:
        add(encode(answer + END_TEXT), Role.ANSWER)
    return Encoded(ids, roles)


def make_batch(examples: Sequence[Encoded], patches: np.ndarray, grid_thw: np.ndarray,
               model_cfg, seq_len: int, n_patches: int | None = None,
               pad_token_id: int = 0) -> QwenBatch:
    """Pad ``examples`` to ``seq_len`` tokens (and the packed patches to ``n_patches``) and
    derive positions, image slots, latent ids and answer-only loss targets."""
    b = len(examples)
    ids = np.full((b, seq_len), pad_token_id, np.int32)
    roles = np.full((b, seq_len), int(Role.PAD), np.int32)
    for i, ex in enumerate(examples):
        if len(ex.ids) > seq_len:
            raise ValueError(f"example {i} has {len(ex.ids)} tokens; seq_len is {seq_len}")
        ids[i, :len(ex.ids)] = ex.ids
        roles[i, :len(ex.roles)] = ex.roles
    valid = roles != Role.PAD
    positions, delta = rope_index(ids, grid_thw, model_cfg.image_token_id, valid,
                                  model_cfg.vision.spatial_merge_size)
    is_lat = roles == Role.LATENT
    latent_ids = np.where(is_lat, np.cumsum(is_lat, axis=1) - 1, -1).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.full((b, 1), pad_token_id, np.int32)], 1)
    next_role = np.concatenate([roles[:, 1:], np.full((b, 1), int(Role.PAD), np.int32)], 1)
    loss_mask = (next_role == Role.ANSWER).astype(np.float32)
    n = patches.shape[0]
    n_patches = n if n_patches is None else n_patches
    if n_patches < n:
        raise ValueError(f"the batch's images have {n} patches; n_patches is {n_patches}")
    padded = np.concatenate([patches, np.zeros((n_patches - n, patches.shape[1]), np.float32)])
    layout: VisionLayout = vision_layout(grid_thw, model_cfg.vision, n_patches)
    slots = image_slots(np.where(valid, ids, pad_token_id), model_cfg.image_token_id)
    return QwenBatch(ids, roles, positions, delta, slots, latent_ids, targets.astype(np.int32),
                     loss_mask, padded.astype(np.float32), layout.arrays())


def init_latents(embedding: jax.Array, num_latents: int, key: jax.Array,
                 rows: int | None = None) -> jax.Array:
    """New latent rows float32[K, D] ~ per-dimension N(mean, std^2) of the first ``rows``
    embedding rows (the tokenizer's real tokens; docs/lir.md D2, close to HF's mean-resizing)."""
    emb = jnp.asarray(embedding[:rows] if rows else embedding, jnp.float32)
    mu, sd = jnp.mean(emb, 0), jnp.std(emb, 0)
    return mu + sd * jax.random.normal(key, (num_latents, emb.shape[1]), jnp.float32)


class QwenLIVR(nnx.Module):
    """Qwen2.5-VL plus K latent rows. ``base``: :class:`QwenVL` (frozen weights);
    ``latents``: LatentParam float32[K, D] (K may be 0: direct SFT / zero-shot)."""

    def __init__(self, base: QwenVL, num_latents: int, *, key: jax.Array,
                 vocab_rows: int | None = None):
        self.base = base
        emb = base.language.embed_tokens.embedding[...]
        self.num_latents = num_latents
        self.latents = LatentParam(init_latents(emb, max(num_latents, 1), key, vocab_rows)
                                   [:num_latents])

    def embed(self, batch: QwenBatch) -> jax.Array:
        """Input embeddings with images and latents spliced in: [B, S, D]."""
        x = self.base.embed(batch.input_ids, batch.image_slots, batch.patches, batch.layout)
        if self.num_latents:
            lat = jnp.asarray(batch.latent_ids)
            rows = self.latents[...][jnp.clip(lat, 0, self.num_latents - 1)].astype(x.dtype)
            x = jnp.where((lat >= 0)[..., None], rows, x)
        return x

    def __call__(self, batch: QwenBatch, mask_variant: str = "causal") -> jax.Array:
        """Logits float32[B, S, V] under the ``lir.masks`` variant (V = checkpoint vocab)."""
        mask = attention_mask(jnp.asarray(batch.roles), mask_variant)
        return self.base(batch.input_ids, batch.positions, mask, embeds=self.embed(batch))


def add_lora(model: QwenLIVR, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> list[tuple]:
    """LoRA on the language model's decoder layers only (LIVR §3.3, docs/lir.md D20: the vision
    blocks' gate/up/down_proj get none). LoRA matrices are float32 whatever the base dtype."""
    paths = apply_lora(model.base.language.layers, cfg.targets or LM_LORA_TARGETS, cfg.rank,
                       cfg.alpha, cfg.dropout, rngs=rngs)
    for _, m in nnx.iter_modules(model.base.language.layers):
        if isinstance(m, LoRALinear):
            m.lora_a.set_value(m.lora_a[...].astype(jnp.float32))
            m.lora_b.set_value(m.lora_b[...].astype(jnp.float32))
    return paths


def loss_fn(mask_variant: str):
    """``(model, batch, key) -> (answer-only NLL, {})`` for ``common.train.make_train_step``."""

    def fn(model: QwenLIVR, batch: QwenBatch, key):
        del key
        return answer_loss(model(batch, mask_variant), batch), {}

    return fn


def generate(model: QwenLIVR, batch: QwenBatch, max_new_tokens: int, eos_token_id: int,
             mask_variant: str = "causal") -> jax.Array:
    """Greedy answers int32[B, max_new_tokens] for prompt-only batches (right-padded, with
    the latents in place). ``mask_variant`` "bottleneck" keeps the Stage-1 mask on the
    prompt (the test-time bottleneck diagnostic; decode steps then see the image through
    the cache, so use it with one-token answers, docs/lir.md D13)."""
    roles = jnp.asarray(batch.roles)
    mask = attention_mask(roles, mask_variant)
    return greedy_generate(model.base, model.embed(batch), jnp.asarray(batch.positions),
                           jnp.asarray(batch.rope_delta), roles != Role.PAD, max_new_tokens,
                           eos_token_id, prefill_mask=mask)
