"""Tests of spatia's flow-matching video generator (spatia.model, spatia.flow, spatia.model_config).

Tiny shapes; every jitted function is compiled once through module-scoped fixtures.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from common import train as ctrain
from spatia import flow
from spatia import model as M
from spatia.model_config import VideoModelConfig, paper, small, tiny

B, N, MP, K, HW = 2, 4, 1, 2, 16


def _blocky(r, shape, block=4):
    """Random frames that are constant over block x block pixels: learnable in a few steps."""
    *lead, H, W, C = shape
    x = r.random((*lead, H // block, W // block, C)).astype(np.float32)
    return np.repeat(np.repeat(x, block, axis=-3), block, axis=-2)


def _batch(seed=0, cfg=None):
    cfg = cfg or _test_config()
    r = np.random.default_rng(seed)
    C, Ch = cfg.channels, cfg.hole_channels
    return dict(
        frames=_blocky(r, (B, N, HW, HW, C)),
        prev=_blocky(r, (B, MP, HW, HW, C)),
        refs=_blocky(r, (B, K, HW, HW, C)),
        ref_valid=np.array([[True, True], [True, False]]),
        proj=r.random((B, MP + N, HW, HW, C), np.float32),
        hole=(r.random((B, MP + N, HW, HW, Ch)) > 0.7).astype(np.float32),
        instruction=np.array([1, 3], np.int32),
    )


def _randomize(model, filt, seed, scale=0.05):
    """Adds noise to every variable selected by filt, so zero-initialised gates are open.

    Host-side numpy noise: no per-shape compiles."""
    r = np.random.default_rng(seed)
    state = nnx.state(model, filt)
    noisy = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * r.standard_normal(x.shape).astype(x.dtype)),
        state,
    )
    nnx.update(model, noisy)


def _test_config():
    # The tiny preset with 2 instead of 4 main blocks: the blocks are unrolled, so this halves
    # every compile; each main block still carries a control hint.
    return dataclasses.replace(tiny(), depth=2, control_layers=(0, 1))


@pytest.fixture(scope="module")
def cfg():
    return _test_config()


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.fixture(scope="module")
def rand_model(cfg):
    """A tiny model whose base is randomised (open gates, non-zero head) while the control
    branch has its init: blocks copied from the main ones, zero before/after projections."""
    model = M.VideoDiT(cfg, rngs=nnx.Rngs(0))
    _randomize(model, M.BASE_PARAMS, 1)
    M.init_control_from_main(model)
    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def _forward(graphdef, state, x, t, layout, control, instruction, key_valid):
    return nnx.merge(graphdef, state)(
        x, t, layout, control=control, instruction=instruction, key_valid=key_valid
    )


@pytest.fixture(scope="module")
def inputs(cfg, batch):
    return flow.training_inputs(cfg, batch, jax.random.key(5))


def _run(model, inp, control="same"):
    gd, st = nnx.split(model)
    ctrl = inp["control"] if control == "same" else control
    return _forward(
        gd, st, inp["x_t"], inp["t"], inp["layout"], ctrl, inp["instruction"], inp["key_valid"]
    )


# ------------------------------------------------------------------------------ config


def test_presets_and_config_errors():
    for make in (tiny, small, paper):
        c = make()
        assert sum(c.rope_sections) == c.head_dim // 2, make.__name__
    p = paper()
    assert (p.depth, p.dim, p.num_heads, p.mlp_hidden) == (30, 3072, 24, 14336)
    assert p.control_layers == (0, 4, 8, 12, 16, 20, 24, 28)
    assert p.rope_sections == (22, 21, 21) and p.max_refs == 7 and p.num_prev_frames == 3
    with pytest.raises(ValueError, match="control_layers"):
        VideoModelConfig(depth=4, control_layers=(0, 4))
    with pytest.raises(ValueError, match="sampler"):
        VideoModelConfig(sampler="ddim")


# ---------------------------------------------------------------------- tokens / layout


def test_patchify_roundtrip_and_positions():
    x = jnp.asarray(np.random.default_rng(0).random((2, 4, 8, 12, 3)), jnp.float32)
    tok = M.patchify_video(x, (2, 4, 4))
    assert tok.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
    # token (frame 1, row 1, col 2) holds frames 2-3, rows 4-7, cols 8-11
    np.testing.assert_array_equal(
        tok[0, 1 * 6 + 1 * 3 + 2].reshape(2, 4, 4, 3), x[0, 2:4, 4:8, 8:12]
    )
    np.testing.assert_array_equal(M.unpatchify_video(tok, (2, 4, 4), (2, 2, 3), 3), x)

    lay = M.SequenceLayout(num_refs=2, num_prev=1, num_target=3, grid=(2, 3))
    pos = lay.positions()
    assert pos.shape == (3, lay.num_tokens) and lay.cond_tokens == 18
    ref, vid = pos[:, : lay.ref_tokens], pos[:, lay.ref_tokens :]
    assert sorted(set(ref[0])) == [-2, -1] and sorted(set(vid[0])) == [0, 1, 2, 3]
    assert sorted(set(ref[1])) == [2, 3] and sorted(set(vid[1])) == [
        0,
        1,
    ]  # refs rows shifted by gh
    assert sorted(set(ref[2])) == sorted(set(vid[2])) == [0, 1, 2]
    assert lay.target_mask().sum() == 18 and lay.prev_mask().sum() == 6


def test_tokenize_temporal_patch_tiles_refs_and_pools_validity():
    cfg = dataclasses.replace(small(), patch_size=(2, 8, 8))
    r = np.random.default_rng(0)
    Bs, H = 1, 16
    b = dict(
        frames=r.random((Bs, 4, H, H, 3), np.float32),
        prev=r.random((Bs, 2, H, H, 3), np.float32),
        prev_valid=np.array([[True, False]]),
        refs=r.random((Bs, 3, H, H, 3), np.float32),
    )
    out = M.tokenize(cfg, b)
    lay = out["layout"]
    assert (lay.num_refs, lay.num_prev, lay.num_target, lay.grid) == (3, 1, 2, (2, 2))
    # a reference fills one latent frame with two copies of itself
    ref1 = out["tokens"][0, 4:8].reshape(2, 2, 2, 8, 8, 3)  # ref 1: (gh, gw, pt, ph, pw, C)
    np.testing.assert_array_equal(ref1[:, :, 0], ref1[:, :, 1])
    np.testing.assert_allclose(ref1[0, 1, 0], M.encode(b["refs"][0, 1, :8, 8:]), rtol=1e-6)
    # the history latent frame is padding because one of its two frames is
    kv = np.asarray(out["key_valid"][0])
    np.testing.assert_array_equal(kv, [True] * 12 + [False] * 4 + [True] * 8)


def test_tokenize_errors(cfg, batch):
    bad = dict(batch, refs=batch["refs"][:, :, :8])
    with pytest.raises(ValueError, match="refs"):
        M.tokenize(cfg, bad)
    with pytest.raises(ValueError, match="hole"):
        M.tokenize(cfg, {k: v for k, v in batch.items() if k != "hole"})
    with pytest.raises(ValueError, match="unknown batch keys"):
        M.tokenize(cfg, dict(batch, text=1))


# ------------------------------------------------------------------------------- model


def test_control_branch_is_identity_at_init(rand_model, inputs):
    with_ctrl = _run(rand_model, inputs)
    without = _run(rand_model, inputs, control=None)
    assert float(jnp.abs(without).max()) > 1e-3  # the randomised base predicts something
    np.testing.assert_array_equal(np.asarray(with_ctrl), np.asarray(without))

    # Opening the zero after-projections makes the control input matter: the test can fail.
    opened = nnx.clone(rand_model)
    _randomize(opened.control, nnx.PathContains("after_proj"), 2, 0.5)
    diff = _run(opened, inputs) - without
    assert float(jnp.abs(diff).max()) > 1e-3


def test_conditioning_tokens_not_noised(cfg, batch):
    a = flow.training_inputs(cfg, batch, jax.random.key(0))
    b = flow.training_inputs(cfg, batch, jax.random.key(1))
    c = a["layout"].cond_tokens
    clean = a["tokens"]
    for inp in (a, b):
        np.testing.assert_array_equal(inp["x_t"][:, :c], clean[:, :c])
        np.testing.assert_array_equal(inp["t"][:, :c], 0.0)
        assert (
            not np.asarray(inp["loss_mask"][:, :c]).any()
            and np.asarray(inp["loss_mask"][:, c:]).all()
        )
        t = np.asarray(inp["t"][:, c:])
        assert ((t > 0) & (t < 1)).all() and (t == t[:, :1]).all()  # one t per sample
    assert not np.allclose(a["x_t"][:, c:], b["x_t"][:, c:])

    # history noise augmentation touches history tokens only, with a small t_aug
    aug = flow.training_inputs(cfg, batch, jax.random.key(0), hist_noise_max=0.05)
    lay = aug["layout"]
    r, prev = lay.ref_tokens, lay.prev_mask()
    np.testing.assert_array_equal(aug["x_t"][:, :r], clean[:, :r])
    t_prev = np.asarray(aug["t"])[:, prev]
    assert (t_prev > 0).all() and (t_prev <= 0.05).all()
    assert not np.allclose(aug["x_t"][:, prev], clean[:, prev])


def test_loss_ignores_non_target_tokens(cfg, inputs):
    pred = jax.random.normal(jax.random.key(3), inputs["target"].shape)
    mask = inputs["loss_mask"]
    base = flow.masked_mse(pred, inputs["target"], mask)
    bump = jnp.where(mask[..., None], 0.0, 100.0)
    np.testing.assert_array_equal(flow.masked_mse(pred + bump, inputs["target"], mask), base)
    bump_t = jnp.where(mask[..., None], 0.1, 0.0)
    assert float(flow.masked_mse(pred + bump_t, inputs["target"], mask)) != float(base)
    # by hand: mean over target tokens and features
    c = inputs["layout"].cond_tokens
    ref = np.mean((np.asarray(pred)[:, c:] - np.asarray(inputs["target"])[:, c:]) ** 2)
    np.testing.assert_allclose(float(base), ref, rtol=1e-5)


# ------------------------------------------------------------------------------ flow


def test_logit_normal_timesteps_and_flow_target():
    t = flow.logit_normal_timesteps(jax.random.key(0), (20000,), mean=0.5, std=1.0)
    t = np.asarray(t)
    assert ((t > 0) & (t < 1)).all()
    assert abs(np.median(t) - 1 / (1 + np.exp(-0.5))) < 0.01
    assert (
        abs(np.mean(np.log(t / (1 - t))) - 0.5) < 0.03
        and abs(np.std(np.log(t / (1 - t))) - 1) < 0.03
    )
    ts = np.asarray(flow.logit_normal_timesteps(jax.random.key(0), (20000,), 0.0, 1.0, shift=3.0))
    assert abs(np.median(ts) - 0.75) < 0.01  # shift(0.5) = 3*0.5 / (1 + 2*0.5)

    x = jnp.array([[[1.0, -2.0]]])
    e = jnp.array([[[3.0, 0.5]]])
    np.testing.assert_allclose(flow.interpolate(x, e, jnp.array([[0.25]])), [[[1.5, -1.375]]])
    np.testing.assert_array_equal(flow.interpolate(x, e, jnp.array([[0.0]])), x)
    np.testing.assert_array_equal(flow.interpolate(x, e, jnp.array([[1.0]])), e)
    np.testing.assert_array_equal(flow.velocity_target(x, e), [[[2.0, 2.5]]])
    # the velocity target is d x_t / dt of the interpolation
    h = 1e-2
    fd = (
        flow.interpolate(x, e, jnp.array([[0.3 + h]])) - flow.interpolate(x, e, jnp.array([[0.3]]))
    ) / h
    np.testing.assert_allclose(fd, flow.velocity_target(x, e), rtol=1e-4)


def test_integrators_on_known_linear_fields():
    a, b = jnp.array([0.7, -1.3]), jnp.array([2.0, 0.5])
    x1 = jnp.array([1.0, 2.0])
    v = lambda x, t: a + b * t
    exact = x1 - (a + b / 2)  # x(0) = x(1) - int_0^1 v dt
    for shift in (1.0, 3.0):
        times = flow.time_grid(5, shift)
        np.testing.assert_allclose(
            flow.integrate(v, x1, times, "heun"), exact, rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        flow.integrate(lambda x, t: a, x1, flow.time_grid(7), "euler"), x1 - a, rtol=1e-6
    )
    # Euler on a t-dependent field uses left endpoints: sum_i dt (a + b t_i), t_i = 1, .., 1/S
    S = 4
    euler = flow.integrate(v, x1, flow.time_grid(S), "euler")
    np.testing.assert_allclose(euler, x1 - a - b * (S + 1) / (2 * S), rtol=1e-5)
    assert not np.allclose(euler, exact)
    # linear in x: dx/dt = x is integrated exactly by neither, but Heun is far more accurate
    e_err = abs(
        float(flow.integrate(lambda x, t: x, 1.0, flow.time_grid(8), "euler")[()]) - np.exp(-1)
    )
    h_err = abs(
        float(flow.integrate(lambda x, t: x, 1.0, flow.time_grid(8), "heun")[()]) - np.exp(-1)
    )
    assert h_err < e_err / 10


# ---------------------------------------------------------------------------- sampler


def test_sampler_one_euler_step_and_reclamp(cfg, rand_model, batch):
    cond = {k: v for k, v in batch.items() if k != "frames"}
    gd, st = nnx.split(rand_model)
    key = jax.random.key(7)
    out = flow.sample(
        gd, st, cond, key, 1, num_frames=N, method="euler", guidance_scale=1.0, shift=1.0
    )

    inp = M.tokenize(cfg, dict(cond, num_target=N))
    lay, clean = inp["layout"], inp["tokens"]
    c = lay.cond_tokens
    noise = jax.random.normal(key, clean[:, c:].shape, jnp.float32)
    x1 = jnp.concatenate([clean[:, :c], noise], axis=1)
    t1 = jnp.broadcast_to(jnp.where(jnp.asarray(lay.target_mask()), 1.0, 0.0), x1.shape[:2])
    v = _forward(gd, st, x1, t1, lay, inp["control"], inp["instruction"], inp["key_valid"])
    manual = x1[:, c:] - v[:, c:]  # one step from t = 1 to t = 0
    np.testing.assert_allclose(out["sequence"][:, c:], manual, rtol=1e-5, atol=1e-5)
    frames = M.decode(M.unpatchify_video(manual, cfg.patch_size, (N, *lay.grid), cfg.channels))
    np.testing.assert_allclose(out["frames"], frames, rtol=1e-5, atol=1e-5)
    assert out["frames"].shape == (B, N, HW, HW, cfg.channels)

    # the model moves conditioning tokens (v != 0 there), yet the sampler resets them exactly
    assert float(jnp.abs(v[:, :c]).max()) > 1e-3
    np.testing.assert_array_equal(out["sequence"][:, :c], clean[:, :c])


def test_sampler_heun_cfg_matches_manual_steps(cfg, rand_model, batch):
    cond = {k: v for k, v in batch.items() if k != "frames"}
    gd, st = nnx.split(rand_model)
    key, scale, shift = jax.random.key(0), 3.0, 2.0
    out = flow.sample(gd, st, cond, key, 2, method="heun", guidance_scale=scale, shift=shift)

    inp = M.tokenize(cfg, dict(cond, num_target=N))
    lay, clean = inp["layout"], inp["tokens"]
    c = lay.cond_tokens
    target = jnp.asarray(lay.target_mask())
    null = jnp.full((B,), cfg.num_instructions, jnp.int32)

    def vel(x, t):
        tt = jnp.broadcast_to(jnp.where(target, t, 0.0), x.shape[:2])
        v_c = _forward(gd, st, x, tt, lay, inp["control"], inp["instruction"], inp["key_valid"])
        v_n = _forward(gd, st, x, tt, lay, inp["control"], null, inp["key_valid"])
        return v_n + scale * (v_c - v_n)

    def clamp(x):
        return x.at[:, :c].set(clean[:, :c])

    x = jnp.concatenate([clean[:, :c], jax.random.normal(key, clean[:, c:].shape)], axis=1)
    ts = np.asarray(flow.time_grid(2, shift))
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        d0 = vel(x, t0)
        d1 = vel(clamp(x + (t1 - t0) * d0), t1)
        x = clamp(x + (t1 - t0) * 0.5 * (d0 + d1))
    np.testing.assert_allclose(out["sequence"], x, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["sequence"][:, :c], clean[:, :c])
    # guidance matters: the unguided velocity differs from the guided one
    tt = jnp.broadcast_to(jnp.where(target, 1.0, 0.0), x.shape[:2])
    v_c = _forward(gd, st, x, tt, lay, inp["control"], inp["instruction"], inp["key_valid"])
    assert float(jnp.abs(vel(x, 1.0) - v_c)[:, c:].max()) > 1e-3


# ---------------------------------------------------------------- training and stages


def test_stage_filters_select_the_right_params(cfg):
    model = M.VideoDiT(cfg, rngs=nnx.Rngs(0))

    def paths(filt):
        return [p for p, _ in nnx.to_flat_state(nnx.state(model, filt))]

    base, ctrl = paths(M.BASE_PARAMS), paths(M.CONTROL_PARAMS)
    assert base and ctrl and all(p[0] == "control" for p in ctrl)
    assert not any("control" in p for p in base)
    n_all = len(paths(nnx.Param))
    assert len(base) + len(ctrl) == n_all
    M.add_main_lora(model, rngs=nnx.Rngs(1))
    lora = paths(M.LORA_PARAMS)
    assert len(lora) == 2 * len(cfg.lora_targets) * cfg.depth
    assert all(p[0] == "blocks" and p[-1] in ("lora_a", "lora_b") for p in lora)
    assert len(paths(M.BASE_PARAMS)) == len(base)  # LoRA matrices are not base params
    with pytest.raises(ValueError, match="before add_main_lora"):
        M.init_control_from_main(model)
    assert len(M.merge_main_lora(model)) == len(cfg.lora_targets) * cfg.depth
    assert not paths(nnx.LoRAParam)


def test_overfit_one_batch(cfg, batch):
    # stage 0 (the base model): history and references, no memory projection
    batch = {k: v for k, v in batch.items() if k not in ("proj", "hole")}
    model = M.VideoDiT(cfg, rngs=nnx.Rngs(0))
    loss_fn = flow.make_loss_fn(cond_drop_prob=0.0)
    steps = 100
    tx = ctrain.make_optimizer(
        ctrain.OptimizerConfig(learning_rate=3e-3, schedule="constant", total_steps=steps)
    )
    graphdef, state = ctrain.create_train_state(model, tx, 0, trainable=M.BASE_PARAMS)
    step = ctrain.make_train_step(graphdef, loss_fn, tx)
    rec = _Recorder()
    ctrain.train(state, step, _FixedBatch(batch), num_steps=steps, log_every=1, metrics_writer=rec)
    losses = np.array(rec.losses)
    assert len(losses) == steps and np.isfinite(losses).all()
    # t and the noise are redrawn every step, so compare averages
    first, last = losses[:5].mean(), losses[-10:].mean()
    assert last < 0.5 * first, (first, last)


class _Recorder:
    def __init__(self):
        self.losses = []

    def write(self, step, metrics):
        self.losses.append(metrics["loss"])


class _FixedBatch:
    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


# ------------------------------------------------------------------------ paper preset


def test_paper_preset_builds_and_traces():
    p = paper()
    abstract = nnx.eval_shape(lambda: M.VideoDiT(p, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    n_ctrl = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, M.CONTROL_PARAMS)))
    assert 5.0e9 < n_params - n_ctrl < 6.0e9 and len(abstract.control.blocks) == 8

    # the full-width training loss, traced abstractly on a reduced grid (2x2 tokens per latent frame)
    rb = dict(
        frames=jax.ShapeDtypeStruct((1, 18, 4, 4, 48), jnp.float32),
        prev=jax.ShapeDtypeStruct((1, 3, 4, 4, 48), jnp.float32),
        refs=jax.ShapeDtypeStruct((1, 7, 4, 4, 48), jnp.float32),
        proj=jax.ShapeDtypeStruct((1, 21, 4, 4, 48), jnp.float32),
        hole=jax.ShapeDtypeStruct((1, 21, 4, 4, 48), jnp.float32),
        instruction=jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    gd, st = nnx.split(abstract)
    out = jax.eval_shape(lambda s, b: flow.loss_fn(nnx.merge(gd, s), b, jax.random.key(0)), st, rb)
    assert out[0].shape == ()


@pytest.mark.slow
def test_paper_structure_trains_one_step():
    p = paper()
    # a concrete training step of the paper's structure (30 blocks, 8 control blocks,
    # K = 7, 3 history latents, 18 target latents) at reduced width
    narrow = dataclasses.replace(p, dim=48, num_heads=2, mlp_hidden=96, freq_dim=32)
    model = M.VideoDiT(narrow, rngs=nnx.Rngs(0))
    r = np.random.default_rng(0)
    shapes = dict(frames=18, prev=3, refs=7, proj=21, hole=21)
    batch = {k: r.random((1, f, 4, 4, 48)).astype(np.float32) for k, f in shapes.items()}
    batch["instruction"] = np.array([5], np.int32)
    tx = optax.adamw(1e-4)
    graphdef, state = ctrain.create_train_state(model, tx, 0, trainable=M.CONTROL_PARAMS)
    step = ctrain.make_train_step(graphdef, flow.loss_fn, tx)
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
