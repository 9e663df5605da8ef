"""Presets: valid, JSON round trip, overrides, the paper's schedule arithmetic."""

import dataclasses

import numpy as np
import pytest

from common.config import ConfigError, from_json, get_preset, override, to_json
from lir.config import PRESETS, LIRConfig, layout, model_config, stage_optimizer, steps_per_epoch


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    cfg = get_preset(PRESETS, name)
    assert from_json(LIRConfig, to_json(cfg)) == cfg
    lay = layout(cfg, cfg.finetune.num_latents)
    assert lay.tail_position == layout(cfg, 0).tail_position
    assert model_config(cfg).num_latents == cfg.finetune.num_latents


def test_paper_recipe():
    cfg = get_preset(PRESETS, "paper")
    ft = cfg.finetune
    o = ft.optim
    assert (o.name, o.learning_rate, o.weight_decay, o.b1, o.b2, o.eps) == (
        "adamw",
        1e-4,
        0.01,
        0.9,
        0.999,
        1e-8,
    )
    assert (ft.lora.rank, ft.lora.alpha, ft.lora.dropout) == (16, 32.0, 0.05)
    assert ft.num_latents == 16 and ft.batch_size * ft.accumulation_steps == 8
    assert (ft.sft_epochs, ft.stage1_epochs, ft.stage2_epochs) == (10, 4, 6)
    spe = steps_per_epoch(ft, cfg.data.n_train)
    assert spe == 125
    s1, s2 = stage_optimizer(ft, 4 * spe), stage_optimizer(ft, 6 * spe)
    # LIVR §4.3, App. B: S1 = 500 steps with 25 warmup, S2 = 750 steps with ~38 warmup, cosine to 0
    assert (s1.total_steps, s1.warmup_steps, s2.total_steps, s2.warmup_steps) == (500, 25, 750, 38)
    assert s1.schedule == "cosine" and s1.end_lr_fraction == 0.0 and s1.name == "adamw"
    # everything else is finetune.optim's: only the per-stage fields differ
    assert dataclasses.replace(s1, warmup_steps=0, total_steps=1000) == ft.optim
    assert s1.accumulation_steps == ft.accumulation_steps
    # the prompt-tuning arm keeps the recipe and changes the lr only (docs/lir.md D11)
    pt = stage_optimizer(ft, 500, ft.prompt_tuning_optim)
    assert pt.learning_rate == 3e-3 and dataclasses.replace(pt, learning_rate=1e-4) == s1


def test_overrides_and_validation():
    cfg = override(get_preset(PRESETS, "tiny"), ["finetune.num_latents=4", "seeds=(3,4,5)"])
    assert cfg.finetune.num_latents == 4 and cfg.seeds == (3, 4, 5)
    with pytest.raises(ConfigError):
        override(cfg, ["finetune.nope=1"])
    with pytest.raises(ValueError, match=r"DataConfig.max_latents=8: expected >= every K"):
        dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, num_latents=64))
    with pytest.raises(ValueError, match=r"FinetuneConfig.stage1_epochs=5: .*sft_epochs"):
        dataclasses.replace(cfg.finetune, stage1_epochs=5)
    with pytest.raises(ValueError, match=r"LIRConfig.tasks=\('nope',\): expected task names"):
        dataclasses.replace(cfg, tasks=("nope",))
    # the optimizer is one nested section, overridden like every package's
    cfg2 = override(cfg, ["finetune.optim.learning_rate=3e-4", "pretrain.optim.total_steps=80"])
    assert cfg2.finetune.optim.learning_rate == 3e-4 and cfg2.pretrain.calls == 80
    # per-stage fields of the template are set from the finetune section, not by hand
    with pytest.raises(
        ValueError,
        match=r"optim.warmup_steps left at its default 0: .*"
        "warmup_fraction",
    ):
        override(cfg, ["finetune.optim.warmup_steps=10"])
    with pytest.raises(ValueError, match=r"accumulation_steps left at its default 1"):
        override(cfg, ["finetune.prompt_tuning_optim.accumulation_steps=8"])


def test_paper_preset_one_livr_step():
    """The paper preset builds and takes one LIVR stage-1 step on the CPU."""
    import jax
    from flax import nnx

    from common.train import create_train_state, make_optimizer, make_train_step
    from lir.data import collate
    from lir.model import LIVR_FILTER, LMM, add_lora, loss_fn
    from lir.tasks import generate

    cfg = get_preset(PRESETS, "paper")
    model = LMM(model_config(cfg), rngs=nnx.Rngs(0))
    add_lora(model, cfg.finetune.lora, rngs=nnx.Rngs(1))
    tx = make_optimizer(stage_optimizer(cfg.finetune, 10))
    graphdef, state = create_train_state(model, tx, 0, trainable=LIVR_FILTER)
    step = make_train_step(graphdef, loss_fn("bottleneck"), tx)
    recs = generate("jigsaw", cfg.finetune.batch_size, 0, size=cfg.data.image_size)
    batch = collate(recs, layout(cfg, cfg.finetune.num_latents))
    before = np.asarray(state.params["latents"][...])
    for _ in range(2):  # the first update has warmup lr 0
        state, metrics = step(state, jax.tree.map(np.asarray, batch))
        assert np.isfinite(float(metrics["loss"]))
    assert np.abs(np.asarray(state.params["latents"][...]) - before).sum() > 0
