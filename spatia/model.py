"""Spatia's memory-conditioned video generator: a flow-matching video DiT in Flax NNX.

One token sequence per sample (Spatia §3.1.3, docs/spatia.md D7):

    [ refs: K single frames | prev: M history frames | target: N frames ]
      clean, t = 0            clean, t = 0 (or t_aug)  noisy, t = sampler's t

* Frames are `encode`d (pixel [0, 1] -> [-1, 1]; the seam where a latent autoencoder goes) and
  cut into (pt, ph, pw) patches; a reference frame is tiled pt times so it fills one latent frame.
* Per-token timesteps: every token has its own noise level, embedded (`TimestepEmbedder`) and
  summed with the instruction embedding into the adaLN condition of every block.
* 3-axis RoPE (t, h, w): prev/target at t = 0 .. M'+N'-1; references at t = -K .. -1 with the
  height index shifted by the grid height (rows gh .. 2gh-1), as in the official code.
* Control branch (VACE): [projection video ‖ hole mask] of prev+target is patch-embedded,
  `before_proj` (zero) + main-stream embeddings, run through one AdaLN block per entry of
  `config.control_layers`; `after_proj` (zero) emits hint j, added to the prev+target tokens
  after main block control_layers[j]. Zero projections: at init the output equals the base.
* Instruction ids (stand-in for text) with a learned null embedding (id = num_instructions)
  for condition dropout and classifier-free guidance.

Batch dict (all arrays; optional keys may be omitted, which is a static choice):
  "frames":      float32 [B, N, H, W, C]  target frames in [0, 1] (required for training)
  "prev":        float32 [B, M, H, W, C]  previous-clip frames (optional; M % pt == 0)
  "prev_valid":  bool    [B, M]           False = padding history frame (optional)
  "refs":        float32 [B, K, H, W, C]  retrieved reference frames (optional)
  "ref_valid":   bool    [B, K]           False = padding reference (optional)
  "proj":        float32 [B, M+N, H, W, C] rendered memory projection of prev+target (optional)
  "hole":        float32 [B, M+N, H, W, Ch] hole mask, 1 = no memory (required with "proj")
  "instruction": int32   [B]              instruction ids in [0, num_instructions) (optional;
                                           absent = the null instruction)
`spatia.flow.sample`'s `cond` is the same dict without "frames". The flow-matching loss
(`spatia.flow.loss_fn`) and the samplers live in `spatia.flow`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.nn import (
    AdaLNBlock,
    AdaLNFinal,
    LoRALinear,
    TimestepEmbedder,
    apply_lora,
    dense,
    merge_lora,
    padding_mask,
)
from spatia.model_config import VideoModelConfig

__all__ = [
    "BASE_PARAMS",
    "CONTROL_PARAMS",
    "LORA_PARAMS",
    "STAGE_FILTERS",
    "ControlBranch",
    "SequenceLayout",
    "VideoDiT",
    "add_main_lora",
    "decode",
    "encode",
    "init_control_from_main",
    "merge_main_lora",
    "patchify_video",
    "tokenize",
    "unpatchify_video",
]

_zeros = nnx.initializers.zeros_init()

# Trainable-parameter filters for the staged training of Spatia §4 / docs/spatia.md D14 (pass as
# `trainable` to `common.train.create_train_state`):
#   "base":    everything but the control branch and LoRA (stage 0: the no-memory model; also a
#              full fine-tune of the main branch in stage 2).
#   "control": the control branch only, base frozen (stage 1).
#   "lora":    the LoRA matrices of the main blocks only (stage 2 after `add_main_lora`).
#   "main_full": the same set as "base", named for a stage-2 full fine-tune (control frozen).
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.Not(nnx.PathContains("control")))
CONTROL_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.PathContains("control"))
LORA_PARAMS = nnx.All(nnx.LoRAParam, nnx.Not(nnx.PathContains("control")))
STAGE_FILTERS = {
    "base": BASE_PARAMS,
    "control": CONTROL_PARAMS,
    "lora": LORA_PARAMS,
    "main_full": BASE_PARAMS,
}


# ------------------------------------------------------------------------ pixels <-> tokens


def encode(frames: jax.Array) -> jax.Array:
    """Pixel frames [..., H, W, C] in [0, 1] -> model space [..., H, W, C] in [-1, 1].

    The seam for a latent autoencoder: replace this pair to run the DiT on latents.
    """
    return frames * 2.0 - 1.0


def decode(latents: jax.Array) -> jax.Array:
    """Inverse of `encode`: [..., H, W, C] in [-1, 1] -> [0, 1] (not clipped)."""
    return (latents + 1.0) * 0.5


def patchify_video(x: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """[B, F, H, W, C] -> [B, F/pt * H/ph * W/pw, pt*ph*pw*C], tokens in (t, h, w) order.

    Each patch is flattened as (dt, dh, dw, c). F, H, W must be multiples of the patch.
    """
    pt, ph, pw = patch
    B, F, H, W, C = x.shape
    if F % pt or H % ph or W % pw:
        raise ValueError(
            f"patchify_video: video [B, F, H, W, C] = {tuple(x.shape)} is not a multiple of "
            f"the patch (pt, ph, pw) = {patch} in F, H, W"
        )
    x = x.reshape(B, F // pt, pt, H // ph, ph, W // pw, pw, C)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(B, (F // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def unpatchify_video(
    tokens: jax.Array, patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int
) -> jax.Array:
    """Inverse of `patchify_video`: [B, F'*gh*gw, pt*ph*pw*C] -> [B, F'pt, gh ph, gw pw, C]."""
    pt, ph, pw = patch
    f, gh, gw = grid
    B = tokens.shape[0]
    x = tokens.reshape(B, f, gh, gw, pt, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, f * pt, gh * ph, gw * pw, channels)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Static layout of one token sequence: K ref, M' prev and N' target latent frames of gh x gw.

    Token order is [refs | prev | target], each frame's tokens row-major over (h, w).
    """

    num_refs: int
    num_prev: int
    num_target: int
    grid: tuple[int, int]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def ref_tokens(self) -> int:
        return self.num_refs * self.tokens_per_frame

    @property
    def cond_tokens(self) -> int:
        """Number of clean conditioning tokens (refs + prev) at the start of the sequence."""
        return (self.num_refs + self.num_prev) * self.tokens_per_frame

    @property
    def num_tokens(self) -> int:
        return (self.num_refs + self.num_prev + self.num_target) * self.tokens_per_frame

    def target_mask(self) -> np.ndarray:
        """bool [L]: True on target tokens."""
        return np.arange(self.num_tokens) >= self.cond_tokens

    def prev_mask(self) -> np.ndarray:
        """bool [L]: True on history tokens."""
        i = np.arange(self.num_tokens)
        return (i >= self.ref_tokens) & (i < self.cond_tokens)

    def positions(self) -> np.ndarray:
        """int32 [3, L]: (t, h, w) RoPE indices; refs at t = -K..-1 and rows gh..2gh-1."""
        gh, gw = self.grid
        hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        hh, ww = hh.reshape(-1), ww.reshape(-1)

        def frames(t_indices, h_offset):
            n = len(t_indices)
            t = np.repeat(np.asarray(t_indices), gh * gw)
            return np.stack([t, np.tile(hh + h_offset, n), np.tile(ww, n)])

        K, F = self.num_refs, self.num_prev + self.num_target
        refs = frames(np.arange(-K, 0), gh)
        video = frames(np.arange(F), 0)
        return np.concatenate([refs, video], axis=1).astype(np.int32)


# -------------------------------------------------------------------------------- modules


def _call_block(blk: AdaLNBlock, h, cond, mask, positions):
    return blk(h, cond, mask=mask, positions=positions)


# The same block call with its activations recomputed in the backward pass (config.remat).
_call_block_remat = nnx.remat(_call_block)


def _adaln_block(cfg: VideoModelConfig, rngs: nnx.Rngs) -> AdaLNBlock:
    block = AdaLNBlock(
        cfg.dim,
        cfg.num_heads,
        cfg.mlp_hidden,
        cfg.dim,
        norm_eps=cfg.norm_eps,
        position="rope",
        rope_theta=cfg.rope_theta,
        rope_sections=cfg.rope_sections,
        rngs=rngs,
    )
    block.attn.query_chunk = cfg.attention_chunk
    return block


class ControlBranch(nnx.Module):
    """VACE-style side branch over [projection ‖ hole mask] patches of the prev+target frames.

    Submodules: `embed` (patch -> D), `before_proj` (D -> D, zero), `blocks` (one AdaLNBlock per
    hint), `after_proj` (one zero D -> D per hint).
    """

    def __init__(self, cfg: VideoModelConfig, *, rngs: nnx.Rngs):
        pt, ph, pw = cfg.patch_size
        n = len(cfg.control_layers)
        self.in_dim = pt * ph * pw * (cfg.channels + cfg.hole_channels)
        self.embed = dense(self.in_dim, cfg.dim, rngs=rngs)
        self.before_proj = dense(cfg.dim, cfg.dim, kernel_init=_zeros, rngs=rngs)
        self.blocks = nnx.List([_adaln_block(cfg, rngs) for _ in range(n)])
        self.after_proj = nnx.List(
            [dense(cfg.dim, cfg.dim, kernel_init=_zeros, rngs=rngs) for _ in range(n)]
        )
        self.remat = cfg.remat

    def __call__(self, control, x_main, cond, positions, mask) -> list[jax.Array]:
        """control [B, Lc, in_dim], x_main / cond [B, Lc, D] (main-stream patch embeddings and
        adaLN condition of the same tokens), positions [3, B, Lc], mask [B, 1, 1, Lc] | None
        -> one hint [B, Lc, D] per control block."""
        # The chain depends only on the initial embeddings, so all hints are computed up front
        # (as the official code does) and added to the main stream later.
        c = self.before_proj(self.embed(control)) + x_main
        hints = []
        call = _call_block_remat if self.remat else _call_block
        for blk, proj in zip(self.blocks, self.after_proj, strict=True):
            c = call(blk, c, cond, mask, positions)
            hints.append(proj(c))
        return hints


class VideoDiT(nnx.Module):
    """Flow-matching video transformer (see the module docstring).

    `__call__(x, t, layout, *, control=None, instruction=None, key_valid=None) -> v [B, L, P]`.
    Submodules: `embed`, `time_embed`, `instruction_embed`, `blocks`, `final`, `control` (None
    when `config.control_layers` is empty).
    """

    def __init__(self, config: VideoModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pt, ph, pw = config.patch_size
        self.patch_dim = pt * ph * pw * config.channels
        self.null_instruction = config.num_instructions
        self.embed = dense(self.patch_dim, config.dim, rngs=rngs)
        self.time_embed = TimestepEmbedder(config.dim, config.freq_dim, rngs=rngs)
        self.instruction_embed = nnx.Embed(
            config.num_instructions + 1,
            config.dim,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.blocks = nnx.List([_adaln_block(config, rngs) for _ in range(config.depth)])
        self.final = AdaLNFinal(
            config.dim, self.patch_dim, config.dim, norm_eps=config.norm_eps, rngs=rngs
        )
        self.control = ControlBranch(config, rngs=rngs) if config.control_layers else None

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        layout: SequenceLayout,
        *,
        control: jax.Array | None = None,
        instruction: jax.Array | None = None,
        key_valid: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted velocity for every token.

        Args:
          x: float [B, L, P] token sequence (P = pt*ph*pw*C, L = layout.num_tokens).
          t: float [B, L] per-token noise level in [0, 1] (0 = clean).
          layout: the static `SequenceLayout` of x.
          control: float [B, L - layout.ref_tokens, Pc] [projection ‖ hole] patches of the
            prev+target tokens, or None to skip the control branch.
          instruction: int [B] ids (`null_instruction` = unconditional) or None (all null).
          key_valid: bool [B, L], False = padding token nobody attends to; None = all valid.
        Returns: float32 [B, L, P].
        """
        B, L, P = x.shape
        if L != layout.num_tokens or P != self.patch_dim:
            raise ValueError(
                f"VideoDiT: x must be [B, L={layout.num_tokens}, P={self.patch_dim}] for {layout}; "
                f"got {tuple(x.shape)}"
            )
        if t.shape != (B, L):
            raise ValueError(f"VideoDiT: t must be [B, L] = {(B, L)}, got {tuple(t.shape)}")
        s = layout.ref_tokens
        if control is not None:
            if self.control is None:
                raise ValueError("VideoDiT: got a control input but config.control_layers is empty")
            want = (B, L - s, self.control.in_dim)
            if tuple(control.shape) != want:
                raise ValueError(f"VideoDiT: control must be {want}, got {tuple(control.shape)}")

        h = self.embed(x)
        if instruction is None:
            instruction = jnp.full((B,), self.null_instruction, jnp.int32)
        # Wan embeds timesteps on the 0..1000 scale.
        cond = self.time_embed(t * 1000.0) + self.instruction_embed(instruction)[:, None, :]
        pos = jnp.broadcast_to(jnp.asarray(layout.positions())[:, None, :], (3, B, L))
        mask = None if key_valid is None else padding_mask(key_valid)

        hints = {}
        if control is not None:
            cmask = None if mask is None else mask[..., s:]
            outs = self.control(control, h[:, s:], cond[:, s:], pos[:, :, s:], cmask)
            hints = dict(zip(self.config.control_layers, outs, strict=True))
        call = _call_block_remat if self.config.remat else _call_block
        for i, blk in enumerate(self.blocks):
            h = call(blk, h, cond, mask, pos)
            if i in hints:
                h = h.at[:, s:].add(hints[i])
        return self.final(h, cond)


# --------------------------------------------------------------------------- batch -> tokens


def _check_video(name: str, a: jax.Array, B: int, hw: tuple[int, int], C: int) -> None:
    if a.ndim != 5 or a.shape[0] != B or tuple(a.shape[2:4]) != hw or a.shape[4] != C:
        raise ValueError(
            f"batch[{name!r}] must be [B={B}, frames, H={hw[0]}, W={hw[1]}, C={C}], "
            f"got {tuple(a.shape)}"
        )


def tokenize(config: VideoModelConfig, batch: dict) -> dict[str, Any]:
    """Clean token sequence and conditioning of a batch (see the module docstring for keys).

    "frames" may be omitted if `num_target` frames are given as batch["num_target"] (int, used by
    the sampler, whose targets are noise).
    Returns {"tokens": [B, L, P] (target part from "frames", zeros if absent), "layout",
    "key_valid": bool [B, L] | None, "control": [B, L - ref_tokens, Pc] | None,
    "instruction": int32 [B] | None, "shape": (B, N, H, W, C) of the target video}.
    """
    pt, ph, pw = config.patch_size
    C = config.channels
    known = {
        "frames",
        "prev",
        "prev_valid",
        "refs",
        "ref_valid",
        "proj",
        "hole",
        "instruction",
        "num_target",
    }
    unknown = set(batch) - known
    if unknown:
        raise ValueError(
            f"tokenize: unknown batch keys {sorted(unknown)}; valid keys: {sorted(known)}"
        )
    videos = [batch[k] for k in ("frames", "prev", "refs", "proj") if k in batch]
    if not videos:
        raise ValueError(
            "tokenize: the batch needs at least one of 'frames', 'prev', 'refs', 'proj'"
        )
    B, _, H, W, _ = videos[0].shape
    if H % ph or W % pw:
        raise ValueError(f"tokenize: frame size {(H, W)} is not a multiple of the patch {(ph, pw)}")
    if "frames" in batch:
        N = batch["frames"].shape[1]
        _check_video("frames", batch["frames"], B, (H, W), C)
    elif "num_target" in batch:
        N = int(batch["num_target"])
    else:
        raise ValueError("tokenize: give 'frames' [B, N, H, W, C] or 'num_target'")
    if N < 1 or N % pt:
        raise ValueError(
            f"tokenize: number of target frames {N} must be a positive multiple of pt={pt}"
        )

    parts = []
    K = 0
    if "refs" in batch:
        refs = batch["refs"]
        _check_video("refs", refs, B, (H, W), C)
        K = refs.shape[1]
        # Each reference is its own single-frame video, tiled to fill one latent frame.
        r = jnp.repeat(encode(refs)[:, :, None], pt, axis=2).reshape(B * K, pt, H, W, C)
        parts.append(patchify_video(r, config.patch_size).reshape(B, -1, pt * ph * pw * C))
    M = 0
    if "prev" in batch:
        _check_video("prev", batch["prev"], B, (H, W), C)
        M = batch["prev"].shape[1]
        if M % pt:
            raise ValueError(f"tokenize: batch['prev'] has {M} frames, not a multiple of pt={pt}")
        parts.append(patchify_video(encode(batch["prev"]), config.patch_size))
    S = (H // ph) * (W // pw)
    if "frames" in batch:
        parts.append(patchify_video(encode(batch["frames"]), config.patch_size))
    else:
        parts.append(jnp.zeros((B, (N // pt) * S, pt * ph * pw * C), jnp.float32))
    layout = SequenceLayout(K, M // pt, N // pt, (H // ph, W // pw))
    tokens = jnp.concatenate(parts, axis=1).astype(jnp.float32)

    key_valid = None
    if "ref_valid" in batch or "prev_valid" in batch:
        rv = jnp.asarray(batch.get("ref_valid", jnp.ones((B, K), bool)), bool)
        pv = jnp.asarray(batch.get("prev_valid", jnp.ones((B, M), bool)), bool)
        if rv.shape != (B, K) or pv.shape != (B, M):
            raise ValueError(
                f"tokenize: ref_valid must be [B, K] = {(B, K)} and prev_valid [B, M] = {(B, M)}; "
                f"got {tuple(rv.shape)}, {tuple(pv.shape)}"
            )
        # A latent history frame is valid iff all of its pt frames are.
        pv = pv.reshape(B, M // pt, pt).all(-1)
        key_valid = jnp.concatenate(
            [
                jnp.repeat(rv, S, axis=1),
                jnp.repeat(pv, S, axis=1),
                jnp.ones((B, layout.num_target * S), bool),
            ],
            axis=1,
        )

    control = None
    if "proj" in batch:
        if "hole" not in batch:
            raise ValueError("tokenize: batch['proj'] needs batch['hole'] (the hole mask)")
        _check_video("proj", batch["proj"], B, (H, W), C)
        _check_video("hole", batch["hole"], B, (H, W), config.hole_channels)
        if batch["proj"].shape[1] != M + N or batch["hole"].shape[1] != M + N:
            raise ValueError(
                f"tokenize: proj/hole must cover prev+target = {M + N} frames, got "
                f"{batch['proj'].shape[1]} / {batch['hole'].shape[1]}"
            )
        # The hole mask stays in [0, 1] (the official code feeds it un-normalised).
        c = jnp.concatenate([encode(batch["proj"]), batch["hole"].astype(jnp.float32)], axis=-1)
        control = patchify_video(c, config.patch_size)
    elif "hole" in batch:
        raise ValueError("tokenize: batch['hole'] given without batch['proj']")

    instruction = None
    if "instruction" in batch:
        instruction = jnp.asarray(batch["instruction"], jnp.int32)
        if instruction.shape != (B,):
            raise ValueError(
                f"tokenize: instruction must be int [B={B}], got {tuple(instruction.shape)}"
            )
    return dict(
        tokens=tokens,
        layout=layout,
        key_valid=key_valid,
        control=control,
        instruction=instruction,
        shape=(B, N, H, W, C),
    )


# ------------------------------------------------------------------ stages: LoRA and init


def _main_lora_layers(model: VideoDiT) -> list:
    return [
        m for blk in model.blocks for _, m in nnx.iter_modules(blk) if isinstance(m, LoRALinear)
    ]


def add_main_lora(
    model: VideoDiT, *, rngs: nnx.Rngs, rank: int | None = None, alpha: float | None = None
) -> list:
    """Wraps the main blocks' `config.lora_targets` in LoRA (in place; the control branch is
    untouched). Train with `LORA_PARAMS`. Returns the replaced paths (block index first)."""
    cfg = model.config
    if _main_lora_layers(model):
        raise ValueError("add_main_lora: the main blocks already have LoRA")
    rank = cfg.lora_rank if rank is None else rank
    alpha = cfg.lora_alpha if alpha is None else alpha
    paths = []
    for i, blk in enumerate(model.blocks):
        paths += [(i, *p) for p in apply_lora(blk, cfg.lora_targets, rank, alpha, rngs=rngs)]
    return paths


def merge_main_lora(model: VideoDiT) -> list:
    """Merges the main blocks' LoRA into their weights (in place); returns the merged paths."""
    paths = []
    for i, blk in enumerate(model.blocks):
        paths += [(i, *p) for p in merge_lora(blk)]
    return paths


def init_control_from_main(model: VideoDiT) -> None:
    """Copies main block `control_layers[j]` into control block j (VACE init, docs/spatia.md D10).

    The zero before/after projections are untouched, so the output is still the base model's.
    Call before `add_main_lora`.
    """
    if model.control is None:
        raise ValueError("init_control_from_main: the model has no control branch")
    if _main_lora_layers(model):
        raise ValueError(
            "init_control_from_main: call it before add_main_lora (main blocks have LoRA)"
        )
    for j, layer in enumerate(model.config.control_layers):
        src = nnx.state(model.blocks[layer], nnx.Param)
        nnx.update(model.control.blocks[j], jax.tree.map(jnp.copy, src))
