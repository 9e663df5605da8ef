"""The tiny LMM of lir: ViT encoder -> projector -> decoder LM, with LIVR's latent tokens.

Data flow of ``LMM.__call__(batch, mask_variant)`` for a :class:`lir.data.Batch`:

1. each image uint8[H, W, 3] -> /255 -> ``vit`` (common ViTEncoder) -> [N, d_vit] ->
   ``projector`` (LayerNorm + Dense, docs/lir.md D15) -> [N, d];
2. token embeddings ``embed(tokens)`` [B, S, d]; image-patch slots are overwritten by the
   projected features (``batch.image_slots``), every token of image j's block (markers
   included) gets the image-index embedding row j (``batch.image_ids``);
3. latent slots are overwritten by the rows of the separate trainable latent table
   ``latents`` (K, d) (``batch.latent_ids``; LIVR §3.2, docs/lir.md D1): latents are inputs
   only, never generated, never in the loss and not in the output vocabulary;
4. the decoder ``lm`` (common TransformerStack, RoPE on ``batch.positions``) runs under the
   boolean mask ``lir.masks.attention_mask(batch.roles, mask_variant)``;
5. logits = final hidden states @ embed.T (tied head over the token vocabulary only).

Trainable groups are told apart by variable type: base weights are ``nnx.Param``, LoRA
matrices ``nnx.LoRAParam`` (common/nn/lora.py, added by :func:`add_lora`), latent rows
:class:`LatentParam`. Phase-F filters: ``LORA_FILTER`` (direct SFT, mask-only),
``LIVR_FILTER`` (LIVR and latents-only: LoRA + latents), ``LATENT_FILTER`` (prompt tuning:
K soft vectors at the latent slots, no LoRA, docs/lir.md D11); pretraining trains every
``nnx.Param`` except latents and LoRA (``PRETRAIN_FILTER``).

Arms as (K, stage masks, filter): SFT (0, causal, LoRA); LIVR (K, bottleneck then causal,
LIVR); latents-only (K, causal, LIVR); mask-only (0, answer_only then causal, LoRA); the
mask ablations swap the stage-1 variant (``lir.masks``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common.config import require
from common.nn import LayerNorm, TransformerStack, ViTEncoder, apply_lora, dense
from lir.data import Batch
from lir.masks import Role, attention_mask
from lir.tasks.vocab import VOCAB_SIZE

LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LatentParam(nnx.Param):
    """The K latent-token embedding rows (their own type so optimizer filters can pick them)."""


LORA_FILTER = nnx.LoRAParam
LATENT_FILTER = LatentParam
LIVR_FILTER = nnx.Any(nnx.LoRAParam, LatentParam)
PRETRAIN_FILTER = nnx.All(nnx.Param, nnx.Not(LatentParam), nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the tiny LMM (docs/lir.md D15 defaults: 48 px, patch 8, ViT 64x3, LM 96x4)."""

    image_size: int = 48
    patch_size: int = 8
    vit_dim: int = 64
    vit_depth: int = 3
    vit_heads: int = 4
    vit_mlp_ratio: int = 4
    lm_dim: int = 96
    lm_depth: int = 4
    lm_heads: int = 4
    lm_mlp_ratio: int = 4
    lm_activation: str = "gelu"
    lm_norm: str = "layer"
    rope_theta: float = 10000.0
    max_images: int = 3
    num_latents: int = 16
    latent_init_std: float = 0.02
    # one latent row repeated K times (the "shared latents" ablation, LIVR §4.4.3)
    shared_latents: bool = False
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self):
        req = functools.partial(require, self)
        req(
            "image_size",
            self.image_size % self.patch_size == 0,
            f"a multiple of patch_size={self.patch_size}",
        )
        req(
            "lm_dim",
            self.lm_dim % self.lm_heads == 0 and (self.lm_dim // self.lm_heads) % 2 == 0,
            f"to split into lm_heads={self.lm_heads} heads of even size (RoPE)",
        )
        req("num_latents", self.num_latents >= 0, ">= 0")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the LM's attention and MLP projections (LIVR App. B: r 16, alpha 32, dropout
    0.05 in the paper; docs/lir.md D15: r 8, alpha 16 for the tiny model)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LM_LORA_TARGETS


class LMM(nnx.Module):
    """Tiny vision-language model; see the module docstring. Submodules: ``vit``,
    ``projector_norm``, ``projector``, ``embed``, ``image_index``, ``lm``; variable
    ``latents`` (LatentParam, float32[K, lm_dim])."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vit = ViTEncoder(
            cfg.image_size,
            cfg.patch_size,
            3,
            cfg.vit_dim,
            cfg.vit_depth,
            cfg.vit_heads,
            cfg.vit_mlp_ratio * cfg.vit_dim,
            rngs=rngs,
        )
        self.projector_norm = LayerNorm(cfg.vit_dim, rngs=rngs)
        self.projector = dense(cfg.vit_dim, cfg.lm_dim, rngs=rngs)
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.lm_dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        self.image_index = nnx.Embed(
            cfg.max_images, cfg.lm_dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        # latent init N(0, 0.02) (docs/lir.md D2); reset_latents re-draws them around the mean
        # embedding row before fine-tuning (docs/lir.md D2)
        rows = min(cfg.num_latents, 1) if cfg.shared_latents else cfg.num_latents
        self.latents = LatentParam(
            cfg.latent_init_std * jax.random.normal(rngs.params(), (rows, cfg.lm_dim))
        )
        self.lm = TransformerStack(
            cfg.lm_depth,
            cfg.lm_dim,
            cfg.lm_heads,
            cfg.lm_mlp_ratio * cfg.lm_dim,
            activation=cfg.lm_activation,
            norm=cfg.lm_norm,
            position="rope",
            rope_theta=cfg.rope_theta,
            rngs=rngs,
        )

    def image_features(self, images: jax.Array) -> jax.Array:
        """uint8|float[B, M, H, W, 3] -> projected patch features float32[B, M * N, lm_dim].
        uint8 images are scaled to [0, 1]; float images are used as given."""
        b, m, h, w, c = images.shape
        want = (self.cfg.image_size, self.cfg.image_size, 3)
        if (h, w, c) != want:
            raise ValueError(
                f"images must be [B, M, {want[0]}, {want[1]}, 3]; got {tuple(images.shape)}"
            )
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 255.0
        feats = self.vit(x.reshape(b * m, h, w, c))
        feats = self.projector(self.projector_norm(feats))
        return feats.reshape(b, m * feats.shape[1], -1)

    def embed_inputs(self, batch: Batch) -> jax.Array:
        """Input embeddings float32[B, S, lm_dim] (steps 1-3 of the module docstring)."""
        m = batch.images.shape[1]
        if m > self.cfg.max_images:
            raise ValueError(f"batch has {m} image slots; model max_images={self.cfg.max_images}")
        x = self.embed(batch.tokens)
        feats = self.image_features(batch.images)
        slots = jnp.asarray(batch.image_slots)
        gathered = jnp.take_along_axis(feats, jnp.clip(slots, 0)[..., None], axis=1)
        x = jnp.where((slots >= 0)[..., None], gathered, x)
        img_ids = jnp.asarray(batch.image_ids)
        x = x + jnp.where((img_ids >= 0)[..., None], self.image_index(jnp.clip(img_ids, 0)), 0.0)
        if self.cfg.num_latents:
            lat_ids = jnp.asarray(batch.latent_ids)
            rows = self.latents[...][jnp.clip(lat_ids, 0, self.latents.shape[0] - 1)]
            x = jnp.where((lat_ids >= 0)[..., None], rows, x)
        return x

    def hidden(self, batch: Batch, mask_variant: str = "causal") -> jax.Array:
        """Final-normed LM hidden states float32[B, S, lm_dim]."""
        mask = attention_mask(batch.roles, mask_variant)
        return self.lm(self.embed_inputs(batch), mask=mask, positions=batch.positions).out

    def __call__(self, batch: Batch, mask_variant: str = "causal") -> jax.Array:
        """Next-token logits float32[B, S, vocab_size] under ``mask_variant``
        (``lir.masks.MASK_VARIANTS``). Latent slots get logits too; nothing reads them."""
        return self.embed.attend(self.hidden(batch, mask_variant))


def add_lora(model: LMM, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> list[tuple]:
    """Wrap the LM's projections named in ``cfg.targets`` with LoRA (in place; the ViT and
    projector get none: LIVR §3.3 trains the language backbone only). B starts at zero, so the
    model is unchanged. With ``cfg.dropout > 0`` the LoRA dropout draws from ``rngs``'
    "dropout" stream and is active until ``model.eval()``."""
    present = {p[-1] for p, _ in nnx.iter_modules(model.lm) if p}
    targets = tuple(t for t in cfg.targets if t in present)
    return apply_lora(model.lm, targets, cfg.rank, cfg.alpha, cfg.dropout, rngs=rngs)


def forward(graphdef: nnx.GraphDef, state, batch: Batch, mask_variant: str = "causal"):
    """Pure forward for ``jax.jit`` (``mask_variant`` static): logits float32[B, S, V]."""
    return nnx.merge(graphdef, state)(batch, mask_variant)


def reset_latents(model: LMM, key: jax.Array, std: float = 0.02) -> None:
    """Re-draw the latent rows as mean embedding row + std * N(0, I) (docs/lir.md D2; call it
    once after pretraining, before fine-tuning)."""
    mu = jnp.mean(model.embed.embedding[...], axis=0)
    model.latents[...] = mu + std * jax.random.normal(key, model.latents.shape)


def answer_logits(logits: jax.Array, batch: Batch) -> jax.Array:
    """Logits at each example's answer query: [B, S, V] -> [B, V]."""
    idx = jnp.asarray(batch.answer_index)
    return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


def answer_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy over answer targets only (LIVR §3.2): scalar float32."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch.targets))
    w = jnp.asarray(batch.loss_mask)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def choice_predictions(logits: jax.Array, batch: Batch) -> jax.Array:
    """Predicted answer token int32[B]: argmax over each example's valid choices."""
    a = answer_logits(logits, batch)
    a = jnp.where(jnp.asarray(batch.choice_mask), a, -jnp.inf)
    return jnp.argmax(a, axis=-1).astype(jnp.int32)


def accuracy(logits: jax.Array, batch: Batch) -> jax.Array:
    """Fraction of examples whose choice prediction equals the gold answer (float32)."""
    return jnp.mean(choice_predictions(logits, batch) == jnp.asarray(batch.answer))


def loss_fn(mask_variant: str = "causal"):
    """``(model, batch, key) -> (loss, {"accuracy": ...})`` for ``common.train.make_train_step``
    (the key is unused: LoRA dropout draws from the model's own rng stream)."""

    def fn(model: LMM, batch: Batch, key):
        del key
        logits = model(batch, mask_variant)
        return answer_loss(logits, batch), {"accuracy": accuracy(logits, batch)}

    return fn


def attention_probs(model: LMM, batch: Batch, mask_variant: str = "causal") -> jax.Array:
    """Softmax attention probabilities of every LM layer, float32[L, B, H, S, S] (rows are
    queries; masked entries are exactly 0). The model's ``sow_weights`` flags are restored."""
    attns = [blk.attn for blk in model.lm.blocks]
    for a in attns:
        a.sow_weights = True
    try:
        _, inter = nnx.capture(model, nnx.Intermediate)(batch, mask_variant)
    finally:
        for a in attns:
            a.sow_weights = False
    return jnp.stack(jax.tree.leaves(inter))  # one sown [B, H, S, S] array per layer


def answer_latent_attention(model: LMM, batch: Batch, mask_variant: str = "causal"):
    """Attention mass from the answer query to the latent keys (LIVR §4.4.1,
    docs/lir.md D10): the softmax weights over latent keys are summed, then averaged over heads and
    layers. Returns float32[B]."""
    probs = attention_probs(model, batch, mask_variant)
    idx = jnp.asarray(batch.answer_index)
    rows = jnp.take_along_axis(probs, idx[None, :, None, None, None], axis=3)[:, :, :, 0]
    is_lat = (jnp.asarray(batch.roles) == Role.LATENT)[None, :, None, :]
    return jnp.mean(jnp.sum(jnp.where(is_lat, rows, 0.0), axis=-1), axis=(0, 2))


def query_image_attention(
    probs: jax.Array, batch: Batch, n_images: int, tokens_per_image: int
) -> jax.Array:
    """Attention of every query to every image patch, averaged over layers and heads
    (latent->image maps, LIVR Fig. 3): probs [L, B, H, S, S] -> float32[B, S, M, N], where
    [b, q, j] reshaped to the patch grid is query q's map over image j."""
    p = jnp.mean(probs, axis=(0, 2))  # [B, S, S]
    slots = jnp.asarray(batch.image_slots)  # [B, S] -> feature index or -1
    onehot = jax.nn.one_hot(slots, n_images * tokens_per_image, dtype=p.dtype)  # -1 -> zeros
    maps = jnp.einsum("bqk,bkf->bqf", p, onehot)
    return maps.reshape(p.shape[0], p.shape[1], n_images, tokens_per_image)
