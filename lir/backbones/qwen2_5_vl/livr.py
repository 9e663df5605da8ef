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
import optax
from flax import nnx

from common.nn import LoRALinear, apply_lora
from lir.backbones.qwen2_5_vl.model import QwenVL, greedy_generate, image_slots
from lir.backbones.qwen2_5_vl.processor import VisionLayout, rope_index, vision_layout
from lir.masks import Role, attention_mask
from lir.model import LM_LORA_TARGETS, LatentParam, LoRAConfig, answer_loss

SYSTEM_TEXT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TAIL_TEXT = "<|im_end|>\n<|im_start|>assistant\n"
END_TEXT = "<|im_end|>"


@flax.struct.dataclass
class QwenBatch:
    """A fixed-shape batch (host NumPy or device arrays).

    input_ids, roles, image_slots, latent_ids, targets: int32[B, S]; loss_mask float32[B, S]
    (1 where the next token is an answer token); positions int32[3, B, S]; rope_delta
    int32[B]; patches float32[N, 1176] of every image of the batch; layout: the
    ``VisionLayout`` arrays of those patches (dict of int32 arrays). Instead of patches and
    layout a batch may carry ``features`` float[T, D]: the frozen tower's merged visual
    tokens of its images, packed in image order (``lir.backbones.qwen2_5_vl.features``);
    then patches and layout are None.
    """

    input_ids: np.ndarray
    roles: np.ndarray
    positions: np.ndarray
    rope_delta: np.ndarray
    image_slots: np.ndarray
    latent_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    patches: np.ndarray | None
    layout: dict | None
    features: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example's token ids and roles before padding (host lists)."""

    ids: list[int]
    roles: list[int]


def encode_example(
    encode: Callable[[str], list[int]],
    prompt: str,
    image_tokens: Sequence[int],
    answer: str | None,
    num_latents: int,
    *,
    vision_start: int,
    vision_end: int,
    image_pad: int,
    latent_token_id: int,
) -> Encoded:
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


def _token_fields(
    examples: Sequence[Encoded], grid_thw: np.ndarray, model_cfg, seq_len: int, pad_token_id: int
) -> dict:
    """The token-level fields of :class:`QwenBatch` (all but patches / layout / features)."""
    b = len(examples)
    ids = np.full((b, seq_len), pad_token_id, np.int32)
    roles = np.full((b, seq_len), int(Role.PAD), np.int32)
    for i, ex in enumerate(examples):
        if len(ex.ids) > seq_len:
            raise ValueError(f"example {i} has {len(ex.ids)} tokens; seq_len is {seq_len}")
        ids[i, : len(ex.ids)] = ex.ids
        roles[i, : len(ex.roles)] = ex.roles
    valid = roles != Role.PAD
    positions, delta = rope_index(
        ids, grid_thw, model_cfg.image_token_id, valid, model_cfg.vision.spatial_merge_size
    )
    is_lat = roles == Role.LATENT
    latent_ids = np.where(is_lat, np.cumsum(is_lat, axis=1) - 1, -1).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.full((b, 1), pad_token_id, np.int32)], 1)
    next_role = np.concatenate([roles[:, 1:], np.full((b, 1), int(Role.PAD), np.int32)], 1)
    loss_mask = (next_role == Role.ANSWER).astype(np.float32)
    slots = image_slots(np.where(valid, ids, pad_token_id), model_cfg.image_token_id)
    return dict(
        input_ids=ids,
        roles=roles,
        positions=positions,
        rope_delta=delta,
        image_slots=slots,
        latent_ids=latent_ids,
        targets=targets.astype(np.int32),
        loss_mask=loss_mask,
    )


def make_batch(
    examples: Sequence[Encoded],
    patches: np.ndarray,
    grid_thw: np.ndarray,
    model_cfg,
    seq_len: int,
    n_patches: int | None = None,
    pad_token_id: int = 0,
) -> QwenBatch:
    """Pad ``examples`` to ``seq_len`` tokens (and the packed patches to ``n_patches``) and
    derive positions, image slots, latent ids and answer-only loss targets."""
    fields = _token_fields(examples, grid_thw, model_cfg, seq_len, pad_token_id)
    n = patches.shape[0]
    n_patches = n if n_patches is None else n_patches
    if n_patches < n:
        raise ValueError(f"the batch's images have {n} patches; n_patches is {n_patches}")
    padded = np.concatenate([patches, np.zeros((n_patches - n, patches.shape[1]), np.float32)])
    layout: VisionLayout = vision_layout(grid_thw, model_cfg.vision, n_patches)
    return QwenBatch(**fields, patches=padded.astype(np.float32), layout=layout.arrays())


def make_feature_batch(
    examples: Sequence[Encoded],
    features: np.ndarray,
    grid_thw: np.ndarray,
    model_cfg,
    seq_len: int,
    n_tokens: int | None = None,
    pad_token_id: int = 0,
) -> QwenBatch:
    """:func:`make_batch` with precomputed visual tokens instead of patches.

    Args:
      features: float[T, D], the merged visual tokens of every image of ``examples``
        (example-major, image order), e.g. concatenated ``VisionFeatureCache`` entries.
      n_tokens: pad ``features`` to this many rows (a static shape; default T).
    """
    fields = _token_fields(examples, grid_thw, model_cfg, seq_len, pad_token_id)
    t = features.shape[0]
    want = int((fields["input_ids"] == model_cfg.image_token_id).sum())
    if t != want:
        raise ValueError(f"features has {t} rows but the examples hold {want} image tokens")
    n_tokens = t if n_tokens is None else n_tokens
    if n_tokens < t:
        raise ValueError(f"the batch's images have {t} visual tokens; n_tokens is {n_tokens}")
    padded = np.concatenate([features, np.zeros((n_tokens - t, features.shape[1]), features.dtype)])
    return QwenBatch(**fields, patches=None, layout=None, features=padded)


def init_latents(
    embedding: jax.Array, num_latents: int, key: jax.Array, rows: int | None = None
) -> jax.Array:
    """New latent rows float32[K, D] ~ per-dimension N(mean, std^2) of the first ``rows``
    embedding rows (the tokenizer's real tokens; docs/lir.md D2, close to HF's mean-resizing)."""
    emb = jnp.asarray(embedding[:rows] if rows else embedding, jnp.float32)
    mu, sd = jnp.mean(emb, 0), jnp.std(emb, 0)
    return mu + sd * jax.random.normal(key, (num_latents, emb.shape[1]), jnp.float32)


class QwenLIVR(nnx.Module):
    """Qwen2.5-VL plus K latent rows. ``base``: :class:`QwenVL` (frozen weights);
    ``latents``: LatentParam float32[K, D] (K may be 0: direct SFT / zero-shot)."""

    def __init__(
        self, base: QwenVL, num_latents: int, *, key: jax.Array, vocab_rows: int | None = None
    ):
        self.base = base
        emb = base.language.embed_tokens.embedding[...]
        self.num_latents = num_latents
        self.latents = LatentParam(
            init_latents(emb, max(num_latents, 1), key, vocab_rows)[:num_latents]
        )

    def embed(self, batch: QwenBatch) -> jax.Array:
        """Input embeddings with images and latents spliced in: [B, S, D]."""
        x = self.base.embed(
            batch.input_ids, batch.image_slots, batch.patches, batch.layout, features=batch.features
        )
        if self.num_latents:
            lat = jnp.asarray(batch.latent_ids)
            rows = self.latents[...][jnp.clip(lat, 0, self.num_latents - 1)].astype(x.dtype)
            x = jnp.where((lat >= 0)[..., None], rows, x)
        return x

    def __call__(self, batch: QwenBatch, mask_variant: str = "causal") -> jax.Array:
        """Logits float32[B, S, V] under the ``lir.masks`` variant (V = checkpoint vocab)."""
        mask = attention_mask(jnp.asarray(batch.roles), mask_variant)
        return self.base(batch.input_ids, batch.positions, mask, embeds=self.embed(batch))

    def hidden(self, batch: QwenBatch, mask_variant: str = "causal") -> jax.Array:
        """The LM's final normed hidden states [B, S, D] (the head's input)."""
        mask = attention_mask(jnp.asarray(batch.roles), mask_variant)
        return self.base.language(self.embed(batch), jnp.asarray(batch.positions), mask)[0]


def add_lora(model: QwenLIVR, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> list[tuple]:
    """LoRA on the language model's decoder layers only (LIVR §3.3, docs/lir.md D20: the vision
    blocks' gate/up/down_proj get none). LoRA matrices are float32 whatever the base dtype."""
    paths = apply_lora(
        model.base.language.layers,
        cfg.targets or LM_LORA_TARGETS,
        cfg.rank,
        cfg.alpha,
        cfg.dropout,
        rngs=rngs,
    )
    for _, m in nnx.iter_modules(model.base.language.layers):
        if isinstance(m, LoRALinear):
            m.lora_a.set_value(m.lora_a[...].astype(jnp.float32))
            m.lora_b.set_value(m.lora_b[...].astype(jnp.float32))
    return paths


def answer_positions(mask: np.ndarray) -> int:
    """Most supervised positions of one row of ``mask`` [B, S] (host): the least valid
    ``max_answer_tokens`` of :func:`answer_only_loss`."""
    return int((np.asarray(mask) > 0).sum(-1).max(initial=0))


def answer_only_loss(
    hidden: jax.Array,
    lm_head: Callable[[jax.Array], jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    max_answer_tokens: int,
) -> jax.Array:
    """Mean next-token cross-entropy over the supervised positions, projecting only those to
    the vocabulary (``lir.model.answer_loss`` on full logits costs a float32 [B, S, V]
    array: 2.5 GB at S = 4096 and Qwen's V = 151,936).

    Args:
      hidden: float[B, S, D] final hidden states (the head's input).
      lm_head: float[..., D] -> float32 logits [..., V].
      labels: int[B, S] target ids; mask: float or bool [B, S] loss weights (0 = unsupervised).
      max_answer_tokens: static bound on a row's supervised positions; with more, the later
        ones are dropped (check on the host with :func:`answer_positions`).
    Returns:
      scalar float32, sum(w * nll) / max(sum(w), 1) over the kept positions.
    """
    b, s, _ = hidden.shape
    a = min(int(max_answer_tokens), s)
    mask = jnp.asarray(mask)
    on = mask > 0
    # positions of each row's supervised tokens first (stable: in sequence order), then the rest
    idx = jnp.argsort(~on, axis=1, stable=True)[:, :a]  # [B, A]
    kept = jnp.take_along_axis(on, idx, 1)
    w = jnp.where(kept, jnp.take_along_axis(mask.astype(jnp.float32), idx, 1), 0.0)
    h = jnp.take_along_axis(hidden, idx[..., None], 1)  # [B, A, D]
    y = jnp.take_along_axis(jnp.asarray(labels), idx, 1)
    nll = optax.softmax_cross_entropy_with_integer_labels(lm_head(h).astype(jnp.float32), y)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def loss_fn(mask_variant: str, max_answer_tokens: int | None = None):
    """``(model, batch, key) -> (answer-only NLL, {})`` for ``common.train.make_train_step``.

    With ``max_answer_tokens`` only the answer positions reach the vocabulary projection
    (:func:`answer_only_loss`); None projects every position (``lir.model.answer_loss``)."""

    def fn(model: QwenLIVR, batch: QwenBatch, key):
        del key
        if max_answer_tokens is None:
            return answer_loss(model(batch, mask_variant), batch), {}
        return answer_only_loss(
            model.hidden(batch, mask_variant),
            model.base.language.logits,
            batch.targets,
            batch.loss_mask,
            max_answer_tokens,
        ), {}

    return fn


def generate(
    model: QwenLIVR,
    batch: QwenBatch,
    max_new_tokens: int,
    eos_token_id: int,
    mask_variant: str = "causal",
) -> jax.Array:
    """Greedy answers int32[B, max_new_tokens] for prompt-only batches (right-padded, with
    the latents in place). ``mask_variant`` "bottleneck" keeps the Stage-1 mask on the
    prompt (the test-time bottleneck diagnostic; decode steps then see the image through
    the cache, so use it with one-token answers, docs/lir.md D13)."""
    roles = jnp.asarray(batch.roles)
    mask = attention_mask(roles, mask_variant)
    return greedy_generate(
        model.base,
        model.embed(batch),
        jnp.asarray(batch.positions),
        jnp.asarray(batch.rope_delta),
        roles != Role.PAD,
        max_new_tokens,
        eos_token_id,
        prefill_mask=mask,
    )
