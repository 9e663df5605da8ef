"""Qwen2.5-VL vision tower in Flax NNX: patch embedding, 2-D rotary positions, window /
full attention as segment-id masks, SwiGLU blocks and the 2x2 patch merger (docs/lir.md
D20).

The tower runs on one packed sequence of all images' patches, reordered so each attention
window is contiguous (:class:`lir.backbones.qwen2_5_vl.processor.VisionLayout`). Window blocks
attend where the window ids match, full-attention blocks where the image ids match, both
through ``common.nn.dot_product_attention`` with a boolean mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import MLP, RMSNorm, dense, dot_product_attention
from lir.backbones.qwen2_5_vl.config import VisionConfig


def rotate_half_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` with cos/sin = concat(angles, angles).

    x [..., T, H, Dh]; angles float32[..., T, Dh / 2]. Computed in float32, returned in
    x's dtype."""
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def vision_rope_angles(rows: jax.Array, cols: jax.Array, head_dim: int,
                       theta: float = 10000.0) -> jax.Array:
    """2-D rotary angles float32[N, head_dim / 2]: freqs(row) ++ freqs(col), each over the
    head_dim / 4 inverse frequencies ``theta ** (-2i / (head_dim / 2))``."""
    dim = head_dim // 2
    inv = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return jnp.concatenate([rows.astype(jnp.float32)[:, None] * inv,
                            cols.astype(jnp.float32)[:, None] * inv], -1)


def remat_call(module: nnx.Module, *args):
    """``module(*args)[0 if tuple]`` under ``jax.checkpoint``: its activations are recomputed
    in the backward pass. Variable updates made by the call (e.g. dropout RNG counters) are
    written back to ``module``; parameters are read-only here."""
    graphdef, state = nnx.split(module)

    def pure(state, *args):
        m = nnx.merge(graphdef, state)
        out = m(*args)
        return (out[0] if isinstance(out, tuple) else out), nnx.state(m, nnx.RngState)

    out, new_state = jax.checkpoint(pure)(state, *args)
    if jax.tree.leaves(new_state):
        nnx.update(module, new_state)
    return out


def segment_mask(segments: jax.Array) -> jax.Array:
    """int[N] segment ids -> bool[1, 1, N, N]: attend iff the ids are equal."""
    return (segments[:, None] == segments[None, :])[None, None]


class VisionAttention(nnx.Module):
    """Non-causal attention with a fused qkv projection (bias) and 2-D RoPE."""

    def __init__(self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = dense(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
        self.proj = dense(cfg.hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array) -> jax.Array:
        """x [N, D], angles float32[N, Dh / 2], mask bool[1, 1, N, N] -> [N, D]."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = (rotate_half_rope(qkv[:, 0], angles), rotate_half_rope(qkv[:, 1], angles),
                   qkv[:, 2])
        y = dot_product_attention(q[None], k[None], v[None], mask=mask)
        return self.proj(y.reshape(n, -1))


class VisionBlock(nnx.Module):
    """``x += attn(norm1(x)); x += mlp(norm2(x))`` with a SwiGLU MLP with biases."""

    def __init__(self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, "swiglu", use_bias=True, **kw)

    def __call__(self, x, angles, mask):
        x = x + self.attn(self.norm1(x), angles, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm -> concat 2x2 groups -> Dense -> GELU (erf) -> Dense to the LM width."""

    def __init__(self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        wide = cfg.hidden_size * cfg.merge_unit
        self.unit = cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.fc1 = dense(wide, wide, **kw)
        self.fc2 = dense(wide, cfg.out_hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, D] -> [N / 4, out_hidden_size]."""
        h = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))


class VisionTower(nnx.Module):
    """Patches of all images -> merged visual tokens for the LM (``<|image_pad|>`` rows).

    Submodules: ``patch_embed`` (Dense 1176 -> D, no bias: the Conv3d with kernel = stride),
    ``blocks`` (depth x :class:`VisionBlock`), ``merger`` (:class:`PatchMerger`)."""

    def __init__(self, cfg: VisionConfig, *, remat: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.remat = remat
        self.patch_embed = dense(cfg.patch_dim, cfg.hidden_size, use_bias=False, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, patches: jax.Array, layout: dict, *, return_hidden: bool = False):
        """Run the tower.

        Args:
          patches: float[N, patch_dim] in processor (merge-grouped image) order.
          layout: the arrays of :class:`VisionLayout` (``patch_order``, ``window_segments``,
            ``image_segments``, ``rope_rows``, ``rope_cols``, ``merged_order``), int32.
          return_hidden: also return the block outputs (window order), for parity tests.
        Returns:
          float[N / 4, out_hidden_size] in image order (and the list of [N, D] hiddens).
        """
        cfg = self.cfg
        if patches.ndim != 2 or patches.shape[1] != cfg.patch_dim:
            raise ValueError(f"patches must be [N, {cfg.patch_dim}]; got {tuple(patches.shape)}")
        order = jnp.asarray(layout["patch_order"])
        x = self.patch_embed(patches)[order]
        angles = vision_rope_angles(jnp.asarray(layout["rope_rows"]),
                                    jnp.asarray(layout["rope_cols"]), cfg.head_dim,
                                    cfg.rope_theta)
        window_mask = segment_mask(jnp.asarray(layout["window_segments"]))
        image_mask = segment_mask(jnp.asarray(layout["image_segments"]))
        hidden = []
        for i, block in enumerate(self.blocks):
            mask = image_mask if i in cfg.fullatt_block_indexes else window_mask
            x = remat_call(block, x, angles, mask) if self.remat else block(x, angles, mask)
            hidden.append(x)
        merged = self.merger(x)[jnp.asarray(layout["merged_order"])]
        return (merged, hidden) if return_hidden else merged
