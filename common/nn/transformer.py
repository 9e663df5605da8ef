"""Pre-norm transformer block and stack with residual taps, interventions and KV caches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.attention import Attention, KVCache, causal_mask, init_cache
from common.nn.mlp import MLP
from common.nn.norms import LayerNorm, RMSNorm
from common.nn.positions import RelativePositionBias

__all__ = ["make_norm", "TransformerBlock", "TransformerStack", "StackOutput", "causal_mask"]


def make_norm(kind: str, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32, rngs=None):
    """ "rms" -> RMSNorm(dim, eps); "layer" -> LayerNorm(dim, eps) with scale and bias."""
    if kind == "rms":
        return RMSNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer":
        return LayerNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")


class TransformerBlock(nnx.Module):
    """Pre-norm residual block: `x += attn(norm1(x)); x += mlp(norm2(x))`.

    Submodules: `norm1`, `attn` (Attention), `norm2`, `mlp` (MLP).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        activation: str = "gelu",
        norm: str = "rms",
        norm_eps: float = 1e-6,
        position: str = "none",
        rope_theta: float = 10000.0,
        rope_sections: Sequence[int] | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        mlp_bias: bool = True,
        kernel_init=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm1 = make_norm(norm, dim, norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(
            dim,
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            position=position,
            rope_theta=rope_theta,
            rope_sections=rope_sections,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm2 = make_norm(norm, dim, norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(
            dim,
            mlp_hidden,
            activation,
            kernel_init=kernel_init,
            use_bias=mlp_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, D] -> (x [B, T, D], new cache or None). Arguments as `Attention`."""
        h, cache = self.attn(self.norm1(x), mask=mask, bias=bias, positions=positions, cache=cache)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, cache


class StackOutput(NamedTuple):
    """Result of `TransformerStack.__call__`.

    out: [B, T, D], the final-normed stream (or the raw stream when the call stops before
      the last block, or final_norm=False).
    residuals: [n+1, B, T, D] streams for the n blocks run, or None. residuals[0] is the
      input and residuals[i] the stream after block start_layer+i-1 (after any
      intervention there, before the final norm). Full stack: [L+1, B, T, D].
    caches: the list of L updated KVCaches, or None.
    """

    out: jax.Array
    residuals: jax.Array | None
    caches: list[KVCache] | None


class TransformerStack(nnx.Module):
    """L pre-norm `TransformerBlock`s with optional shared T5 relative bias and final norm.

    Layer indexing (the residual-stream convention of internal RL): stream l is the input
    for l = 0 and the output of block l (1-based) for l = 1..L. Block i (0-based, in
    `self.blocks[i]`) maps stream i to stream i+1.

    Args:
      num_layers, dim, num_heads, mlp_hidden: L, D, H, MLP width.
      relative_bias: own one `RelativePositionBias` (`self.rel_bias`) shared by all layers.
      num_buckets, max_distance: T5 bucket parameters.
      relative_bias_bidirectional: bidirectional buckets (encoders); default causal.
      final_norm: apply a final norm (`self.final_norm`) of the same kind as the blocks.
      remaining keyword args: as `TransformerBlock`.
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        relative_bias: bool = False,
        num_buckets: int = 32,
        max_distance: int = 128,
        relative_bias_bidirectional: bool = False,
        final_norm: bool = True,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        activation: str = "gelu",
        norm: str = "rms",
        norm_eps: float = 1e-6,
        position: str = "none",
        rope_theta: float = 10000.0,
        rope_sections: Sequence[int] | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        mlp_bias: bool = True,
        kernel_init=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_layers = num_layers
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    dim,
                    num_heads,
                    mlp_hidden,
                    num_kv_heads=num_kv_heads,
                    head_dim=head_dim,
                    activation=activation,
                    norm=norm,
                    norm_eps=norm_eps,
                    position=position,
                    rope_theta=rope_theta,
                    rope_sections=rope_sections,
                    qkv_bias=qkv_bias,
                    out_bias=out_bias,
                    mlp_bias=mlp_bias,
                    kernel_init=kernel_init,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.rel_bias = (
            RelativePositionBias(
                num_heads,
                num_buckets,
                max_distance,
                relative_bias_bidirectional,
                embedding_init=kernel_init,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if relative_bias
            else None
        )
        self.final_norm = (
            make_norm(norm, dim, norm_eps, param_dtype=param_dtype, rngs=rngs)
            if final_norm
            else None
        )

    def init_caches(
        self, batch: int, max_len: int, dtype=jnp.float32, *, per_sequence_length: bool = False
    ) -> list[KVCache]:
        """One empty `KVCache` [batch, max_len, Hkv, Dh] per layer."""
        return [
            init_cache(
                batch,
                max_len,
                self.num_kv_heads,
                self.head_dim,
                dtype,
                per_sequence_length=per_sequence_length,
            )
            for _ in range(self.num_layers)
        ]

    def position_bias(self, T: int, positions: jax.Array | None, cache: KVCache | None):
        """Shared T5 bias float32 [B|1, H, T, K] for this call (K = T, or S_max with cache).

        Query positions: `positions` ([T] or [B, T]) if given, else arange(T), offset by
        the cache length when a cache is given and positions is None. Keys: the same
        positions without a cache; cache slot indices 0..S_max-1 with one.
        """
        if positions is None:
            q_pos = jnp.arange(T, dtype=jnp.int32)
            if cache is not None:
                q_pos = jnp.asarray(cache.length)[..., None] + q_pos  # [T] or [B, T]
        else:
            q_pos = jnp.asarray(positions)
        k_pos = q_pos if cache is None else jnp.arange(cache.max_len, dtype=jnp.int32)
        return self.rel_bias(q_pos, k_pos)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        caches: Sequence[KVCache] | None = None,
        return_residuals: bool = False,
        intervention: Callable[[jax.Array], jax.Array] | None = None,
        intervention_layer: int | None = None,
        start_layer: int = 0,
        stop_layer: int | None = None,
    ) -> StackOutput:
        """Run blocks start_layer..stop_layer-1 on stream `x` [B, T, D].

        mask: bool [B|1, 1|H, T, K] (K = T, or S_max with caches; None with caches means
          `cache_mask(length + T, T, S_max)`); e.g. `causal_mask(T)` for a decoder.
        positions: RoPE positions ([B, T]; [A, B, T] multi-axis) and, when relative_bias,
          the query positions of the bias ([T] or [B, T]). Default arange(T) (+ cache length).
        caches: list of L KVCaches (all layers, also when only some blocks run).
        return_residuals: also return the stacked residual streams.
        intervention, intervention_layer: `intervention(stream) -> stream` is applied to
          stream `intervention_layer` (0 = the input, l = after block l), inside the
          caller's trace; later blocks see the modified stream. Must lie in
          [start_layer, stop_layer] (when splitting at l, give it to one half only).
        start_layer, stop_layer: run only part of the stack; `x` is then stream
          start_layer (e.g. internal RL's lower = (0, l) and upper = (l, L) halves).
          The final norm is applied only when stop_layer == L.
        """
        L = self.num_layers
        stop = L if stop_layer is None else stop_layer
        if not 0 <= start_layer <= stop <= L:
            raise ValueError(
                f"TransformerStack: need 0 <= start_layer <= stop_layer <= {L}, "
                f"got ({start_layer}, {stop})"
            )
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"TransformerStack: expected x [B, T, {self.dim}], got {tuple(x.shape)}"
            )
        if (intervention is None) != (intervention_layer is None):
            raise ValueError("TransformerStack: give both intervention and intervention_layer")
        if intervention_layer is not None and not start_layer <= intervention_layer <= stop:
            raise ValueError(
                f"TransformerStack: intervention_layer {intervention_layer} outside the "
                f"layers run [{start_layer}, {stop}]"
            )
        if caches is not None and len(caches) != L:
            raise ValueError(f"TransformerStack: need {L} caches, got {len(caches)}")

        T = x.shape[1]
        bias = None
        if self.rel_bias is not None and start_layer < stop:
            # the first block run has not seen this call's tokens yet: its cache length
            # is the offset of the queries (also when the lower half already ran)
            first_cache = None if caches is None else caches[start_layer]
            bias = self.position_bias(T, positions, first_cache)

        new_caches = None if caches is None else list(caches)
        if intervention_layer == start_layer:
            x = intervention(x)
        residuals = [x]
        for i in range(start_layer, stop):
            cache = None if caches is None else caches[i]
            x, cache = self.blocks[i](x, mask=mask, bias=bias, positions=positions, cache=cache)
            if new_caches is not None:
                new_caches[i] = cache
            if intervention_layer == i + 1:
                x = intervention(x)
            residuals.append(x)

        out = x
        if stop == L and self.final_norm is not None:
            out = self.final_norm(x)
        return StackOutput(
            out=out,
            residuals=jnp.stack(residuals) if return_residuals else None,
            caches=new_caches,
        )
