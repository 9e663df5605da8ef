"""`python -m spatia plan` on a tiny preset: every stage compiles from abstract shapes, and its
row counts the parameters of the model the trainer builds."""

import json

import jax
from flax import nnx

from common.config import override
from spatia import config as C
from spatia import train as T
from spatia.cli import main as cli_main

_TINY = ["model.depth=1", "model.control_layers=(0,)", "train.ablations=false"]


def _count(model, filt) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, filt)))


def test_plan_rows_count_the_real_models(tmp_path):
    argv = [
        "plan",
        "--preset",
        "tiny",
        "--devices",
        "1",
        "--per-device-batch",
        "4",
        "--out",
        str(tmp_path),
    ]
    for o in _TINY:
        argv += ["--set", o]
    assert cli_main(argv) == 0
    plan = json.loads((tmp_path / "spatia_1dev.json").read_text())
    assert (tmp_path / "spatia_1dev.md").exists() and plan["preset"] == "tiny"
    cfg = override(C.tiny(), _TINY)
    assert [r["stage"] for r in plan["rows"]] == T.stage_order(cfg)
    for row in plan["rows"]:
        name = row["stage"]
        model = T.build_model(cfg, name, None)
        assert row["params"] == _count(model, nnx.Param), name
        assert row["trainable"] == _count(model, T.trainable_filter(cfg, name)), name
        assert row["flops_per_device"] > 0 and row["fits"], name
        # batch 8 = 1 device x 4 clips x 2 accumulated calls: the stage makes twice the calls
        assert row["steps"] == 2 * T.stage_steps(cfg, name), name
        assert "2 accumulated calls" in row["note"], name
