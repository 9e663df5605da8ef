"""Normalisation layers whose statistics are always computed in float32.

Both layers take any input dtype (float32, bfloat16, float16), compute mean/variance in
float32, apply the learned affine parameters in float32 and cast the result back to the
input dtype (or to `dtype` when given).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["RMSNorm", "LayerNorm"]


class RMSNorm(nnx.Module):
    """Root-mean-square norm: `y = x / sqrt(mean(x**2, -1) + eps) * scale`.

    Args:
      dim: size of the last axis of the input.
      eps: added to the mean square before the reciprocal square root.
      use_scale: learn a per-feature `scale` (initialised to ones).
      dtype: output dtype; default: the input's dtype.
      param_dtype: dtype of `scale` (float32).
      rngs: unused (no random init); accepted so every layer has the same signature.

    Input `x [..., dim]` -> `[..., dim]`.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        use_scale: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if use_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_last_dim(x, self.dim, "RMSNorm")
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(ms + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(out_dtype)


class LayerNorm(nnx.Module):
    """Layer norm: `y = (x - mean) / sqrt(var + eps) * scale + bias`.

    Args:
      dim: size of the last axis of the input.
      eps: added to the variance.
      use_scale / use_bias: learn `scale` (ones) / `bias` (zeros). Set both False for the
        affine-free LayerNorm used before adaLN modulation.
      dtype: output dtype; default: the input's dtype.
      param_dtype: dtype of the parameters (float32).
      rngs: unused; accepted for a uniform signature.

    Input `x [..., dim]` -> `[..., dim]`. Variance is the biased (population) variance,
    computed as `mean((x - mean)**2)` in float32.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_last_dim(x, self.dim, "LayerNorm")
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centered = xf - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)


def _check_last_dim(x: jax.Array, dim: int, name: str) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{name}: expected input [..., {dim}], got shape {tuple(x.shape)}")
