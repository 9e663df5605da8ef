"""Qwen2.5-VL vision tower in Flax NNX: patch embedding, 2-D rotary positions, window /
full attention by segment ids, SwiGLU blocks and the 2x2 patch merger (docs/lir.md D20).

The tower runs on one packed sequence of all images' patches, reordered so each attention
window is contiguous (:class:`lir.backbones.qwen2_5_vl.processor.VisionLayout`). Window blocks
attend where the window ids match, full-attention blocks where the image ids match.

No N x N mask or logit matrix is ever built (three 1288x728 images are N = 14,352 patches;
dense float32 logits + probabilities of one layer would be ~27 GB, where the Hugging Face
port uses varlen flash attention over ``cu_seqlens``). :func:`segment_attention` instead

* window layers: splits the sequence into blocks of the window's patch count W; a window is a
  contiguous run of at most W patches, so a query of block b only has keys in blocks
  b-1, b, b+1, and each block attends to that 3W-key band (memory O(N * 3W));
* full-attention layers: scans over query chunks, each against every key with the mask of
  that chunk only (memory O(chunk * N)).
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


def vision_rope_angles(
    rows: jax.Array, cols: jax.Array, head_dim: int, theta: float = 10000.0
) -> jax.Array:
    """2-D rotary angles float32[N, head_dim / 2]: freqs(row) ++ freqs(col), each over the
    head_dim / 4 inverse frequencies ``theta ** (-2i / (head_dim / 2))``."""
    dim = head_dim // 2
    inv = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return jnp.concatenate(
        [rows.astype(jnp.float32)[:, None] * inv, cols.astype(jnp.float32)[:, None] * inv], -1
    )


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


# Segment id of the rows :func:`segment_attention` adds to fill its last block; real rows
# (ids >= -1, -1 = the layout's padded patches) never match it.
_FILL = int(jnp.iinfo(jnp.int32).min)


def _pad_rows(x: jax.Array, before: int, after: int, value=0) -> jax.Array:
    return jnp.pad(x, [(before, after)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def segment_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segments: jax.Array,
    *,
    max_run: int | None,
    query_chunk: int = 512,
) -> jax.Array:
    """Non-causal attention where row i attends to row j iff ``segments[i] == segments[j]``.

    Equals ``dot_product_attention`` with the dense mask ``segments[:, None] ==
    segments[None, :]`` without building it (module docstring).

    Args:
      q, k, v: [N, H, Dh].
      segments: int32[N] segment ids.
      max_run: every run of equal ids that contains a row whose output matters is contiguous
        and at most ``max_run`` rows long (a window's patch count): banded attention over
        blocks of ``max_run`` rows. None: no bound (full attention per image): query chunks
        of ``query_chunk`` rows, each against all N keys.
      query_chunk: rows per query chunk when ``max_run`` is None.
    Returns:
      [N, H, Dh] in q's dtype. Rows of a run longer than ``max_run`` (the layout's trailing
      padding, id -1) see only part of it: finite, but not the dense result.
    """
    n, h, dh = q.shape
    segments = jnp.asarray(segments, jnp.int32)
    if max_run is not None:
        w = int(max_run)
        nb = -(-n // w)
        fill = nb * w - n
        # one extra block on each side so every block has a previous and a next block
        qb = _pad_rows(q, 0, fill).reshape(nb, w, h, dh)
        kp, vp = (_pad_rows(x, w, fill + w).reshape(nb + 2, w, h, dh) for x in (k, v))
        sp = _pad_rows(segments, w, fill + w, _FILL).reshape(nb + 2, w)
        band = lambda x: jnp.concatenate([x[:-2], x[1:-1], x[2:]], axis=1)  # [nb, 3w, ...]
        mask = (sp[1:-1, :, None] == band(sp)[:, None, :])[:, None]  # [nb, 1, w, 3w]
        out = dot_product_attention(qb, band(kp), band(vp), mask=mask)
        return out.reshape(nb * w, h, dh)[:n]
    c = min(int(query_chunk), n)
    nc = -(-n // c)
    fill = nc * c - n
    qc = _pad_rows(q, 0, fill).reshape(nc, c, h, dh)
    sc = _pad_rows(segments, 0, fill, _FILL).reshape(nc, c)

    def chunk(args):
        qi, si = args
        mask = (si[:, None] == segments[None, :])[None, None]  # [1, 1, c, N]
        return dot_product_attention(qi[None], k[None], v[None], mask=mask)[0]

    # lax.map runs the chunks one after another: one chunk's logits are live at a time
    return jax.lax.map(chunk, (qc, sc)).reshape(nc * c, h, dh)[:n]


class VisionAttention(nnx.Module):
    """Non-causal attention with a fused qkv projection (bias) and 2-D RoPE, within the
    segments given at call time. ``max_run``: the longest run of one segment id (a window's
    patch count for window blocks) or None (full-attention blocks: one image per segment)."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        max_run: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.max_run = max_run
        self.qkv = dense(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
        self.proj = dense(cfg.hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array, angles: jax.Array, segments: jax.Array) -> jax.Array:
        """x [N, D], angles float32[N, Dh / 2], segments int32[N] -> [N, D]."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = (
            rotate_half_rope(qkv[:, 0], angles),
            rotate_half_rope(qkv[:, 1], angles),
            qkv[:, 2],
        )
        y = segment_attention(q, k, v, segments, max_run=self.max_run)
        return self.proj(y.reshape(n, -1))


class VisionBlock(nnx.Module):
    """``x += attn(norm1(x)); x += mlp(norm2(x))`` with a SwiGLU MLP with biases.
    ``max_run``: see :class:`VisionAttention`."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        max_run: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, max_run=max_run, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, "swiglu", use_bias=True, **kw)

    def __call__(self, x, angles, segments):
        x = x + self.attn(self.norm1(x), angles, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm -> concat 2x2 groups -> Dense -> GELU (erf) -> Dense to the LM width."""

    def __init__(self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
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

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        remat: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.remat = remat
        self.patch_embed = dense(cfg.patch_dim, cfg.hidden_size, use_bias=False, **kw)
        # a window of window_size^2 pixels holds (window_size / patch_size)^2 patches
        window = (cfg.window_size // cfg.patch_size) ** 2
        self.blocks = nnx.List(
            [
                VisionBlock(cfg, max_run=None if i in cfg.fullatt_block_indexes else window, **kw)
                for i in range(cfg.depth)
            ]
        )
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
        angles = vision_rope_angles(
            jnp.asarray(layout["rope_rows"]),
            jnp.asarray(layout["rope_cols"]),
            cfg.head_dim,
            cfg.rope_theta,
        )
        windows = jnp.asarray(layout["window_segments"], jnp.int32)
        images = jnp.asarray(layout["image_segments"], jnp.int32)
        hidden = []
        for block in self.blocks:
            seg = images if block.attn.max_run is None else windows
            x = remat_call(block, x, angles, seg) if self.remat else block(x, angles, seg)
            hidden.append(x)
        merged = self.merger(x)[jnp.asarray(layout["merged_order"])]
        return (merged, hidden) if return_hidden else merged
