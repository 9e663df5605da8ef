"""Behaviour of the shared layers in `common.nn` against naive numpy references and invariants.

Shapes are kept few and small (B=2, T=8, D=32, H=4) so the whole file compiles quickly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import common.nn as cn
from tests.contracts import assert_decode_matches_forward

B, T, D, H = 2, 8, 32, 4


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def jit_apply(module, fn):
    """`fn(module, *arrays)` under one jax.jit over the module's split state.

    A whole-model jit compiles ~4x faster on CPU than eager op-by-op dispatch.
    The module's current state is read at every call, so later param edits are seen
    without a recompile."""
    graphdef = nnx.graphdef(module)
    f = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: f(nnx.state(module), *args)


def _randomize_params(module, seed=0, scale=0.3):
    """Replace every param (incl. zero-inits) with N(0, scale) noise so tests see real values."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(module, jax.tree.unflatten(treedef, new))


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_norms_match_numpy(dtype):
    x = _rand(0, B, T, D) * 3 + 1
    rms = cn.RMSNorm(D, eps=1e-6)
    ln = cn.LayerNorm(D, eps=1e-5)
    _randomize_params(rms, 1)
    _randomize_params(ln, 2)
    g = np.asarray(rms.scale[...])
    s, b = np.asarray(ln.scale[...]), np.asarray(ln.bias[...])
    xin = jnp.asarray(x, dtype)
    xr = np.asarray(xin.astype(jnp.float32), np.float64)  # the values the layer actually saw
    ref_rms = xr / np.sqrt(np.mean(xr**2, -1, keepdims=True) + 1e-6) * g
    mu = xr.mean(-1, keepdims=True)
    ref_ln = (xr - mu) / np.sqrt(((xr - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * s + b
    y_rms, y_ln = rms(xin), ln(xin)
    assert y_rms.dtype == dtype and y_ln.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y_rms, np.float32), ref_rms, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(y_ln, np.float32), ref_ln, rtol=tol, atol=tol)


def test_layernorm_without_affine_has_no_params():
    ln = cn.LayerNorm(D, use_scale=False, use_bias=False)
    assert jax.tree.leaves(nnx.state(ln, nnx.Param)) == []
    x = _rand(3, 4, D)
    y = np.asarray(ln(jnp.asarray(x)))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        ln(jnp.zeros((2, 16)))


# ------------------------------------------------------------------------------ MLP


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_mlp_matches_numpy(activation):
    mlp = cn.MLP(D, 48, activation, rngs=nnx.Rngs(0))
    _randomize_params(mlp, 4)
    x = _rand(5, B, T, D)
    p = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(mlp))}
    up = x @ p[("up_proj", "kernel")] + p[("up_proj", "bias")]
    if activation == "relu":
        h = np.maximum(up, 0)
    elif activation == "gelu":
        h = 0.5 * up * (1 + np.vectorize(math.erf)(up / math.sqrt(2)))
    else:
        gate = x @ p[("gate_proj", "kernel")] + p[("gate_proj", "bias")]
        h = gate / (1 + np.exp(-gate)) * up
    ref = h @ p[("down_proj", "kernel")] + p[("down_proj", "bias")]
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    assert (mlp.gate_proj is not None) == (activation == "swiglu")


def test_mlp_kernel_init_and_bad_activation():
    init = jax.nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    small = cn.MLP(256, 256, "relu", kernel_init=init, rngs=nnx.Rngs(0))
    default = cn.MLP(256, 256, "relu", rngs=nnx.Rngs(0))
    ratio = np.std(small.up_proj.kernel[...]) / np.std(default.up_proj.kernel[...])
    assert abs(ratio - math.sqrt(0.1)) < 0.03
    with pytest.raises(ValueError, match="activation"):
        cn.MLP(D, 8, "tanh", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------ attention


def _np_attention(q, k, v, mask, bias):
    """Naive reference: repeat kv heads, float64 softmax, fully masked rows -> 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    Bq, Q, Hq, Dh = q.shape
    g = Hq // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    m = np.broadcast_to(np.ones((1, 1, 1, 1), bool) if mask is None else mask, logits.shape)
    logits = np.where(m, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    e = np.where(m, np.exp(logits - np.where(np.isfinite(mx), mx, 0)), 0)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1), 0)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("mask_heads", [1, H])
def test_attention_matches_naive_reference(impl, mask_heads):
    Q, K, Hkv, Dh = 8, 8, 2, 8
    rng = np.random.default_rng(7)
    q, k, v = _rand(10, B, Q, H, Dh), _rand(11, B, K, Hkv, Dh), _rand(12, B, K, Hkv, Dh)
    mask = rng.random((B, mask_heads, Q, K)) < 0.6
    mask[0, :, 2] = False  # fully masked query rows
    mask[1, -1, 5] = False
    bias = _rand(13, 1, H, Q, K)
    attn = jax.jit(cn.dot_product_attention, static_argnames="implementation")
    for m, b in [(mask, None), (mask, bias), (None, bias)]:
        out = attn(q, k, v, m, b, implementation=impl)
        ref = _np_attention(q, k, v, m, b)
        assert not np.isnan(np.asarray(out)).any()
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    out = np.asarray(attn(q, k, v, mask, bias, implementation=impl))
    assert (out[0, 2] == 0).all()  # masked for every head
    if mask_heads == H:
        assert (out[1, 5, -1] == 0).all() and (out[1, 5, :-1] != 0).any()
    # gradients stay finite through fully masked rows
    grads = jax.jit(
        jax.grad(
            lambda q, k, v: cn.dot_product_attention(
                q, k, v, mask, bias, implementation=impl
            ).sum(),
            argnums=(0, 1, 2),
        )
    )(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_attention_weights_and_shape_errors():
    q, k = _rand(1, B, 4, H, 8), _rand(2, B, 6, 2, 8)
    mask = np.ones((B, 1, 4, 6), bool)
    mask[1, 0, 3] = False
    w = np.asarray(cn.attention_weights(q, k, mask))
    assert w.shape == (B, H, 4, 6) and w.dtype == np.float32
    sums = w.sum(-1)
    assert (w[1, :, 3] == 0).all()
    np.testing.assert_allclose(np.delete(sums, 3, axis=-1), 1, atol=1e-6)
    np.testing.assert_allclose(sums[0], 1, atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        cn.dot_product_attention(q, k, k, np.ones((B, 1, 4, 5), bool))
    with pytest.raises(ValueError, match="multiple"):
        cn.dot_product_attention(_rand(1, B, 4, 3, 8), k, k)


def test_masks():
    cm = np.asarray(cn.causal_mask(3, 5, offset=2))
    assert cm.shape == (1, 1, 3, 5)
    np.testing.assert_array_equal(cm[0, 0], np.tril(np.ones((3, 5), bool), k=2))
    # 2 queries just written into slots 3, 4 of a 6-slot cache
    m = np.asarray(cn.cache_mask(5, 2, 6))
    np.testing.assert_array_equal(m[0, 0], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    m = np.asarray(cn.cache_mask(jnp.array([5, 2]), 2, 6, causal=False))
    assert m.shape == (2, 1, 2, 6)
    np.testing.assert_array_equal(m[1, 0, 0], [1, 1, 0, 0, 0, 0])
    pm = np.asarray(cn.padding_mask(np.array([[1, 0, 1]])))
    assert pm.shape == (1, 1, 1, 3) and pm.dtype == bool


def test_attention_module_cross_attention_and_sow():
    att = cn.Attention(D, H, num_kv_heads=2, kv_dim=16, qkv_bias=True, rngs=nnx.Rngs(0))
    x, ctx = jnp.asarray(_rand(1, B, T, D)), jnp.asarray(_rand(2, B, 5, 16))
    att.sow_weights = True
    (y, cache), inter = nnx.capture(att, nnx.Intermediate)(x, context=ctx)
    assert y.shape == (B, T, D) and cache is None
    w = np.asarray(inter["attention_weights"][0])
    assert w.shape == (B, H, T, 5)
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        cn.Attention(D, H, num_kv_heads=3, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------- RoPE


def _np_rope(x, pos, theta=10000.0):
    """Llama/HF: emb = cat(freqs, freqs); x*cos + rotate_half(x)*sin."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    emb = np.asarray(pos, np.float64)[..., None] * inv
    emb = np.concatenate([emb, emb], -1)[..., None, :]
    rot = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def test_rope_reference_and_relative_property():
    x = _rand(20, B, T, H, 16)
    pos = np.stack([np.arange(T), np.arange(T) * 3 - 5])
    np.testing.assert_allclose(
        np.asarray(cn.apply_rope(x, pos)), _np_rope(x, pos), rtol=1e-5, atol=1e-5
    )
    # q.k after rope depends only on the position difference
    q, k = _rand(21, 1, 1, 1, 16), _rand(22, 1, 1, 1, 16)

    def score(m, n):
        qr = cn.apply_rope(q, jnp.array([[m]]))
        kr = cn.apply_rope(k, jnp.array([[n]]))
        return float(jnp.sum(qr * kr))

    for m, n in [(3, 1), (10, 2), (0, 5)]:
        base = score(m, n)
        for shift in (-7, 4, 100):
            assert abs(score(m + shift, n + shift) - base) < 1e-4
    assert abs(score(3, 1) - score(4, 1)) > 1e-3


def test_multi_axis_rope():
    x = _rand(23, B, T, H, 16)
    sections = (2, 3, 3)
    pos = np.arange(T)[None] + np.arange(B)[:, None]
    same = cn.apply_multi_axis_rope(x, np.stack([pos] * 3), sections)
    np.testing.assert_allclose(np.asarray(same), np.asarray(cn.apply_rope(x, pos)), atol=1e-6)
    # distinct axes: frequency slots of section a use positions[a] (Qwen2-VL reference)
    pos3 = np.stack([pos, 2 * pos + 1, -pos])
    dh = 16
    inv = 1.0 / 10000.0 ** (np.arange(0, dh, 2) / dh)
    freqs = pos3[..., None].astype(np.float64) * inv  # [3, B, T, 8]
    emb = np.concatenate([freqs, freqs], -1)  # [3, B, T, 16]
    chunks = np.split(emb, np.cumsum(sections * 2)[:-1], axis=-1)
    emb = np.concatenate([c[i % 3] for i, c in enumerate(chunks)], -1)[..., None, :]
    rot = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    ref = x * np.cos(emb) + rot * np.sin(emb)
    out = cn.apply_multi_axis_rope(x, pos3, sections)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sum to"):
        cn.apply_multi_axis_rope(x, pos3, (2, 2, 2))


# ------------------------------------------------------------------- T5 relative bias


def _t5_bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
    """Plain-Python transcription of mesh_tensorflow's _relative_position_bucket."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40)])
def test_relative_position_bucket_matches_t5(bidirectional, num_buckets, max_distance):
    rel = np.arange(-400, 401)
    ours = np.asarray(cn.relative_position_bucket(rel, bidirectional, num_buckets, max_distance))
    ref = [_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
    np.testing.assert_array_equal(ours, ref)


def test_relative_position_bucket_known_values():
    def f(rel, bi):
        return int(cn.relative_position_bucket(jnp.array(rel), bi))

    # causal (k - q <= 0 distinguished): exact up to 15, then log bins, 31 beyond 128
    assert [f(r, False) for r in (0, 3, -1, -15, -16, -32, -127, -128, -1000)] == [
        0,
        0,
        1,
        15,
        16,
        21,
        31,
        31,
        31,
    ]
    # bidirectional: keys after the query use buckets 16..31
    assert [f(r, True) for r in (0, -1, 1, -7, -8, 8, 20, -200)] == [0, 1, 17, 7, 8, 24, 26, 15]


def test_relative_position_bias_module():
    rpb = cn.RelativePositionBias(H, num_buckets=32, max_distance=128, rngs=nnx.Rngs(0))
    qp, kp = jnp.arange(5) + 3, jnp.arange(9)
    bias = np.asarray(rpb(qp, kp))
    assert bias.shape == (1, H, 5, 9) and bias.dtype == np.float32
    emb = np.asarray(rpb.embedding[...])
    for i, j in [(0, 0), (4, 1), (2, 8)]:
        bucket = _t5_bucket(int(kp[j] - qp[i]), False)
        np.testing.assert_array_equal(bias[0, :, i, j], emb[bucket])
    assert rpb(jnp.stack([qp, qp + 1]), kp).shape == (2, H, 5, 9)


def test_sinusoidal_embedding():
    t = np.array([[0.0, 0.5, 999.0], [1.0, 2.0, 250.25]])
    emb = np.asarray(cn.sinusoidal_embedding(t, 8))
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    args = t[..., None] * freqs
    ref = np.concatenate([np.cos(args), np.sin(args)], -1)
    assert emb.shape == (2, 3, 8)
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    assert cn.sinusoidal_embedding(jnp.ones(3), 7).shape == (3, 7)


# ----------------------------------------------------------------- transformer stack


STACK_VARIANTS = {
    "rope": dict(position="rope", num_kv_heads=2, activation="swiglu", norm="rms"),
    "relbias": dict(
        relative_bias=True,
        activation="relu",
        norm="rms",
        kernel_init=jax.nn.initializers.variance_scaling(0.1, "fan_in", "normal"),
    ),
}


@pytest.fixture(scope="module")
def nn_stacks():
    return {
        name: cn.TransformerStack(3, D, H, 64, rngs=nnx.Rngs(i), **kw)
        for i, (name, kw) in enumerate(STACK_VARIANTS.items())
    }


@pytest.mark.parametrize("variant", list(STACK_VARIANTS))
def test_kv_cache_decode_matches_full_forward(nn_stacks, variant):
    stack = nn_stacks[variant]
    x = jnp.asarray(_rand(30, B, T, D))
    full = jit_apply(stack, lambda m, x: m(x, mask=cn.causal_mask(T)).out)(x)
    # explicit cache mask (prefill) and the default one (mask=None, decode)
    prefill = jit_apply(stack, lambda m, x, c, mask: m(x, mask=mask, caches=c)[::2])
    if variant == "rope":
        step = jit_apply(stack, lambda m, x, c: m(x, caches=c)[::2])
    else:  # decode as internal RL does: lower blocks, then upper blocks, each with caches

        def split_step(m, x, c):
            lower = m(x, caches=c, stop_layer=1)
            upper = m(lower.out, caches=lower.caches, start_layer=1)
            return upper.out, upper.caches

        step = jit_apply(stack, split_step)

    max_len, n_prefill = T + 4, 3
    # scalar length, and per-sequence lengths [B] (vmapped cache write, [B, ...] bias/mask)
    for per_seq in (False, True):
        caches = stack.init_caches(B, max_len, per_sequence_length=per_seq)
        # prefill 3 tokens at once, then decode one token at a time
        out, caches = prefill(
            x[:, :n_prefill], caches, cn.cache_mask(n_prefill, n_prefill, max_len)
        )
        outs = [out]
        for t in range(n_prefill, T):
            y, caches = step(x[:, t : t + 1], caches)
            outs.append(y)
        assert_decode_matches_forward(
            full, jnp.concatenate(outs, axis=1), atol=1e-5, rtol=1e-5, decode_time_axis=1
        )
        assert np.asarray(caches[0].length).tolist() == ([T] * B if per_seq else T)
        assert caches[0].k.shape == (B, max_len, stack.num_kv_heads, D // H)


@pytest.mark.parametrize("variant", list(STACK_VARIANTS))
def test_causality(nn_stacks, variant):
    stack = nn_stacks[variant]
    fwd = jit_apply(stack, lambda m, x: m(x, mask=cn.causal_mask(T), return_residuals=True))
    x = _rand(31, B, T, D)
    t = 5
    x2 = x.copy()
    x2[:, t] += 1.0
    a, b = fwd(jnp.asarray(x)), fwd(jnp.asarray(x2))
    np.testing.assert_array_equal(np.asarray(a.out)[:, :t], np.asarray(b.out)[:, :t])
    np.testing.assert_array_equal(
        np.asarray(a.residuals)[:, :, :t], np.asarray(b.residuals)[:, :, :t]
    )
    assert not np.allclose(np.asarray(a.out)[:, t:], np.asarray(b.out)[:, t:])


def test_residual_taps_and_interventions(nn_stacks):
    stack = nn_stacks["relbias"]
    L = stack.num_layers
    x = jnp.asarray(_rand(32, B, T, D))
    mask = cn.causal_mask(T)
    base, renormed = jit_apply(
        stack,
        lambda m, x: (
            out := m(x, mask=mask, return_residuals=True),
            m.final_norm(out.residuals[-1]),
        ),
    )(x)
    assert base.residuals.shape == (L + 1, B, T, D)
    np.testing.assert_array_equal(np.asarray(base.residuals[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(base.out), np.asarray(renormed))

    u = jnp.asarray(_rand(33, D, D)) * 0.3
    r0 = np.asarray(base.residuals)
    for layer in range(L + 1):
        steer = jit_apply(
            stack,
            lambda m, x, u, layer=layer: m(
                x,
                mask=mask,
                return_residuals=True,
                intervention=lambda r: r + r @ u,
                intervention_layer=layer,
            ),
        )
        same = steer(x, jnp.zeros_like(u))  # zero edit: bit-identical
        np.testing.assert_array_equal(np.asarray(same.out), np.asarray(base.out))
        np.testing.assert_array_equal(np.asarray(same.residuals), r0)
        steered = steer(x, u)
        r1 = np.asarray(steered.residuals)
        np.testing.assert_array_equal(r1[:layer], r0[:layer])
        np.testing.assert_allclose(r1[layer], r0[layer] + r0[layer] @ np.asarray(u), atol=1e-5)
        assert all(not np.allclose(r1[i], r0[i]) for i in range(layer, L + 1))
        assert not np.allclose(np.asarray(steered.out), np.asarray(base.out))

    # lower half then upper half == whole stack (internal RL's split at l)
    def split_run(m, x):
        lower = m(x, mask=mask, stop_layer=2)
        return lower, m(lower.out, mask=mask, start_layer=2)

    lower, upper = jit_apply(stack, split_run)(x)
    assert lower.residuals is None and lower.caches is None
    np.testing.assert_allclose(np.asarray(lower.out), r0[2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(upper.out), np.asarray(base.out), atol=1e-6)
    with pytest.raises(ValueError, match="intervention_layer"):
        stack(x, mask=mask, intervention=lambda r: r, intervention_layer=L + 1)


def test_intervention_per_time_step_controller(nn_stacks):
    """`e <- e + U_t e` with a different U_t per time step (internal RL), inside jit."""
    stack = nn_stacks["rope"]
    x = jnp.asarray(_rand(34, B, T, D))
    us = jnp.asarray(_rand(35, B, T, D, D)) * 0.1
    run = jit_apply(
        stack,
        lambda m, x, us: m(
            x,
            mask=cn.causal_mask(T),
            return_residuals=True,
            intervention_layer=2,
            intervention=lambda e: e + jnp.einsum("btij,btj->bti", us, e),
        ),
    )
    out = run(x, us)
    base = run(x, jnp.zeros_like(us))
    # editing U at step 6 only changes the stream from step 6 on (causal), from layer 2 on
    out6 = run(x, us.at[:, 6].set(0.0))
    r, r6 = np.asarray(out.residuals), np.asarray(out6.residuals)
    np.testing.assert_array_equal(r6[:, :, :6], r[:, :, :6])
    np.testing.assert_array_equal(r6[:2], r[:2])
    assert not np.allclose(r6[2:, :, 6], r[2:, :, 6])
    assert not np.allclose(np.asarray(out.out), np.asarray(base.out))


# ------------------------------------------------------------------------------ ViT


def test_vit_shapes_and_errors():
    vit = cn.ViTEncoder(16, 4, 3, D, 2, H, 64, rngs=nnx.Rngs(0))
    imgs = jnp.asarray(_rand(40, B, 16, 16, 3))
    tokens, pooled = jit_apply(vit, lambda m, im: m(im, return_pooled=True))(imgs)
    assert tokens.shape == (B, 16, D) and pooled.shape == (B, D)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(tokens).mean(1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(2, 12, 16, 3\)"):
        vit(jnp.zeros((B, 12, 16, 3)))
    with pytest.raises(ValueError, match=r"\(2, 16, 16, 1\)"):
        vit(jnp.zeros((B, 16, 16, 1)))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        cn.PatchEmbed((18, 16), 4, 3, D, rngs=nnx.Rngs(0))
    # patch layout: patch (row 0, col 1) holds pixels [0:4, 4:8]
    p = np.asarray(cn.patchify(imgs, 4))
    assert p.shape == (B, 16, 48)
    np.testing.assert_array_equal(p[:, 1], np.asarray(imgs)[:, 0:4, 4:8].reshape(B, 48))


# ---------------------------------------------------------------------------- adaLN


def test_adaln_identity_at_init_and_per_token_cond():
    blk = cn.AdaLNBlock(D, H, 64, 16, position="rope", rope_sections=(2, 1, 1), rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand(50, B, T, D))
    pos = jnp.broadcast_to(jnp.arange(T), (3, B, T))
    cond_seq = jnp.asarray(_rand(51, B, 16))
    cond_tok = jnp.asarray(_rand(52, B, T, 16))
    causal = cn.causal_mask(T)
    fwd = jit_apply(blk, lambda m, x, c: m(x, c, mask=causal, positions=pos))
    np.testing.assert_array_equal(np.asarray(fwd(x, cond_seq)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(fwd(x, cond_tok)), np.asarray(x))
    final = cn.AdaLNFinal(D, 12, 16, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(final(x, cond_tok)), 0)

    _randomize_params(blk, 53)
    trained = fwd
    y_seq = trained(x, cond_seq)
    assert not np.allclose(np.asarray(y_seq), np.asarray(x))
    tiled = jnp.broadcast_to(cond_seq[:, None], (B, T, 16))
    np.testing.assert_allclose(np.asarray(trained(x, tiled)), np.asarray(y_seq), atol=1e-6)
    # per-token cond really is per token: under a causal mask, editing token 3's cond
    # leaves tokens 0..2 untouched and changes token 3
    y0 = np.asarray(trained(x, cond_tok))
    y1 = np.asarray(trained(x, cond_tok.at[:, 3].add(1.0)))
    np.testing.assert_array_equal(y1[:, :3], y0[:, :3])
    assert not np.allclose(y1[:, 3], y0[:, 3])
    with pytest.raises(ValueError, match="cond"):
        blk(x, jnp.zeros((B, T + 1, 16)))

    # text cross-attention (Wan / PixArt): still the identity at init, then uses the context
    xblk = cn.AdaLNBlock(D, H, 64, 16, context_dim=24, rngs=nnx.Rngs(1))
    ctx = jnp.asarray(_rand(54, B, 5, 24))
    xfwd = jit_apply(xblk, lambda m, x, c, ctx: m(x, c, context=ctx))
    np.testing.assert_array_equal(np.asarray(xfwd(x, cond_tok, ctx)), np.asarray(x))
    _randomize_params(xblk, 55)
    assert not np.allclose(
        np.asarray(xfwd(x, cond_tok, ctx)), np.asarray(xfwd(x, cond_tok, 2 * ctx))
    )
    with pytest.raises(ValueError, match="context"):
        xblk(x, cond_tok)

    temb = cn.TimestepEmbedder(16, freq_dim=32, rngs=nnx.Rngs(0))
    t_tok = jnp.concatenate([jnp.zeros((B, 3)), jnp.full((B, T - 3), 500.0)], axis=1)
    e = temb(t_tok)
    assert e.shape == (B, T, 16)
    np.testing.assert_array_equal(np.asarray(e[:, 0]), np.asarray(e[:, 2]))


# ----------------------------------------------------------------------------- LoRA


def test_lora_apply_train_filter_and_merge():
    from common.nn.lora import LoRALinear, apply_lora, merge_lora

    stack = cn.TransformerStack(1, D, H, 64, activation="swiglu", position="rope", rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand(60, B, T, D))
    fwd = lambda m: jit_apply(m, lambda m, x: m(x, mask=cn.causal_mask(T)).out)
    y0 = np.asarray(fwd(stack)(x))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    paths = apply_lora(stack, targets, rank=4, alpha=8, rngs=nnx.Rngs(1))
    assert len(paths) == len(targets)
    assert isinstance(stack.blocks[0].mlp.gate_proj, LoRALinear)
    lora_fwd = fwd(stack)
    np.testing.assert_array_equal(np.asarray(lora_fwd(x)), y0)  # B = 0 at init

    # the LoRAParam filter selects exactly the A/B matrices; their grads are what a trainer gets
    graphdef, lora, rest = nnx.split(stack, nnx.LoRAParam, ...)
    leaves = jax.tree.leaves(lora)
    assert len(leaves) == 2 * len(paths)
    rank = 4  # A [in, r] + B [r, out] for q, k, v, o (D -> D) and gate, up, down (D <-> 64)
    assert sum(a.size for a in leaves) == 4 * rank * (D + D) + 3 * rank * (D + 64)

    def loss(lora, rest):
        return jnp.sum(nnx.merge(graphdef, lora, rest)(x, mask=cn.causal_mask(T)).out ** 2)

    g = jax.jit(jax.grad(loss))(lora, rest)
    gb = stack.blocks[0].attn.q_proj
    assert float(jnp.abs(g["blocks"][0]["attn"]["q_proj"]["lora_b"][...]).sum()) > 0
    assert float(jnp.abs(g["blocks"][0]["attn"]["q_proj"]["lora_a"][...]).sum()) == 0  # B == 0

    _randomize_params(stack, 61, scale=0.1)  # now B != 0
    y_lora = np.asarray(lora_fwd(x))
    assert not np.allclose(y_lora, y0)
    assert len(merge_lora(stack)) == len(paths)
    assert type(stack.blocks[0].attn.q_proj) is nnx.Linear and gb.rank == 4
    assert jax.tree.leaves(nnx.state(stack, nnx.LoRAParam)) == []
    np.testing.assert_allclose(np.asarray(fwd(stack)(x)), y_lora, atol=1e-5)
    with pytest.raises(ValueError, match="no nnx.Linear"):
        apply_lora(stack, ("nope",), rank=2, alpha=2, rngs=nnx.Rngs(0))
