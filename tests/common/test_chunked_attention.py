"""`chunked_attention` (query chunks in turn, each rematerialised) equals one-pass attention,
values and gradients, and bounds the live softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.nn import chunked_attention, dot_product_attention


def _inputs(B=2, Q=37, K=37, H=4, Hkv=2, D=8):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, Q, H, D))
    k = jax.random.normal(ks[1], (B, K, Hkv, D))
    v = jax.random.normal(ks[2], (B, K, Hkv, D))
    causal = jnp.tril(jnp.ones((Q, K), bool))
    # a LIVR-like mask: causal minus a block, and one fully masked row (returns 0)
    mask = causal.at[20:, 3:9].set(False).at[5].set(False)
    mask = jnp.broadcast_to(mask, (B, 1, Q, K))
    bias = jax.random.normal(ks[3], (1, H, Q, K))
    return q, k, v, mask, bias


@pytest.mark.parametrize("chunk", [1, 8, 16, 37, 64])
def test_chunked_attention_equals_one_pass(chunk):
    q, k, v, mask, bias = _inputs()
    want = dot_product_attention(q, k, v, mask=mask, bias=bias)
    got = chunked_attention(q, k, v, mask=mask, bias=bias, query_chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a mask broadcast over queries ([B, 1, 1, K]) is passed whole to every chunk
    pad = mask[:, :, -1:, :]
    np.testing.assert_allclose(
        chunked_attention(q, k, v, mask=pad, query_chunk=chunk),
        dot_product_attention(q, k, v, mask=pad),
        rtol=1e-5,
        atol=1e-6,
    )


def test_chunked_attention_gradients_equal_one_pass():
    q, k, v, mask, bias = _inputs()

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    one = jax.grad(
        lambda *a: loss(lambda q, k, v: dot_product_attention(q, k, v, mask=mask), *a),
        argnums=(0, 1, 2),
    )(q, k, v)
    chunked = jax.grad(
        lambda *a: loss(lambda q, k, v: chunked_attention(q, k, v, mask=mask, query_chunk=8), *a),
        argnums=(0, 1, 2),
    )(q, k, v)
    for g, w in zip(chunked, one, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_chunked_attention_keeps_one_chunk_of_softmax_live():
    """The compiled gradient's temporaries shrink with the chunk (the point of chunking)."""
    B, S, H, D = 1, 1024, 8, 16
    spec = jax.ShapeDtypeStruct
    args = (
        spec((B, S, H, D), jnp.float32),
        spec((B, S, H, D), jnp.float32),
        spec((B, S, H, D), jnp.float32),
    )

    def temp(fn):
        g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)))
        return g.lower(*args).compile().memory_analysis().temp_size_in_bytes

    full = temp(lambda q, k, v: dot_product_attention(q, k, v))
    chunked = temp(lambda q, k, v: chunked_attention(q, k, v, query_chunk=128))
    softmax = B * H * S * S * 4  # one float32 [B, H, S, S] array
    assert full >= softmax
    assert chunked < softmax / 2
