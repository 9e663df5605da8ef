"""LIVR on the Qwen2.5-VL port (tiny random model, no torch needed): the Stage-1 bottleneck
mask without latents makes answers independent of the pixels, LoRA with B = 0 is the base
model, latents stay out of the output vocabulary, and the two-stage schedule trains only
LoRA (+ latents) with bf16 frozen weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.nn import LoRALinear
from lir.backbones.qwen2_5_vl import processor as proc
from lir.backbones.qwen2_5_vl.config import QwenVLConfig, TextConfig, VisionConfig
from lir.backbones.qwen2_5_vl.livr import (
    QwenLIVR,
    add_lora,
    encode_example,
    generate,
    loss_fn,
    make_batch,
)
from lir.backbones.qwen2_5_vl.model import QwenVL
from lir.backbones.qwen2_5_vl.sharding import fsdp_sharding, fsdp_spec, shard_state
from lir.backbones.qwen2_5_vl.trainer import finetune, method_stages
from lir.config import FinetuneConfig
from lir.masks import Role
from lir.model import LIVR_FILTER, LORA_FILTER, LoRAConfig

CFG = QwenVLConfig(
    vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                        window_size=56, out_hidden_size=64, fullatt_block_indexes=(1,)),
    text=TextConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3),
                    tie_word_embeddings=True),
    image_token_id=190, video_token_id=191, vision_start_token_id=188,
    vision_end_token_id=189, eos_token_id=187)
PCFG = proc.ProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 8)
LATENT_ID = 186
SEQ = 160


def byte_encode(text: str) -> list[int]:
    return [3 + b % 150 for b in text.encode()]


def _batch(seed: int, num_latents: int, answer: str | None = "A"):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (56, 84, 3), np.uint8), rng.integers(0, 256, (56, 56, 3),
                                                                        np.uint8)]
    patches, grid = proc.preprocess_images(images, PCFG)
    ex = encode_example(byte_encode, "Which? (A) x (B) y", proc.image_token_counts(grid),
                        answer, num_latents, vision_start=188, vision_end=189, image_pad=190,
                        latent_token_id=LATENT_ID)
    return make_batch([ex], patches, grid, CFG, SEQ, n_patches=64)


@pytest.fixture(scope="module")
def base():
    return QwenVL(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
    @nnx.jit(static_argnums=(2,))
    def fn(model, batch, variant):
        return model(batch, variant)
    return fn


def _rows(batch, roles):
    return np.isin(np.asarray(batch.roles[0]), [int(r) for r in roles])


def test_sequence_roles_follow_the_chat_template():
    b = _batch(0, 4)
    roles = np.asarray(b.roles[0])
    ids = np.asarray(b.input_ids[0])
    # vision start/end markers count as image tokens (spec §1.3 pitfall (i))
    assert set(roles[np.isin(ids, [188, 189])]) == {int(Role.IMAGE)}
    assert (roles[ids == LATENT_ID] == Role.LATENT).sum() == 4
    order = [r for i, r in enumerate(roles) if i == 0 or r != roles[i - 1]]
    assert order == [Role.SYSTEM, Role.IMAGE, Role.PROMPT, Role.LATENT, Role.TAIL,
                     Role.ANSWER, Role.PAD]
    # loss only where the next token is an answer token
    np.testing.assert_array_equal(np.nonzero(b.loss_mask[0])[0] + 1,
                                  np.nonzero(roles == Role.ANSWER)[0])


def test_bottleneck_without_latents_hides_the_pixels(base, forward):
    model = QwenLIVR(base, 0, key=jax.random.key(0))
    a, b = _batch(0, 0), _batch(1, 0)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert not np.allclose(a.patches, b.patches)
    after = _rows(a, [Role.PROMPT, Role.TAIL, Role.ANSWER])
    la, lb = forward(model, a, "bottleneck"), forward(model, b, "bottleneck")
    np.testing.assert_array_equal(np.asarray(la)[0, after], np.asarray(lb)[0, after])
    # the same rows do see the pixels under the causal mask
    ca, cb = forward(model, a, "causal"), forward(model, b, "causal")
    assert np.abs(np.asarray(ca)[0, after] - np.asarray(cb)[0, after]).max() > 1e-3


def test_latents_carry_the_image_under_the_bottleneck(base, forward):
    model = QwenLIVR(base, 4, key=jax.random.key(0))
    a, b = _batch(0, 4), _batch(1, 4)
    tail = _rows(a, [Role.TAIL, Role.ANSWER])
    prompt = _rows(a, [Role.PROMPT])
    la, lb = (np.asarray(forward(model, x, "bottleneck"))[0] for x in (a, b))
    np.testing.assert_array_equal(la[prompt], lb[prompt])
    assert np.abs(la[tail] - lb[tail]).max() > 1e-3


def test_latents_are_not_in_the_output_vocabulary(base, forward):
    model = QwenLIVR(base, 4, key=jax.random.key(0))
    batch = _batch(0, 4)
    logits = forward(model, batch, "causal")
    assert logits.shape == (1, SEQ, CFG.text.vocab_size)
    # new latent values change nothing before the latents and add no output row
    other = QwenLIVR(base, 4, key=jax.random.key(5))
    before = np.asarray(batch.roles[0]) != Role.LATENT
    before[np.argmax(np.asarray(batch.roles[0]) == Role.LATENT):] = False
    np.testing.assert_array_equal(np.asarray(logits)[0, before],
                                  np.asarray(forward(other, batch, "causal"))[0, before])
    assert not np.allclose(model.latents[...], other.latents[...])


def test_latent_init_matches_embedding_statistics(base):
    model = QwenLIVR(base, 512, key=jax.random.key(1))
    emb = np.asarray(base.language.embed_tokens.embedding[...])
    lat = np.asarray(model.latents[...])
    assert lat.dtype == np.float32
    np.testing.assert_allclose(lat.mean(0), emb.mean(0), atol=4 * emb.std(0).max() / 512**0.5)
    np.testing.assert_allclose(lat.std(0).mean(), emb.std(0).mean(), rtol=0.1)


def test_lora_with_zero_b_is_the_base_model(forward):
    model = QwenLIVR(QwenVL(CFG, rngs=nnx.Rngs(0)), 4, key=jax.random.key(0))
    batch = _batch(0, 4)
    before = np.asarray(forward(model, batch, "causal"))
    paths = add_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(1))
    assert len(paths) == 7 * CFG.text.num_layers
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model.base.visual))
    np.testing.assert_array_equal(np.asarray(forward(model, batch, "causal")), before)
    lin = model.base.language.layers[0].mlp.up_proj
    lin.lora_b[...] = jnp.ones_like(lin.lora_b[...])
    assert np.abs(np.asarray(forward(model, batch, "causal")) - before).max() > 1e-4


def _trainable_leaves(model, kind):
    return jax.tree.map(np.asarray, nnx.state(model, kind))


def test_method_stages():
    ft = FinetuneConfig()
    stages, filt = method_stages("livr", ft)
    assert [(s.mask_variant, s.epochs) for s in stages] == [("bottleneck", 4), ("causal", 6)]
    assert filt is LIVR_FILTER
    stages, filt = method_stages("sft", ft)
    assert [(s.mask_variant, s.epochs) for s in stages] == [("causal", 10)]
    assert filt is LORA_FILTER
    with pytest.raises(ValueError, match="method"):
        method_stages("mirage", ft)


def test_two_stage_schedule_trains_only_lora_and_latents():
    method = "livr"
    base = QwenVL(CFG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    k = 4
    model = QwenLIVR(base, k, key=jax.random.key(0))
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.05),
             rngs=nnx.Rngs(params=1, dropout=2))
    lora = nnx.state(model, nnx.LoRAParam)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
    frozen0 = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param,
                                                                nnx.Not(nnx.LoRAParam))))
    latents0 = np.asarray(model.latents[...])
    batches = [_batch(0, k, answer="B")]
    ft = FinetuneConfig(learning_rate=3e-2, sft_epochs=4, stage1_epochs=2, stage2_epochs=2,
                        batch_size=1, warmup_fraction=0.0)
    seen = []
    hist = finetune(model, method, ft, batches, seed=0,
                    on_epoch=lambda m, s, e: seen.append((s, e)) or float(e))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    losses = hist["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert hist["best_epoch"] == 1
    trained = hist["model"]
    frozen1 = jax.tree.map(np.asarray, nnx.state(trained, nnx.All(nnx.Param,
                                                                  nnx.Not(nnx.LoRAParam))))
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1), strict=True)]
    # only the latent table may move among the non-LoRA parameters
    assert sum(changed) == 1
    assert not np.allclose(np.asarray(trained.latents[...]), latents0)
    assert base.language.layers[0].mlp.up_proj.base.kernel[...].dtype == jnp.bfloat16


def test_generate_with_latents_is_greedy_on_the_full_forward(base, forward):
    """Cached greedy decoding with the latents spliced in picks, at each step, a maximiser of
    the full causal forward's logits over the prompt plus the tokens generated so far."""
    model = QwenLIVR(base, 4, key=jax.random.key(0))
    batch = _batch(0, 4, answer=None)
    steps = 3
    out = np.asarray(generate(model, batch, steps, CFG.eos_token_id))
    assert out.shape == (1, steps)
    # teacher-force the generated tokens as the answer: text positions continue after the
    # prompt (ids n + j + rope_delta, as in decoding)
    n = int(np.sum(np.asarray(batch.roles[0]) != Role.PAD))
    ids, roles = np.array(batch.input_ids), np.array(batch.roles)
    positions = np.array(batch.positions)
    ids[0, n:n + steps], roles[0, n:n + steps] = out[0], int(Role.ANSWER)
    positions[:, 0, n:n + steps] = n + np.arange(steps) + int(batch.rope_delta[0])
    forced = dataclasses.replace(batch, input_ids=ids, roles=roles, positions=positions)
    logits = np.asarray(forward(model, forced, "causal"))[0]
    for j, tok in enumerate(out[0]):
        row = logits[n - 1 + j]
        assert row[tok] >= row.max() - 1e-4, (j, tok, int(row.argmax()))
        if tok == CFG.eos_token_id:  # after EOS a row repeats it without a forward
            break


def test_fsdp_spec_splits_the_largest_divisible_axis():
    assert fsdp_spec((151936, 2048), 8) == jax.sharding.PartitionSpec(("data", "model"), None)
    assert fsdp_spec((2048, 11008), 8) == jax.sharding.PartitionSpec(None, ("data", "model"))
    assert fsdp_spec((1177, 1279), 8) == jax.sharding.PartitionSpec()
    assert fsdp_spec((64,), 8) == jax.sharding.PartitionSpec()
    place = fsdp_sharding()
    s = place(("language", "embed_tokens", "embedding"), (200, 64))
    assert s.mesh.devices.size == jax.device_count()
    state = shard_state(nnx.state(QwenVL(dataclasses.replace(CFG), rngs=nnx.Rngs(0))),
                        s.mesh)
    assert len(jax.tree.leaves(state)) > 0


def test_remat_gives_the_same_loss_and_gradients():
    batch = _batch(0, 4)

    def loss_and_grad(remat):
        cfg = dataclasses.replace(CFG, remat=remat)
        model = QwenLIVR(QwenVL(cfg, rngs=nnx.Rngs(0)), 4, key=jax.random.key(0))
        add_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
        lin = model.base.language.layers[1].self_attn.q_proj
        lin.lora_b.set_value(jnp.full(lin.lora_b.shape, 0.1, jnp.float32))
        graphdef, params, rest = nnx.split(model, LIVR_FILTER, ...)

        @jax.jit
        def f(p):
            return loss_fn("bottleneck")(nnx.merge(graphdef, p, rest), batch, None)[0]

        return jax.value_and_grad(f)(params)

    (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_lora_and_parameter_counts_match_the_published_sizes():
    from lir.backbones.qwen2_5_vl.config import qwen2_5_vl_3b, qwen2_5_vl_7b
    from lir.backbones.qwen2_5_vl.memory import lora_parameters, parameter_counts

    # spec §1.6: r = 16 on all 7 projections of every LM layer
    assert round(lora_parameters(qwen2_5_vl_3b()) / 1e6, 2) == 29.93
    assert round(lora_parameters(qwen2_5_vl_7b()) / 1e6, 2) == 40.37
    model = QwenLIVR(QwenVL(CFG, rngs=nnx.Rngs(0)), 0, key=jax.random.key(0))
    add_lora(model, LoRAConfig(rank=16, alpha=32.0), rngs=nnx.Rngs(1))
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert n_lora == lora_parameters(CFG, 16)
    counts = parameter_counts(CFG)
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(QwenVL(CFG, rngs=nnx.Rngs(0)),
                                                           nnx.Param)))
    assert counts["total"] == n_base
