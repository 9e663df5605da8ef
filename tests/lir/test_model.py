"""Tiny LMM: no image leak through the bottleneck, latents are the only image route under it,
dropping latents equals deleting them, LoRA with B = 0 is the frozen model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lir.data import Layout, collate, drop_latents
from lir.masks import Role
from lir.model import (
    LIVR_FILTER,
    LMM,
    LoRAConfig,
    ModelConfig,
    add_lora,
    answer_latent_attention,
    answer_logits,
    answer_loss,
    attention_probs,
    query_image_attention,
)
from lir.tasks import generate

CFG = ModelConfig(
    image_size=32,
    patch_size=16,
    vit_dim=16,
    vit_depth=1,
    vit_heads=2,
    lm_dim=32,
    lm_depth=2,
    lm_heads=2,
    max_images=2,
    num_latents=4,
)


def layout(k):
    return Layout(n_images=2, image_size=32, patch_size=16, num_latents=k, max_latents=4)


@pytest.fixture(scope="module")
def setup():
    model = LMM(CFG, rngs=nnx.Rngs(0))
    # latents with a real scale so their effect is visible in the logits
    model.latents[...] = jax.random.normal(jax.random.key(1), model.latents.shape)
    graphdef, state = nnx.split(model)

    def fwd(state, batch, variant):
        return answer_logits(nnx.merge(graphdef, state)(batch, variant), batch)

    f = jax.jit(fwd, static_argnums=2)
    recs = generate("visual_correspondence", 2, 0, size=32) + generate("counting", 1, 0, size=32)
    b0, b4 = collate(recs, layout(0)), collate(recs, layout(4))
    noise = np.random.default_rng(0).integers(0, 256, b0.images.shape, dtype=np.uint8)
    return dict(model=model, state=state, f=f, b0=b0, b4=b4, noise=noise)


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_no_leak_under_bottleneck_without_latents(setup):
    f, st, b0 = setup["f"], setup["state"], setup["b0"]
    other = b0._replace(images=setup["noise"])
    # stage-1 mask, no latents: the image has no route to the answer query
    assert _diff(f(st, b0, "bottleneck"), f(st, other, "bottleneck")) < 1e-6
    # the normal mask does let the image reach the answer
    assert _diff(f(st, b0, "causal"), f(st, other, "causal")) > 1e-3


def test_latents_are_the_only_route_under_bottleneck(setup):
    f, st, b4 = setup["f"], setup["state"], setup["b4"]
    other = b4._replace(images=setup["noise"])
    assert _diff(f(st, b4, "bottleneck"), f(st, other, "bottleneck")) > 1e-3
    dropped, dropped_other = drop_latents(b4), drop_latents(other)
    assert _diff(f(st, dropped, "bottleneck"), f(st, dropped_other, "bottleneck")) < 1e-6


def test_dropping_latents_equals_deleting_them(setup):
    f, st = setup["f"], setup["state"]
    # same answer position id with and without latents, so deleting K latents (K=0 batch)
    # and masking them out (PAD) give the same answer logits
    with_lat = f(st, setup["b4"], "causal")
    dropped = f(st, drop_latents(setup["b4"]), "causal")
    deleted = f(st, setup["b0"], "causal")
    assert _diff(dropped, deleted) < 1e-5
    assert _diff(with_lat, deleted) > 1e-3  # the latents themselves do matter


def test_lora_zero_b_equals_frozen_model_and_only_in_lm(setup):
    b0 = setup["b0"]
    model = nnx.clone(setup["model"])
    paths = add_lora(model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(2))
    assert {p[-1] for p in paths} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
    }
    assert not jax.tree.leaves(nnx.state(model.vit, nnx.LoRAParam))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, b: answer_logits(nnx.merge(graphdef, s)(b, "causal"), b))
    base = setup["f"](setup["state"], b0, "causal")
    assert _diff(fwd(state, b0), base) < 1e-6
    # a nonzero B changes the output, so the comparison above can fail
    for blk in model.lm.blocks:
        blk.attn.q_proj.lora_b[...] = 0.5 * jnp.ones_like(blk.attn.q_proj.lora_b[...])
    assert _diff(fwd(nnx.state(model), b0), base) > 1e-4


def test_livr_gradients_reach_latents_and_lora_only(setup):
    model = nnx.clone(setup["model"])
    add_lora(model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(3))
    for blk in model.lm.blocks:  # nonzero B so that A receives gradient too
        blk.mlp.up_proj.lora_b[...] = 0.1 * jnp.ones_like(blk.mlp.up_proj.lora_b[...])
    graphdef, train, frozen = nnx.split(model, LIVR_FILTER, ...)
    b4 = setup["b4"]

    def loss(train):
        return answer_loss(nnx.merge(graphdef, train, frozen)(b4, "bottleneck"), b4)

    grads = jax.jit(jax.grad(loss))(train)
    flat = {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(grads)}
    assert any("latents" in k for k in flat)
    assert all("lora" in k or "latents" in k for k in flat)
    assert np.abs(flat["latents"]).sum() > 0
    assert all(np.abs(v).sum() > 0 for k, v in flat.items() if "up_proj/lora_a" in k)


def test_answer_latent_attention(setup):
    model, b4 = setup["model"], setup["b4"]
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, b: answer_latent_attention(nnx.merge(graphdef, s), b))
    mass = np.asarray(f(state, b4))
    assert mass.shape == (3,) and (mass > 0).all() and (mass < 1).all()
    assert np.allclose(np.asarray(f(state, drop_latents(b4))), 0.0)


def test_attention_probs_respect_the_bottleneck(setup):
    model, b4 = setup["model"], setup["b4"]
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, b: attention_probs(nnx.merge(graphdef, s), b, "bottleneck"))
    probs = f(state, b4)
    maps = np.asarray(query_image_attention(probs, b4, 2, CFG.tokens_per_image))
    roles = b4.roles
    t0 = int(b4.answer_index[0])
    # no mass from the TAIL / prompt queries to any image patch; latents do look at images
    assert np.abs(maps[:, t0]).max() == 0
    assert np.abs(maps[0][roles[0] == Role.PROMPT]).max() == 0
    lat_mass = maps[0][roles[0] == Role.LATENT].sum(axis=(1, 2))
    assert (lat_mass > 0).all() and (lat_mass <= 1 + 1e-5).all()
    # the counting record has no second image: nothing attends to its padded slot
    assert np.abs(maps[2, :, 1]).max() == 0


def test_answer_loss_reads_answer_targets_only(setup):
    b4 = setup["b4"]
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=b4.tokens.shape + (CFG.vocab_size,)), jnp.float32)
    base = float(answer_loss(logits, b4))
    # scrambling every non-answer-query position leaves the loss unchanged
    keep = np.asarray(b4.loss_mask, bool)[..., None]
    other = jnp.where(keep, logits, 100.0 * jnp.asarray(rng.normal(size=logits.shape)))
    assert abs(float(answer_loss(other, b4)) - base) < 1e-6
    # and it is the mean CE of the gold answer at the TAIL query
    a = np.asarray(answer_logits(logits, b4))
    ce = -(a[np.arange(3), b4.answer] - np.log(np.exp(a).sum(-1)))
    assert abs(base - ce.mean()) < 1e-5


def test_shared_latents_repeat_one_row():
    import dataclasses

    cfg = dataclasses.replace(CFG, shared_latents=True)
    model = LMM(cfg, rngs=nnx.Rngs(0))
    assert model.latents.shape == (1, CFG.lm_dim)
    recs = generate("counting", 1, 0, size=32)
    b = collate(
        recs, Layout(n_images=2, image_size=32, patch_size=16, num_latents=4, max_latents=4)
    )
    graphdef, state = nnx.split(model)
    x = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s).embed_inputs(b))(state, b))
    lat = x[0][b.roles[0] == Role.LATENT]
    assert lat.shape == (4, CFG.lm_dim) and np.allclose(lat, lat[0])
    np.testing.assert_allclose(lat[0], np.asarray(model.latents[...])[0])
