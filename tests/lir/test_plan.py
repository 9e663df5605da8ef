"""``python -m lir plan``: every training stage of a preset is lowered and compiled from
abstract shapes; the rows count the real models' parameters and positive FLOPs."""

import json

import jax
import numpy as np
from flax import nnx

from lir.__main__ import main
from lir.config import PRESETS, model_config
from lir.model import LIVR_FILTER, LMM, LORA_FILTER, PRETRAIN_FILTER, add_lora
from lir.plan import divisible_batch, param_count
from lir.train import _pretrain_model

# the tiny preset, shrunk so that the four compiles stay fast
SHRINK = [
    "model.patch_size=16",
    "model.vit_dim=16",
    "model.vit_depth=1",
    "model.vit_heads=2",
    "model.lm_dim=32",
    "model.lm_depth=1",
    "model.lm_heads=2",
]


def _count(model, filt) -> int:
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, filt))))


def test_plan_verb_rows_match_the_real_models(tmp_path, capsys):
    argv = ["plan", "--preset", "tiny", "--devices", "1", "--out", str(tmp_path), "--models", "lmm"]
    for s in SHRINK:
        argv += ["--set", s]
    assert main(argv) == 0
    plan = json.loads((tmp_path / "lir_1dev.json").read_text())
    rows = {r["stage"].split(" (")[0]: r for r in plan["rows"]}
    assert list(rows) == [
        "phase P: pretrain",
        "phase F: LIVR stage 1",
        "phase F: LIVR stage 2",
        "phase F: SFT",
    ]
    assert (tmp_path / "lir_1dev.md").exists() and plan["preset"] == "tiny"

    from common.config import get_preset, override

    cfg = override(get_preset(PRESETS, "tiny"), SHRINK)
    pre = _pretrain_model(cfg)
    ft = LMM(model_config(cfg), rngs=nnx.Rngs(0))
    add_lora(ft, cfg.finetune.lora, rngs=nnx.Rngs(1))
    assert rows["phase P: pretrain"]["params"] == param_count(pre)
    assert rows["phase P: pretrain"]["trainable"] == _count(pre, PRETRAIN_FILTER)
    for stage, filt in (
        ("phase F: LIVR stage 1", LIVR_FILTER),
        ("phase F: LIVR stage 2", LIVR_FILTER),
        ("phase F: SFT", LORA_FILTER),
    ):
        assert rows[stage]["params"] == param_count(ft), stage
        assert rows[stage]["trainable"] == _count(ft, filt), stage
    spe = cfg.data.n_train // cfg.finetune.batch_size
    assert rows["phase F: LIVR stage 1"]["steps"] == cfg.finetune.stage1_epochs * spe
    assert rows["phase P: pretrain"]["steps"] == cfg.pretrain.optim.total_steps
    for r in plan["rows"]:
        assert r["flops_per_device"] > 0 and r["fits"], r["stage"]
    # a larger batch costs more: phase P's 32 sequences vs phase F's 8 at similar length
    assert rows["phase P: pretrain"]["flops_per_device"] > rows["phase F: SFT"]["flops_per_device"]


def test_divisible_batch():
    assert divisible_batch(32, 8) == (32, "")
    assert divisible_batch(8, 3)[0] == 9 and "not divisible by 3" in divisible_batch(8, 3)[1]
    assert divisible_batch(13, 8)[0] == 16 and divisible_batch(11, 8)[0] == 8
    assert divisible_batch(1, 8)[0] == 8


def test_qwen_plan_extrapolated_in_depth_equals_the_real_compile():
    """The Qwen rows compile 1 and 2 decoder layers and extrapolate linearly in depth; on a
    tiny 3-layer model the extrapolation gives the FLOPs and argument bytes of compiling all
    3 layers (and the exact parameter counts)."""
    import dataclasses

    from common.distributed import make_mesh
    from common.plan import ACCELERATORS
    from common.train import OptimizerConfig
    from lir.backbones.qwen2_5_vl import plan as qp
    from lir.model import LoRAConfig
    from tests.lir.test_qwen_attention_chunk import tiny_qwen_config

    cfg = tiny_qwen_config(3)
    shapes = qp.Shapes(
        images=1, tokens_per_image=16, text_tokens=40, answer_tokens=4, train_examples=16
    )
    lora, opt = LoRAConfig(rank=2, alpha=4.0), OptimizerConfig(total_steps=10)
    mesh, acc = make_mesh(), ACCELERATORS["h100"]
    # one stage keeps the test short: the stages differ only in mask and trainable filter
    rows = qp.plan_rows(
        mesh,
        acc,
        opt,
        lora,
        num_latents=4,
        configs={"t": cfg},
        shapes=shapes,
        attention_chunk=32,
        stages=qp.STAGES[:1],
    )
    assert [r.stage for r in rows] == ["t LIVR stage 1"]
    full = dataclasses.replace(cfg, remat=True, attention_chunk=32)
    for row, (_, variant, trainable, latents, _) in zip(rows, qp.STAGES[:1], strict=True):
        k = 4 if latents else 0
        real = qp._row(full, lora, opt, shapes, row.stage, variant, trainable, k, mesh, acc, 1)
        np.testing.assert_allclose(row.flops_per_device, real.flops_per_device, rtol=1e-3)
        assert row.argument_bytes == real.argument_bytes
        model = qp._model(full, lora, k)
        assert row.params == _count(model, ...)
        assert row.trainable == _count(model, trainable)
