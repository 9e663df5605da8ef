"""Position encodings: RoPE (1-D and multi-axis / M-RoPE), T5 relative bias, sinusoids.

Pure functions take and return arrays; `RelativePositionBias` is the one module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "rope_frequencies",
    "apply_rope",
    "apply_multi_axis_rope",
    "relative_position_bucket",
    "RelativePositionBias",
    "sinusoidal_embedding",
]


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Inverse frequencies `theta ** (-2i / head_dim)`, i = 0..head_dim/2-1 -> float32 [head_dim/2]."""
    if head_dim % 2:
        raise ValueError(f"rope_frequencies: head_dim must be even, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return jnp.asarray(1.0 / (theta**exponent), dtype=jnp.float32)


def _rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [..., T, H, Dh]; angles [..., T, Dh/2] (broadcastable)."""
    cos = jnp.cos(angles)[..., None, :]  # [..., T, 1, Dh/2]
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): Llama/Qwen `x*cos + rotate_half(x)*sin`.
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding, rotate-half convention (Llama, Qwen, GPT-NeoX).

    Args:
      x: [..., T, H, Dh] queries or keys (Dh even).
      positions: [..., T] integer (or float) positions, broadcastable against x's leading
        dims (e.g. [B, T] or [T] for x [B, T, H, Dh]). Negative positions are fine.
      theta: RoPE base.
    Returns: [..., T, H, Dh], same dtype as x (rotation computed in float32).
    """
    inv_freq = rope_frequencies(x.shape[-1], theta)
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
    return _rotate(x, angles)


def apply_multi_axis_rope(
    x: jax.Array,
    positions: jax.Array,
    sections: Sequence[int],
    theta: float = 10000.0,
) -> jax.Array:
    """Multi-axis RoPE (Qwen2-VL M-RoPE; 3-axis t/h/w video RoPE).

    The Dh/2 frequency slots are split into consecutive sections; slots of section a are
    rotated by `positions[a]`. With all axes' positions equal this equals `apply_rope`.

    Args:
      x: [..., T, H, Dh].
      positions: [A, ..., T] integer positions, A = len(sections).
      sections: frequency slots per axis, summing to Dh/2 (Qwen2-VL 7B: (16, 24, 24)).
      theta: RoPE base.
    Returns: [..., T, H, Dh], same dtype as x.
    """
    sections = tuple(int(s) for s in sections)
    head_dim = x.shape[-1]
    if sum(sections) != head_dim // 2:
        raise ValueError(
            f"apply_multi_axis_rope: sections {sections} must sum to head_dim/2 = {head_dim // 2}"
        )
    positions = jnp.asarray(positions)
    if positions.shape[0] != len(sections):
        raise ValueError(
            f"apply_multi_axis_rope: positions must be [A={len(sections)}, ..., T], "
            f"got shape {tuple(positions.shape)}"
        )
    inv_freq = rope_frequencies(head_dim, theta)
    all_angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [A, ..., T, Dh/2]
    bounds = np.cumsum((0,) + sections)
    angles = jnp.concatenate(
        [all_angles[a, ..., bounds[a] : bounds[a + 1]] for a in range(len(sections))], axis=-1
    )
    return _rotate(x, angles)


# ------------------------------------------------------------------ T5 relative bias


def _bucket_of_distance(n: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket of a non-negative distance n (float64 math, applied to a small table)."""
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(n, 1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return np.where(n < max_exact, n, large)


def relative_position_bucket(
    relative_position: jax.Array,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5's (mesh_tensorflow) bucketing of `relative_position = key_pos - query_pos`.

    Non-bidirectional (causal): only keys at or before the query are distinguished,
    n = max(q - k, 0); n < num_buckets/2 gets its own bucket, larger n are binned
    logarithmically up to `max_distance`, beyond which everything is bucket num_buckets-1.
    Bidirectional: half of the buckets for each sign (keys after the query get +num_buckets/2).

    Implemented as a lookup table of the exact formula for distances 0..max_distance (the
    bucket is constant beyond max_distance), so it is identical on every backend.

    Args: relative_position int array [...]. Returns int32 [...] in [0, num_buckets).
    """
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    n = -rel
    ret = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    table = _bucket_of_distance(np.arange(max_distance + 1), num_buckets, max_distance)
    table = jnp.asarray(table, dtype=jnp.int32)
    return ret + table[jnp.minimum(n, max_distance)]


class RelativePositionBias(nnx.Module):
    """T5 bucketed relative position bias: a learned scalar per (bucket, head).

    `__call__(q_positions, k_positions) -> bias float32 [B|1, H, Q, K]` where
    q_positions is [Q] or [B, Q] and k_positions is [K] or [B, K] (integers). The
    relative position is `k - q`. Add the result to attention logits (shared by all layers,
    as in T5).

    Param: `embedding [num_buckets, num_heads]`, default init as t5x:
    `variance_scaling(1.0, "fan_avg", "uniform")`; pass `embedding_init` to change it.
    """

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = False,
        *,
        embedding_init=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        init = embedding_init or nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.embedding = nnx.Param(init(rngs.params(), (num_buckets, num_heads), param_dtype))

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        q = jnp.asarray(q_positions)
        k = jnp.asarray(k_positions)
        if q.ndim not in (1, 2) or k.ndim not in (1, 2):
            raise ValueError(
                "RelativePositionBias: q_positions must be [Q] or [B, Q] and k_positions [K] "
                f"or [B, K]; got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        q = q if q.ndim == 2 else q[None]
        k = k if k.ndim == 2 else k[None]
        rel = k[:, None, :] - q[:, :, None]  # [B|1, Q, K]
        buckets = relative_position_bucket(
            rel, self.bidirectional, self.num_buckets, self.max_distance
        )
        values = self.embedding[...].astype(jnp.float32)[buckets]  # [B|1, Q, K, H]
        return jnp.transpose(values, (0, 3, 1, 2))


# ----------------------------------------------------------------------- sinusoids


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """DiT/ADM timestep embedding `[cos(t f_i), sin(t f_i)]`, f_i = max_period**(-i/half).

    Args: t [...] float or int (e.g. diffusion time on a 0..1000 scale); dim output size
    (odd dims get a trailing zero). Returns float32 [..., dim].
    """
    half = dim // 2
    freqs = jnp.asarray(
        np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half), jnp.float32
    )
    args = jnp.asarray(t).astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb
