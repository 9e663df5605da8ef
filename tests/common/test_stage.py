"""`common.train.run_stage`, the step cache, the stage clock, named RNG streams, the config
validator and `common.plan`: the pieces every trainer and reproduction of the three packages
shares."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import plan, report
from common.config import require
from common.rng import stream_key, stream_seed
from common.train import (
    STEPS,
    ArrayIterator,
    OptimizerConfig,
    StepCache,
    create_train_state,
    run_stage,
)
from tests.multidevice import assert_params_close, flat_params, run_with_devices


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))[:, 0]


def toy_loss(model, batch, key):
    del key
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


OPT = OptimizerConfig(learning_rate=1e-2, total_steps=12, warmup_steps=2)


def _data():
    x = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    return {"x": x, "y": np.sin(x).sum(1)}


def _stage(directory, steps, **kw):
    graphdef, state = create_train_state(Toy(nnx.Rngs(0)), STEPS.optimizer(OPT), 0)
    step = STEPS.train_step(graphdef, OPT, toy_loss)
    return run_stage(
        "toy",
        state,
        step,
        ArrayIterator(_data(), 16, seed=1),
        steps,
        directory=directory,
        save_every=3,
        verbose=False,
        **kw,
    )


def test_run_stage_resumes_bit_for_bit_and_logs(tmp_path):
    whole = _stage(tmp_path / "whole", 12)
    part = _stage(tmp_path / "killed", 7)
    assert (part.start_step, part.steps_run) == (0, 7)
    resumed = _stage(tmp_path / "killed", 12)
    assert resumed.start_step == 7 and resumed.steps_run == 5
    for k, v in flat_params(whole.state).items():
        np.testing.assert_array_equal(flat_params(resumed.state)[k], v, err_msg=k)
    lines = [json.loads(s) for s in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10]  # log_every=10 of 12 steps
    assert whole.compile_seconds is not None and 0 < whole.compile_seconds < whole.wall_seconds


def test_run_stage_rejects_a_batch_the_mesh_cannot_split():
    code = """
import pytest
from tests.common.test_stage import _stage
with pytest.raises(ValueError, match=r"batch dimension 16 is not divisible .* \\(3 devices\\)"):
    _stage(None, 2)
result = {}
"""
    run_with_devices(3, code)


def test_run_stage_on_8_devices_matches_one_device(tmp_path):
    code = """
import numpy as np
from tests.common.test_stage import _stage
from tests.multidevice import flat_params
r = _stage(directory, 12)
assert r.state.params["hidden"]["kernel"][...].sharding.mesh.size == jax.device_count()
result = flat_params(r.state)
"""
    one = flat_params(_stage(tmp_path / "one", 12).state)  # this process: one device
    eight = run_with_devices(8, code, directory=str(tmp_path / "eight"))
    # float32: the 8-device step sums per-device gradient partials in another order
    assert_params_close(eight, one, rtol=1e-5, atol=1e-6)


def test_step_cache_reuses_built_steps_and_is_bounded():
    cache = StepCache(maxsize=2)
    graphdef, _ = nnx.split(Toy(nnx.Rngs(0)))
    a = cache.train_step(graphdef, OPT, toy_loss)
    assert cache.train_step(graphdef, OPT, toy_loss) is a
    assert cache.optimizer(OPT) is cache.optimizer(OptimizerConfig(**vars(OPT)))
    other = cache.train_step(graphdef, OptimizerConfig(learning_rate=2e-2), toy_loss)
    assert other is not a
    assert len(cache) == 2  # bounded: the oldest entries were dropped
    assert cache.train_step(graphdef, OPT, toy_loss) is not a


def test_stage_clock_keeps_compute_time_of_cached_results(tmp_path, monkeypatch):
    ticks = iter([10.0, 25.5])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(ticks))
    clock = report.StageClock()
    out = clock.cached("probe", tmp_path / "probe.json", lambda: {"acc": 0.5})
    assert out == {"acc": 0.5} and clock.seconds == {"probe": 15.5}
    rebuilt = report.StageClock()
    assert rebuilt.cached("probe", tmp_path / "probe.json", lambda: 1 / 0) == {"acc": 0.5}
    assert rebuilt.to_json() == {
        "total_seconds": 15.5,
        "stages": {"probe": 15.5},
        "stages_from_cache": ["probe"],
    }
    r = report.Report("t", command="python -m toy reproduce")
    r.rows("Table", [report.Row("acc", 0.5, 0.7, ci=(0.4, 0.6))])
    md, js = r.write(tmp_path / "rep", {}, clock=rebuilt)
    text = open(md).read()
    assert (
        "compute time: 16 s in all (probe 16 s)" in text
        and "| acc | 0.5 | [0.4, 0.6] | 0.7 |" in text
    )
    assert json.load(open(js))["provenance"]["compute"]["total_seconds"] == 15.5


def test_stream_seed_is_stable_distinct_and_typed():
    assert stream_seed(0, "data") == stream_seed(0, "data")
    seeds = {stream_seed(s, n, i) for s in range(3) for n in ("data", "model") for i in range(50)}
    assert len(seeds) == 300  # no collisions across seeds, names and indices
    assert stream_seed(0, "data", 1) != stream_seed(0, "data1")
    assert stream_seed(0, 1) != stream_seed(0, "1")
    assert 0 <= stream_seed(7, "x") < 2**31
    np.testing.assert_array_equal(
        jax.random.key_data(stream_key(3, "eval")),
        jax.random.key_data(jax.random.key(stream_seed(3, "eval"))),
    )
    with pytest.raises(TypeError, match="str or int"):
        stream_seed(0, 1.5)


def test_require_names_config_field_value_and_expectation():
    with pytest.raises(ValueError, match=r"^OptimizerConfig.learning_rate=-1.0: expected > 0$"):
        OptimizerConfig(learning_rate=-1.0)
    require(OPT, "learning_rate", True, "never shown")


def test_plan_step_counts_flops_and_bytes_of_the_partitioned_step():
    mesh = __import__("common.distributed", fromlist=["make_mesh"]).make_mesh()
    tx = STEPS.optimizer(OPT)
    graphdef, state = plan.abstract_train_state(lambda: Toy(nnx.Rngs(0)), tx)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state.params))
    step = STEPS.train_step(graphdef, OPT, toy_loss)
    batch = plan.abstract_batch({"x": ((256, 4), jnp.float32), "y": ((256,), jnp.float32)})
    row = plan.plan_step("toy", step, state, batch, mesh, steps=100, items_per_step="256 rows")
    n_params = 4 * 16 + 16 + 16 + 1
    assert row.params == row.trainable == n_params
    # forward and weight-gradient matmuls (2 × rows × (4·16 + 16·1) FLOPs each) at least;
    # the input gradient of the second layer, the elementwise work and Adam add less than that
    matmul = 2 * 256 * (4 * 16 + 16)
    assert 2 * matmul <= row.flops_per_device <= 4 * matmul
    # arguments hold params + two Adam moments (f32) and the batch at least
    assert row.argument_bytes >= 4 * (3 * n_params + 256 * 5)
    assert row.fits and row.est_stage_hours == pytest.approx(row.est_step_seconds * 100 / 3600)
    assert "| toy | 1 |" in plan.render_plan([row])


def test_sequence_iterator_orders_each_epoch_and_resumes():
    from common.data import SequenceIterator

    items = [f"b{i}" for i in range(5)]
    it = SequenceIterator(items, seed=3)
    seen = [it.next() for _ in range(12)]
    assert sorted(seen[:5]) == items and sorted(seen[5:10]) == items  # each epoch a permutation
    assert seen[:5] != seen[5:10]  # reshuffled (seed 3 gives two different orders)
    again = SequenceIterator(items, seed=3)
    again.set_state({"epoch": 1, "position": 2})
    assert [again.next() for _ in range(5)] == seen[7:12]
    assert [SequenceIterator(items, shuffle=False).next() for _ in range(1)] == ["b0"]
    with pytest.raises(ValueError, match="out of range"):
        again.set_state({"epoch": 0, "position": 6})
