"""DiT-style adaLN-Zero blocks for diffusion / flow-matching transformers.

The conditioning tensor (e.g. a timestep embedding) may be per sequence [B, C] or per
token [B, T, C] (Spatia / Wan "separated timesteps": clean conditioning tokens have t = 0
while the generated ones carry the sampler's t). Modulation projections are
zero-initialised, so every block starts as the identity (adaLN-Zero, Peebles & Xie 2023).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.attention import Attention
from common.nn.linear import dense
from common.nn.mlp import MLP
from common.nn.norms import LayerNorm
from common.nn.positions import sinusoidal_embedding

__all__ = ["TimestepEmbedder", "AdaLNBlock", "AdaLNFinal", "modulate"]

_zeros = nnx.initializers.zeros_init()


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift`; shift/scale broadcast against x [B, T, D]."""
    return x * (1 + scale) + shift


def _modulation(mod: nnx.Linear, cond: jax.Array, x: jax.Array, n: int, name: str):
    """silu(cond) -> linear -> n chunks, each [B, 1|T, D] broadcastable against x [B, T, D]."""
    B, T, _ = x.shape
    if cond.ndim == 2 and cond.shape[0] == B:
        cond = cond[:, None, :]
    elif not (cond.ndim == 3 and cond.shape[0] == B and cond.shape[1] == T):
        raise ValueError(
            f"{name}: cond must be [B, C] or [B, T, C] with B={B}, T={T}; got {tuple(cond.shape)}"
        )
    m = mod(jax.nn.silu(cond))
    return jnp.split(m, n, axis=-1)


class TimestepEmbedder(nnx.Module):
    """t [...] (float, e.g. 0..1000) -> sinusoid [..., freq_dim] -> Linear-SiLU-Linear -> [..., dim].

    Submodules `linear1` (freq_dim -> dim), `linear2` (dim -> dim).
    """

    def __init__(
        self,
        dim: int,
        freq_dim: int = 256,
        *,
        max_period: float = 10000.0,
        kernel_init=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.freq_dim = freq_dim
        self.max_period = max_period
        kw = dict(kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear1 = dense(freq_dim, dim, **kw)
        self.linear2 = dense(dim, dim, **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        emb = sinusoidal_embedding(t, self.freq_dim, self.max_period)
        return self.linear2(jax.nn.silu(self.linear1(emb)))


class AdaLNBlock(nnx.Module):
    """adaLN-Zero transformer block.

    ```
    shift1, scale1, gate1, shift2, scale2, gate2 = modulation(silu(cond))   # each [B, 1|T, D]
    x = x + gate1 * attn(modulate(norm1(x), shift1, scale1))
    x = x + gate2 * mlp(modulate(norm2(x), shift2, scale2))
    ```
    norm1/norm2 are LayerNorms without affine parameters; `modulation` (cond_dim -> 6 D)
    is zero-initialised, so the block is the identity at init.
    Submodules: `norm1`, `attn`, `norm2`, `mlp`, `modulation`.

    With `context_dim` set (text conditioning, as Wan / PixArt), a cross-attention
    sub-block runs between the two: `x = x + cross_attn(norm3(x), context)` with an
    affine LayerNorm `norm3`, no modulation and no gate; its output projection is
    zero-initialised (PixArt), so the block is still the identity at init.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        cond_dim: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        activation: str = "gelu_tanh",
        norm_eps: float = 1e-6,
        position: str = "none",
        rope_theta: float = 10000.0,
        rope_sections: Sequence[int] | None = None,
        qkv_bias: bool = True,
        context_dim: int | None = None,
        kernel_init=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = dim
        self.norm1 = LayerNorm(dim, norm_eps, use_scale=False, use_bias=False)
        self.attn = Attention(
            dim,
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias=qkv_bias,
            out_bias=True,
            position=position,
            rope_theta=rope_theta,
            rope_sections=rope_sections,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm2 = LayerNorm(dim, norm_eps, use_scale=False, use_bias=False)
        self.mlp = MLP(
            dim,
            mlp_hidden,
            activation,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.modulation = dense(
            cond_dim,
            6 * dim,
            kernel_init=_zeros,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        has_ctx = context_dim is not None
        self.norm3 = LayerNorm(dim, norm_eps) if has_ctx else None
        self.cross_attn = (
            Attention(
                dim,
                num_heads,
                num_kv_heads,
                head_dim,
                qkv_bias=qkv_bias,
                out_bias=True,
                kv_dim=context_dim,
                kernel_init=kernel_init,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if has_ctx
            else None
        )
        if has_ctx:  # zero output projection: the block starts as the identity
            o = self.cross_attn.o_proj
            o.kernel[...] = jnp.zeros_like(o.kernel[...])

    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array,
        *,
        mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, D], cond [B, cond_dim] or [B, T, cond_dim] -> [B, T, D].

        mask / positions: self-attention mask bool [B|1, 1|H, T, T] and RoPE positions
          ([B, T], or [A, B, T] with rope_sections), as `Attention`.
        context [B, S, context_dim], context_mask bool [B|1, 1|H, T, S]: cross-attention
          inputs (required iff the block was built with context_dim).
        """
        if (context is None) != (self.cross_attn is None):
            raise ValueError(
                "AdaLNBlock: pass context iff the block was built with context_dim "
                f"(context_dim set: {self.cross_attn is not None})"
            )
        shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(
            self.modulation, cond, x, 6, "AdaLNBlock"
        )
        h, _ = self.attn(modulate(self.norm1(x), shift1, scale1), mask=mask, positions=positions)
        x = x + gate1 * h
        if self.cross_attn is not None:
            h, _ = self.cross_attn(self.norm3(x), mask=context_mask, context=context)
            x = x + h
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class AdaLNFinal(nnx.Module):
    """DiT output layer: `linear(modulate(norm(x), shift, scale))` -> [B, T, out_dim].

    `modulation` (cond_dim -> 2 D) and `linear` (D -> out_dim) are zero-initialised, so the
    model predicts 0 at init (DiT). cond: [B, cond_dim] or [B, T, cond_dim].
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        cond_dim: int,
        *,
        norm_eps: float = 1e-6,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm = LayerNorm(dim, norm_eps, use_scale=False, use_bias=False)
        kw = dict(kernel_init=_zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modulation = dense(cond_dim, 2 * dim, **kw)
        self.linear = dense(dim, out_dim, **kw)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        shift, scale = _modulation(self.modulation, cond, x, 2, "AdaLNFinal")
        return self.linear(modulate(self.norm(x), shift, scale))
