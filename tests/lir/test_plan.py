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
SHRINK = ["model.patch_size=16", "model.vit_dim=16", "model.vit_depth=1", "model.vit_heads=2",
          "model.lm_dim=32", "model.lm_depth=1", "model.lm_heads=2"]


def _count(model, filt) -> int:
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, filt))))


def test_plan_verb_rows_match_the_real_models(tmp_path, capsys):
    argv = ["plan", "--preset", "tiny", "--devices", "1", "--out", str(tmp_path)]
    for s in SHRINK:
        argv += ["--set", s]
    assert main(argv) == 0
    assert "skipped qwen2_5_vl" in capsys.readouterr().out  # the Qwen hook is not planned yet
    plan = json.loads((tmp_path / "lir_1dev.json").read_text())
    rows = {r["stage"].split(" (")[0]: r for r in plan["rows"]}
    assert list(rows) == ["phase P: pretrain", "phase F: LIVR stage 1", "phase F: LIVR stage 2",
                          "phase F: SFT"]
    assert (tmp_path / "lir_1dev.md").exists() and plan["preset"] == "tiny"

    from common.config import get_preset, override

    cfg = override(get_preset(PRESETS, "tiny"), SHRINK)
    pre = _pretrain_model(cfg)
    ft = LMM(model_config(cfg), rngs=nnx.Rngs(0))
    add_lora(ft, cfg.finetune.lora, rngs=nnx.Rngs(1))
    assert rows["phase P: pretrain"]["params"] == param_count(pre)
    assert rows["phase P: pretrain"]["trainable"] == _count(pre, PRETRAIN_FILTER)
    for stage, filt in (("phase F: LIVR stage 1", LIVR_FILTER),
                        ("phase F: LIVR stage 2", LIVR_FILTER), ("phase F: SFT", LORA_FILTER)):
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
