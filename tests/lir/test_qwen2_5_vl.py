"""Parity of the Flax Qwen2.5-VL port with the Hugging Face PyTorch reference on tiny random
configs (2 vision blocks, one of them full attention; 2 LM layers; two images of different
sizes): processor, vision tower, rope index, per-layer hidden states, logits, greedy decode,
and the safetensors loader under both tensor namings. float32, highest matmul precision."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lir.backbones.qwen2_5_vl import processor as proc  # noqa: E402
from lir.backbones.qwen2_5_vl.config import read_config  # noqa: E402
from lir.backbones.qwen2_5_vl.model import (  # noqa: E402
    causal_valid_mask,
    greedy_generate,
    image_slots,
)
from lir.backbones.qwen2_5_vl.weights import canonical_name, load_checkpoint  # noqa: E402

VOCAB, IMG, VID, VSTART, VEND, EOS = 200, 190, 191, 188, 189, 187
PCFG = proc.ProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 24)
# (height, width) of the two raw test images: resized to 84x140 and 56x56 by smart_resize
IMAGE_SIZES = ((80, 150), (50, 61))


def hf_config(tied: bool):
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=EOS,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=tied,
    )


def _scale_weights(model, seed: int) -> None:
    # The default init (std 0.02) makes every logit nearly equal; larger random weights give
    # decisive argmaxes, so greedy decoding is a meaningful comparison.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                name.endswith("norm.weight")
                or "layernorm" in name
                or "ln_q" in name
                or "norm1" in name
                or "norm2" in name
            ):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


def _prompt(grid_thw) -> np.ndarray:
    counts = proc.image_token_counts(grid_thw)
    ids = [1, 2, 3]
    for i, n in enumerate(counts):
        ids += [VSTART] + [IMG] * int(n) + [VEND] + [10 + i, 11 + i]
    ids += [20, 21, 22, 23]
    return np.asarray([ids], np.int64)


def _rename_to_resaved(src: pathlib.Path, dst: pathlib.Path) -> None:
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        elif k.startswith("visual."):
            k = "model.visual." + k[len("visual.") :]
        renamed[k] = v
    # two shards plus an index, as the hub stores large checkpoints
    keys = sorted(renamed)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for fname, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, str(dst / fname))
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    tied = request.param
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(tied)).eval()
    _scale_weights(hf, seed=1 if tied else 2)
    root = tmp_path_factory.mktemp("qwen_tied" if tied else "qwen_untied")
    hf.save_pretrained(root / "hub")
    _rename_to_resaved(root / "hub", root / "resaved")
    ours = load_checkpoint(root / "hub", dtype=jnp.float32)
    return hf, ours, root


@pytest.fixture(scope="module")
def inputs():
    patches, grid = proc.preprocess_images(_images(), PCFG)
    ids = _prompt(grid)
    return patches, grid, ids


def _hf_forward(hf, patches, grid, ids):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(patches),
            image_grid_thw=torch.tensor(grid),
            mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
            output_hidden_states=True,
        )
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_processor_matches_reference():
    ref = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
        min_pixels=PCFG.min_pixels, max_pixels=PCFG.max_pixels
    )
    images = _images()
    want = ref(images=images, return_tensors="np")
    patches, grid = proc.preprocess_images(images, PCFG)
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    assert grid.tolist() == [[1, 6, 10], [1, 4, 4]]
    np.testing.assert_allclose(patches, want["pixel_values"], atol=1e-5)
    for h, w in ((1000, 37), (5000, 3000), (28, 28), (10, 10)):
        got = proc.smart_resize(h, w, 28, 3136, 1003520)
        assert got == transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize(
            h, w, 28, 3136, 1003520
        )


def test_rope_index_matches_reference(pair, inputs):
    hf, _, _ = pair
    _, grid, ids = inputs
    # a padded batch of two rows: the prompt, and the prompt's text tail (no image)
    batch = np.zeros((2, ids.shape[1]), np.int64)
    valid = np.zeros_like(batch, bool)
    batch[0], valid[0] = ids[0], True
    tail = ids[0, -6:]
    batch[1, :6], valid[1, :6] = tail, True
    want_pos, want_delta = hf.model.get_rope_index(
        torch.tensor(batch),
        mm_token_type_ids=torch.tensor((batch == IMG).astype(np.int64)),
        image_grid_thw=torch.tensor(grid),
        attention_mask=torch.tensor(valid.astype(np.int64)),
    )
    pos, delta = proc.rope_index(batch, grid, IMG, valid)
    np.testing.assert_array_equal(pos[:, valid], want_pos.numpy()[:, valid])
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])


def test_vision_tower_matches_reference(pair, inputs):
    hf, ours, _ = pair
    patches, grid, _ = inputs
    with torch.no_grad():
        want = hf.model.visual(torch.tensor(patches), grid_thw=torch.tensor(grid)).pooler_output
    layout = proc.vision_layout(grid, ours.cfg.vision).arrays()
    got = ours.visual(jnp.asarray(patches), layout)
    assert got.shape == (int(proc.image_token_counts(grid).sum()), 64)
    assert _rel(got, want.numpy()) <= 1e-4
    # padding the packed patches (one compiled tower for several sizes) changes nothing
    n = patches.shape[0]
    padded = np.concatenate([patches, np.ones((8, patches.shape[1]), np.float32)])
    layout_p = proc.vision_layout(grid, ours.cfg.vision, n_padded=n + 8).arrays()
    got_p = ours.visual(jnp.asarray(padded), layout_p)[: n // 4]
    assert _rel(got_p, want.numpy()) <= 1e-4


def test_hidden_states_and_logits_match_reference(pair, inputs):
    hf, ours, _ = pair
    patches, grid, ids = inputs
    out = _hf_forward(hf, patches, grid, ids)
    pos, _ = proc.rope_index(ids, grid, IMG)
    layout = proc.vision_layout(grid, ours.cfg.vision).arrays()
    mask = causal_valid_mask(jnp.ones(ids.shape, bool))
    logits, hidden = ours(
        ids, pos, mask, image_slots(ids, IMG), patches, layout, return_hidden=True
    )
    assert len(hidden) == len(out.hidden_states) == 3
    for got, want in zip(hidden, out.hidden_states, strict=True):
        assert _rel(got, want.numpy()) <= 1e-4
    assert _rel(logits, out.logits.numpy()) <= 1e-4
    tied = ours.cfg.text.tie_word_embeddings
    assert (ours.language.lm_head is None) == tied


def test_resaved_naming_loads_identically(pair):
    _, ours, root = pair
    other = load_checkpoint(root / "resaved", dtype=jnp.float32)
    a = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree.leaves(ours)))
    b = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree.leaves(other)))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (
        canonical_name("model.language_model.layers.0.mlp.up_proj.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )


def test_greedy_decode_matches_generate(pair, inputs):
    hf, ours, _ = pair
    patches, grid, ids = inputs
    new = 6
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(patches),
            image_grid_thw=torch.tensor(grid),
            mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] :].numpy()
    pos, delta = proc.rope_index(ids, grid, IMG)
    layout = proc.vision_layout(grid, ours.cfg.vision).arrays()
    embeds = ours.embed(ids, image_slots(ids, IMG), patches, layout)
    got = greedy_generate(
        ours,
        embeds,
        jnp.asarray(pos),
        jnp.asarray(delta),
        jnp.ones(ids.shape, bool),
        new,
        eos_token_id=-1,
    )
    np.testing.assert_array_equal(np.asarray(got)[0], want)
    # a right-padded batch decodes each row as if alone
    pad = 3
    ids_p = np.concatenate([ids, np.zeros((1, pad), np.int64)], 1)
    valid = np.concatenate([np.ones(ids.shape, bool), np.zeros((1, pad), bool)], 1)
    pos_p, delta_p = proc.rope_index(ids_p, grid, IMG, valid)
    embeds_p = ours.embed(ids_p, image_slots(ids_p, IMG), patches, layout)
    got_p = greedy_generate(
        ours,
        embeds_p,
        jnp.asarray(pos_p),
        jnp.asarray(delta_p),
        jnp.asarray(valid),
        new,
        eos_token_id=-1,
    )
    np.testing.assert_array_equal(np.asarray(got_p)[0], want)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path / "ck")


def _dense_segment_attention(q, k, v, segments):
    """The dense-mask reference: [N, N] mask, float64 softmax over all keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    mask = segments[:, None] == segments[None, :]
    logits = np.where(mask[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_segment_attention_equals_the_dense_mask(impl, monkeypatch):
    from common.nn import attention as attn_mod
    from lir.backbones.qwen2_5_vl.config import VisionConfig
    from lir.backbones.qwen2_5_vl.vision import segment_attention

    monkeypatch.setattr(attn_mod, "DEFAULT_IMPLEMENTATION", impl)
    cfg = VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=64,
        window_size=56,
        fullatt_block_indexes=(1,),
    )
    # two images of 5x7 and 7x3 merged tokens: 2x2-merged-token windows (16 patches), with
    # partial windows at the right / bottom edges; 24 padded patches at the end
    grid = np.asarray([[1, 10, 14], [1, 14, 6]])
    n = int(grid.prod(-1).sum())
    layout = proc.vision_layout(grid, cfg, n_padded=n + 24)
    win, img = layout.window_segments, layout.image_segments
    w = (cfg.window_size // cfg.patch_size) ** 2
    runs = np.split(win[:n], np.nonzero(np.diff(win[:n]))[0] + 1)
    starts = np.cumsum([0] + [len(r) for r in runs[:-1]])
    assert len(runs) == 3 * 4 + 4 * 2 and max(map(len, runs)) == w
    assert any(s // w != (s + len(r) - 1) // w for s, r in zip(starts, runs, strict=True)), (
        "some window must straddle a block boundary"
    )
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(n + 24, 2, 16)).astype(np.float32) for _ in range(3))
    with jax.default_matmul_precision("highest"):
        got_w = np.asarray(segment_attention(q, k, v, win, max_run=w))
        got_i = np.asarray(segment_attention(q, k, v, img, max_run=None, query_chunk=40))
    np.testing.assert_allclose(
        got_w[:n], _dense_segment_attention(q, k, v, win)[:n], rtol=1e-5, atol=1e-5
    )
    assert np.isfinite(got_w).all()
    # full attention: 2 images + the padding segment, query chunks of 40 (the last one filled)
    np.testing.assert_allclose(got_i, _dense_segment_attention(q, k, v, img), rtol=1e-5, atol=1e-5)
