"""Vision Transformer pieces: patch embedding and a bidirectional ViT encoder (no CLS token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.linear import dense
from common.nn.transformer import TransformerStack

__all__ = ["PatchEmbed", "ViTEncoder", "patchify"]


def _pair(x) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


def patchify(images: jax.Array, patch_size) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order, each patch
    flattened as (row, col, channel). H and W must be multiples of the patch size."""
    ph, pw = _pair(patch_size)
    B, H, W, C = images.shape
    x = images.reshape(B, H // ph, ph, W // pw, pw, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw * C)


class PatchEmbed(nnx.Module):
    """Images [B, H, W, C] float -> tokens [B, N, D], N = (H/p)(W/p).

    Non-overlapping patches, flattened and projected by one linear layer (`proj`; the same
    as a stride-p convolution), plus a learned position embedding `pos_embed [1, N, D]`
    (init N(0, 0.02)). image_size / patch_size: int or (height, width).
    Raises ValueError naming the shape when the images are not [B, H, W, C] with
    (H, W) == image_size and C == in_channels, or image_size is not a multiple of patch_size.
    """

    def __init__(
        self,
        image_size,
        patch_size,
        in_channels: int,
        dim: int,
        *,
        kernel_init=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        (H, W), (ph, pw) = self.image_size, self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"PatchEmbed: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        self.in_channels = in_channels
        self.grid = (H // ph, W // pw)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = dense(
            ph * pw * in_channels,
            dim,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, self.num_patches, dim), param_dtype)
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        expected = (*self.image_size, self.in_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            H, W = self.image_size
            raise ValueError(
                f"PatchEmbed: expected images [B, {H}, {W}, {self.in_channels}] "
                f"(image_size {self.image_size}, patch_size {self.patch_size}, channels last), "
                f"got shape {tuple(images.shape)}"
            )
        tokens = self.proj(patchify(images, self.patch_size))
        return tokens + self.pos_embed[...].astype(tokens.dtype)


class ViTEncoder(nnx.Module):
    """PatchEmbed + pre-LayerNorm bidirectional transformer + final LayerNorm.

    `__call__(images [B, H, W, C]) -> tokens [B, N, D]`; with `return_pooled=True`
    returns `(tokens, pooled [B, D])`, pooled = mean over tokens.
    Submodules: `patch_embed`, `encoder` (TransformerStack).
    """

    def __init__(
        self,
        image_size,
        patch_size,
        in_channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        activation: str = "gelu",
        norm: str = "layer",
        qkv_bias: bool = True,
        out_bias: bool = True,
        kernel_init=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.patch_embed = PatchEmbed(
            image_size,
            patch_size,
            in_channels,
            dim,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.encoder = TransformerStack(
            depth,
            dim,
            num_heads,
            mlp_hidden,
            activation=activation,
            norm=norm,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array, *, return_pooled: bool = False):
        tokens = self.encoder(self.patch_embed(images)).out
        if return_pooled:
            return tokens, jnp.mean(tokens, axis=1)
        return tokens
