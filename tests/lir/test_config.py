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
    assert (ft.learning_rate, ft.weight_decay, ft.b1, ft.b2, ft.eps) == (1e-4, 0.01, 0.9, 0.999, 1e-8)
    assert (ft.lora.rank, ft.lora.alpha, ft.lora.dropout) == (16, 32.0, 0.05)
    assert ft.num_latents == 16 and ft.batch_size * ft.accumulation_steps == 8
    assert (ft.sft_epochs, ft.stage1_epochs, ft.stage2_epochs) == (10, 4, 6)
    spe = steps_per_epoch(ft, cfg.data.n_train)
    assert spe == 125
    s1, s2 = stage_optimizer(ft, 4 * spe), stage_optimizer(ft, 6 * spe)
    # LIVR §4.3, App. B: S1 = 500 steps with 25 warmup, S2 = 750 steps with ~38 warmup, cosine to 0
    assert (s1.total_steps, s1.warmup_steps, s2.total_steps, s2.warmup_steps) == (500, 25, 750, 38)
    assert s1.schedule == "cosine" and s1.end_lr_fraction == 0.0 and s1.name == "adamw"


def test_overrides_and_validation():
    cfg = override(get_preset(PRESETS, "tiny"), ["finetune.num_latents=4", "seeds=(3,4,5)"])
    assert cfg.finetune.num_latents == 4 and cfg.seeds == (3, 4, 5)
    with pytest.raises(ConfigError):
        override(cfg, ["finetune.nope=1"])
    with pytest.raises(ValueError, match="max_latents"):
        dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, num_latents=64))
    with pytest.raises(ValueError, match="sft_epochs"):
        dataclasses.replace(cfg.finetune, stage1_epochs=5)
    with pytest.raises(ValueError, match="unknown task"):
        dataclasses.replace(cfg, tasks=("nope",))


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
