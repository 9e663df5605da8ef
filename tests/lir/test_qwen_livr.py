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
from common.train import OptimizerConfig
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
    vision=VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        window_size=56,
        out_hidden_size=64,
        fullatt_block_indexes=(1,),
    ),
    text=TextConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(2, 3, 3),
        tie_word_embeddings=True,
    ),
    image_token_id=190,
    video_token_id=191,
    vision_start_token_id=188,
    vision_end_token_id=189,
    eos_token_id=187,
)
PCFG = proc.ProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 8)
LATENT_ID = 186
SEQ = 160


def byte_encode(text: str) -> list[int]:
    return [3 + b % 150 for b in text.encode()]


def _batch(seed: int, num_latents: int, answer: str | None = "A"):
    rng = np.random.default_rng(seed)
    images = [
        rng.integers(0, 256, (56, 84, 3), np.uint8),
        rng.integers(0, 256, (56, 56, 3), np.uint8),
    ]
    patches, grid = proc.preprocess_images(images, PCFG)
    ex = encode_example(
        byte_encode,
        "Which? (A) x (B) y",
        proc.image_token_counts(grid),
        answer,
        num_latents,
        vision_start=188,
        vision_end=189,
        image_pad=190,
        latent_token_id=LATENT_ID,
    )
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
    # vision start/end markers count as image tokens (docs/lir.md D4)
    assert set(roles[np.isin(ids, [188, 189])]) == {int(Role.IMAGE)}
    assert (roles[ids == LATENT_ID] == Role.LATENT).sum() == 4
    order = [r for i, r in enumerate(roles) if i == 0 or r != roles[i - 1]]
    assert order == [
        Role.SYSTEM,
        Role.IMAGE,
        Role.PROMPT,
        Role.LATENT,
        Role.TAIL,
        Role.ANSWER,
        Role.PAD,
    ]
    # loss only where the next token is an answer token
    np.testing.assert_array_equal(
        np.nonzero(b.loss_mask[0])[0] + 1, np.nonzero(roles == Role.ANSWER)[0]
    )


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
    before[np.argmax(np.asarray(batch.roles[0]) == Role.LATENT) :] = False
    np.testing.assert_array_equal(
        np.asarray(logits)[0, before], np.asarray(forward(other, batch, "causal"))[0, before]
    )
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
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.05), rngs=nnx.Rngs(params=1, dropout=2))
    lora = nnx.state(model, nnx.LoRAParam)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
    frozen0 = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    latents0 = np.asarray(model.latents[...])
    batches = [_batch(0, k, answer="B")]
    ft = FinetuneConfig(
        optim=OptimizerConfig(learning_rate=3e-2, weight_decay=0.01),
        sft_epochs=4,
        stage1_epochs=2,
        stage2_epochs=2,
        batch_size=1,
        warmup_fraction=0.0,
    )
    seen = []
    hist = finetune(
        model, method, ft, batches, seed=0, on_epoch=lambda m, s, e: seen.append((s, e)) or float(e)
    )
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    losses = hist["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert hist["best_epoch"] == 1
    trained = hist["model"]
    frozen1 = jax.tree.map(
        np.asarray, nnx.state(trained, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    )
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1), strict=True)
    ]
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
    ids[0, n : n + steps], roles[0, n : n + steps] = out[0], int(Role.ANSWER)
    positions[:, 0, n : n + steps] = n + np.arange(steps) + int(batch.rope_delta[0])
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
    state = shard_state(nnx.state(QwenVL(dataclasses.replace(CFG), rngs=nnx.Rngs(0))), s.mesh)
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

    # LIVR App. B: r = 16 on all 7 projections of every LM layer
    assert round(lora_parameters(qwen2_5_vl_3b()) / 1e6, 2) == 29.93
    assert round(lora_parameters(qwen2_5_vl_7b()) / 1e6, 2) == 40.37
    model = QwenLIVR(QwenVL(CFG, rngs=nnx.Rngs(0)), 0, key=jax.random.key(0))
    add_lora(model, LoRAConfig(rank=16, alpha=32.0), rngs=nnx.Rngs(1))
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert n_lora == lora_parameters(CFG, 16)
    counts = parameter_counts(CFG)
    n_base = sum(
        x.size for x in jax.tree.leaves(nnx.state(QwenVL(CFG, rngs=nnx.Rngs(0)), nnx.Param))
    )
    assert counts["total"] == n_base


def _two_row_batch(num_latents: int, answers=("B", "A) xyz")):
    """Two examples with answers of different lengths, packed into one batch."""
    rng = np.random.default_rng(3)
    exs, patches, grids = [], [], []
    for i, ans in enumerate(answers):
        images = [rng.integers(0, 256, (56, 56 + 28 * i, 3), np.uint8)]
        p, g = proc.preprocess_images(images, PCFG)
        exs.append(
            encode_example(
                byte_encode,
                f"Q{i}? (A) x (B) y",
                proc.image_token_counts(g),
                ans,
                num_latents,
                vision_start=188,
                vision_end=189,
                image_pad=190,
                latent_token_id=LATENT_ID,
            )
        )
        patches.append(p)
        grids.append(g)
    return exs, np.concatenate(patches), np.concatenate(grids)


def test_answer_only_loss_equals_the_full_logits_loss():
    from lir.backbones.qwen2_5_vl.livr import answer_only_loss, answer_positions
    from lir.model import answer_loss

    model = QwenLIVR(QwenVL(CFG, rngs=nnx.Rngs(0)), 4, key=jax.random.key(0))
    add_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    lin = model.base.language.layers[1].mlp.up_proj
    lin.lora_b.set_value(jnp.full(lin.lora_b.shape, 0.05, jnp.float32))
    exs, patches, grid = _two_row_batch(4)
    batch = make_batch(exs, patches, grid, CFG, SEQ, n_patches=64)
    n_ans = answer_positions(batch.loss_mask)
    # byte tokens: the answer text and the spelled-out <|im_end|>
    assert n_ans == len("A) xyz<|im_end|>") and batch.loss_mask[0].sum() < n_ans
    with jax.default_matmul_precision("highest"):
        want = answer_loss(model(batch, "causal"), batch)
        hidden = model.hidden(batch, "causal")
        for a in (n_ans, n_ans + 5):  # exact bound, and extra (masked) slots
            got = answer_only_loss(
                hidden, model.base.language.logits, batch.targets, batch.loss_mask, a
            )
            np.testing.assert_allclose(got, want, rtol=1e-5)
        # too small a bound drops the later answer tokens of the longer row
        short = answer_only_loss(
            hidden, model.base.language.logits, batch.targets, batch.loss_mask, n_ans - 2
        )
        assert abs(float(short) - float(want)) > 1e-4

        # through loss_fn: the same value and the same gradients for LoRA and latents
        graphdef, params, rest = nnx.split(model, LIVR_FILTER, ...)

        def value_and_grad(max_answer_tokens):
            f = lambda p: loss_fn("bottleneck", max_answer_tokens)(
                nnx.merge(graphdef, p, rest), batch, None
            )[0]
            return jax.value_and_grad(f)(params)

        (l0, g0), (l1, g1) = value_and_grad(None), value_and_grad(n_ans)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("where,dtype", [("memory", jnp.float32), ("disk", jnp.bfloat16)])
def test_feature_cache_computes_each_example_once(where, dtype, tmp_path):
    from lir.backbones.qwen2_5_vl.features import (
        VisionFeatureCache,
        example_key,
        vision_fingerprint,
    )
    from lir.backbones.qwen2_5_vl.livr import make_feature_batch

    base = QwenVL(CFG, param_dtype=dtype, rngs=nnx.Rngs(0))
    directory = tmp_path / "cache" if where == "disk" else None
    cache = VisionFeatureCache(base.visual, PCFG, directory, pad_multiple=64)
    exs, patches, grid = _two_row_batch(0)
    split = np.cumsum([int(g.prod()) for g in grid])[:-1]
    per_example = list(zip(np.split(patches, split), grid[:, None], strict=True))
    loads = []
    paths = [tmp_path / "img0.bin", tmp_path / "img1.bin"]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]))
    keys = [example_key(f"ex{i}", [paths[i]]) for i in range(2)]
    assert keys[0] != keys[1]
    # a changed image file gives a new key
    paths[1].write_bytes(b"changed!")
    assert example_key("ex1", [paths[1]]) != keys[1]

    def loader(i):
        return lambda: loads.append(i) or per_example[i]

    got = [cache.get(k, loader(i)) for i, k in enumerate(keys)]
    again = [cache.get(k, loader(i)) for i, k in enumerate(keys)]
    assert cache.calls == 2 and loads == [0, 1]
    for i, ((f, g), (f2, g2)) in enumerate(zip(got, again, strict=True)):
        p, gr = per_example[i]
        direct = base.visual(jnp.asarray(p, dtype), proc.vision_layout(gr, CFG.vision).arrays())
        assert f.dtype == direct.dtype and f.shape == direct.shape
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(
            np.asarray(f, np.float32), np.asarray(direct, np.float32), rtol=tol, atol=tol
        )
        np.testing.assert_array_equal(g, gr)
        np.testing.assert_array_equal(g2, gr)
        np.testing.assert_array_equal(np.asarray(f2, np.float32), np.asarray(f, np.float32))
    if where == "disk":
        # a new cache on the same directory (a later run) serves the entries without the tower
        fresh = VisionFeatureCache(base.visual, PCFG, tmp_path / "cache", pad_multiple=64)
        assert fresh.fingerprint == cache.fingerprint
        for k, (f, _) in zip(keys, got, strict=True):
            assert fresh.ensure(k, lambda: pytest.fail("recomputed")) is not None
            f3, _ = fresh.get(k)
            assert f3.dtype == f.dtype
            np.testing.assert_array_equal(np.asarray(f3, np.float32), np.asarray(f, np.float32))
        assert fresh.calls == 0
        # other vision weights: another fingerprint, so no stale entries are served
        other = QwenVL(CFG, param_dtype=dtype, rngs=nnx.Rngs(1))
        assert vision_fingerprint(other.visual, PCFG) != cache.fingerprint

    if dtype == jnp.float32:
        # a batch of cached features gives the logits of the batch of raw patches
        model = QwenLIVR(base, 0, key=jax.random.key(0))
        feats = np.concatenate([f for f, _ in got])
        fb = make_feature_batch(exs, feats, grid, CFG, SEQ, n_tokens=feats.shape[0] + 4)
        pb = make_batch(exs, patches, grid, CFG, SEQ, n_patches=patches.shape[0] + 16)
        with jax.default_matmul_precision("highest"):
            np.testing.assert_allclose(
                model(fb, "causal"), model(pb, "causal"), rtol=1e-5, atol=1e-5
            )
        with pytest.raises(ValueError, match="image tokens"):
            make_feature_batch(exs, feats[:-1], grid, CFG, SEQ)


def test_qwen_paper_preset_is_batch_1_times_accumulation_8():
    from common.config import get_preset
    from lir.config import PRESETS
    from lir.finetune_cli import backbone_config

    ft = backbone_config("qwen2_5_vl", "paper", []).finetune
    assert (ft.batch_size, ft.accumulation_steps) == (1, 8)
    assert ft.optim.learning_rate == 1e-4 and ft.num_latents == 16
    # the tiny-model paper preset keeps its 8 x 1 split
    base = get_preset(PRESETS, "paper").finetune
    assert (base.batch_size, base.accumulation_steps) == (8, 1)
    # setting either field replaces the split as a whole
    ft = backbone_config("qwen2_5_vl", "paper", ["finetune.batch_size=3"]).finetune
    assert (ft.batch_size, ft.accumulation_steps) == (3, 1)
    ft = backbone_config("qwen2_5_vl", "paper", ["finetune.accumulation_steps=4"]).finetune
    assert (ft.batch_size, ft.accumulation_steps) == (8, 4)
    assert (
        backbone_config("qwen2_5_vl", "tiny", []).finetune == get_preset(PRESETS, "tiny").finetune
    )
