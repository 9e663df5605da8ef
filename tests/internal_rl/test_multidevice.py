"""The grid world's pretraining stage on 8 simulated devices gives the 1-device parameters,
and `python -m internal_rl plan` measures every stage of a preset."""

import jax
import numpy as np
import pytest
from flax import nnx

from common.distributed import make_mesh
from common.plan import ACCELERATORS
from internal_rl.config import make_config
from internal_rl.plan import plan_rows
from internal_rl.pretrain import build_model
from tests.multidevice import assert_params_close, run_with_devices

# A tiny base model on batches of 8 (divisible by the 8 devices). Closed-loop evaluation is off
# here (it compiles the rollout twice more); the two-process CLI test runs it across processes.
TINY = [
    "data.batch_size=8",
    "data.max_len=24",
    "model.dim=16",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_hidden=32",
    "pretrain.steps=3",
    "pretrain.log_every=1",
    "pretrain.save_every=3",
    "pretrain.eval_every=0",
    "pretrain.eval_episodes=0",
]

PRETRAIN = """
from flax import nnx
from internal_rl.config import make_config
from internal_rl.pretrain import load_base_model, run_pretrain
from tests.multidevice import flat_params
cfg = make_config("tiny", overrides)
summary = run_pretrain(cfg, run_dir, verbose=False)
assert summary["step"] == 3, summary
result = flat_params(nnx.state(load_base_model(cfg, run_dir), nnx.Param))
"""


def test_pretraining_on_8_devices_matches_one_device(tmp_path):
    # the 1-device reference runs in this process (one device, the same precision)
    from internal_rl.pretrain import load_base_model, run_pretrain
    from tests.multidevice import flat_params

    assert jax.device_count() == 1
    cfg = make_config("tiny", TINY)
    assert run_pretrain(cfg, tmp_path / "one", verbose=False)["step"] == 3
    one = flat_params(nnx.state(load_base_model(cfg, tmp_path / "one"), nnx.Param))
    eight = run_with_devices(8, PRETRAIN, overrides=TINY, run_dir=str(tmp_path / "eight"))
    # float32: the 8-device step sums the per-device gradient partials in another order
    # (≈1e-7 relative); three Adam steps of lr 1e-3 keep that difference near 1e-6
    assert_params_close(eight, one, rtol=1e-4, atol=1e-5)


# Slow: five programs compiled cold cost ≈30 s of the 2-core budget; lir's and spatia's plan
# verbs are tested in the default suite, and reports/plan holds this package's paper plans.
@pytest.mark.slow
def test_plan_measures_every_stage_of_a_preset():
    cfg = make_config(
        "tiny",
        TINY
        + [
            "control.batch_size=8",
            "mctrain.batch_size=8",
            "rl.batch_episodes=8",
            "rl.episodes=16",
            "rl.horizon=16",
        ],
    )
    rows = plan_rows(cfg, make_mesh(), ACCELERATORS["h100"])
    assert [r.stage for r in rows] == [
        "pretrain",
        "controller (layer 1)",
        "metacontroller (frozen base)",
        "metacontroller (co-trained)",
        "internal RL (PPO step)",
    ]
    assert all(r.flops_per_device > 0 and r.fits and r.devices == 1 for r in rows)
    model = build_model(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert rows[0].trainable == n_params and rows[0].params == n_all
    # the controller and the frozen-base metacontroller train only their own parameters
    assert rows[1].trainable < rows[1].params and rows[2].trainable < rows[2].params
    assert rows[3].trainable == rows[2].trainable + n_params  # co-trained: φ and θ
    assert np.isfinite(rows[4].est_step_seconds) and rows[4].steps == 2 * 2  # updates × epochs
