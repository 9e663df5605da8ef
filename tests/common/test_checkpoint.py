"""Tests of common.checkpoint: round trips, atomicity, retention, mismatch errors, shardings.

Everything here runs eagerly on tiny states (no jitted step), so it costs no compiles; the
sharded restore runs in a subprocess with 8 simulated CPU devices.
"""

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import train as T
from common.checkpoint import Checkpointer, CheckpointMismatchError, tree_fingerprint

REPO = pathlib.Path(__file__).resolve().parents[2]
TX = T.make_optimizer(T.OptimizerConfig(total_steps=10))


class Net(nnx.Module):
    def __init__(self, width: int, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.blocks = nnx.List([nnx.Linear(2, width, rngs=rngs), nnx.Linear(width, 1, rngs=rngs)])
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # puts a typed PRNG key into the frozen state


def make_state(width: int = 8, seed: int = 0, step: int = 0) -> T.TrainState:
    _, state = T.create_train_state(Net(width, seed), TX, jax.random.key(seed))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def host(tree):
    return jax.tree.map(
        lambda x: np.asarray(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        ),
        tree,
    )


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_round_trip_into_live_and_abstract_targets(tmp_path):
    state = make_state(seed=1, step=7)
    ckpt = Checkpointer(tmp_path, config={"model": {"width": 8}})
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, {"epoch": 2, "position": 48})
    assert ckpt.latest_step() == 7

    other = make_state(seed=2)  # same structure, different values
    restored, data_state = Checkpointer(tmp_path, config={"model": {"width": 8}}).restore(other)
    assert data_state == {"epoch": 2, "position": 48}
    assert_trees_equal(restored, state)
    assert isinstance(restored, T.TrainState) and isinstance(restored.params, nnx.State)
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    for got, target in zip(jax.tree.leaves(restored), jax.tree.leaves(other), strict=True):
        assert got.sharding == target.sharding

    abstract = jax.eval_shape(lambda: make_state(seed=3))
    restored, _ = ckpt.restore(abstract, step=7)
    assert_trees_equal(restored, state)
    meta = ckpt.metadata()
    assert meta["config"] == {"model": {"width": 8}} and meta["step"] == 7
    assert meta["fingerprint"]["params/blocks/0/kernel"] == {"shape": [2, 8], "dtype": "float32"}


def test_resumed_state_reuses_the_compiled_step(tmp_path):
    """A restored state matches a fresh one's placement, so a resumed run does not compile its
    jitted step a second time."""
    state = make_state(seed=1, step=3)
    Checkpointer(tmp_path).save(3, state)
    fresh = make_state(seed=2)
    restored, _ = Checkpointer(tmp_path).restore(fresh)
    assert_trees_equal(restored, state)
    for got, target in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh), strict=True):
        assert got.committed == target.committed
    step = jax.jit(lambda s: jax.tree.map(lambda x: x, s))
    step(fresh)
    step(restored)
    assert step._cache_size() == 1


def test_data_state_none_and_retention(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    state = make_state()
    for step in (1, 2, 3):
        assert ckpt.save(step, state.replace(step=jnp.int32(step)))
    assert ckpt.all_steps() == [2, 3]
    assert not ckpt.save(3, state)  # an existing step is never overwritten
    restored, data_state = ckpt.restore(state, step=2)
    assert data_state is None and int(restored.step) == 2
    with pytest.raises(FileNotFoundError, match="step 1"):
        ckpt.restore(state, step=1)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        Checkpointer(tmp_path / "empty").restore(state)
    with pytest.raises(TypeError, match="data_state"):
        ckpt.save(4, state, {"bad": object()})


def test_interrupted_save_is_ignored(tmp_path):
    """A killed save leaves only `<step>.orbax-checkpoint-tmp-*`; it is never picked up."""
    good = make_state(seed=1, step=2)
    Checkpointer(tmp_path).save(2, good, {"position": 2})
    # What a process killed mid-save at step 4 leaves behind: a partly written temporary dir.
    tmp = tmp_path / "4.orbax-checkpoint-tmp-1764079000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial.bin").write_bytes(b"\x00" * 17)
    (tmp / "meta").mkdir()

    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
    restored, data_state = ckpt.restore(make_state(seed=5))
    assert_trees_equal(restored, good)
    assert data_state == {"position": 2}
    assert not tmp.exists()  # reopening the directory removes the garbage
    assert ckpt.save(4, good.replace(step=jnp.int32(4)))  # and the step can be written again
    assert ckpt.all_steps() == [2, 4]


def test_width_mismatch_names_the_parameter(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, make_state(width=16))
    with pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore(make_state(width=32))
    msg = str(err.value)
    assert "params/blocks/0/kernel: checkpoint (2, 16) vs model (2, 32)" in msg
    assert "params/blocks/1/kernel: checkpoint (16, 1) vs model (32, 1)" in msg
    assert "opt_state" in msg  # the optimizer moments differ too
    assert all("width" not in d for d in err.value.differences)


def test_tree_mismatch_names_missing_and_extra_paths(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"a": jnp.zeros(3), "b": jnp.zeros(2, jnp.int32)})
    with pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore({"a": jnp.zeros(3), "b": jnp.zeros(2), "c": jnp.zeros(1)})
    msg = str(err.value)
    assert "b: checkpoint dtype int32 vs model dtype float32" in msg
    assert "c: in model (1,), missing in checkpoint" in msg


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    width: int = 8
    depth: int = 2


@dataclasses.dataclass(frozen=True)
class RunCfg:
    model: ModelCfg = ModelCfg()
    num_steps: int = 100
    tags: tuple = ("a",)


def test_config_mismatch_names_the_key(tmp_path):
    state = make_state()
    Checkpointer(tmp_path, config=RunCfg()).save(1, state)
    # Same values (tuples survive the JSON round trip as lists): fine.
    Checkpointer(tmp_path, config=RunCfg()).restore(state)

    changed = RunCfg(model=ModelCfg(depth=3), num_steps=200)
    with pytest.raises(CheckpointMismatchError) as err:
        Checkpointer(tmp_path, config=changed).restore(state)
    assert "config.model.depth: checkpoint 2 vs run 3" in str(err.value)
    assert "config.num_steps: checkpoint 100 vs run 200" in str(err.value)

    # Keys the caller allows to change (e.g. extending a run) are skipped.
    with pytest.raises(CheckpointMismatchError, match="model.depth") as err:
        Checkpointer(tmp_path, config=changed, ignore_config_keys=["num_steps"]).restore(state)
    assert "num_steps" not in str(err.value)
    Checkpointer(tmp_path, config=RunCfg(num_steps=5), ignore_config_keys=["num_steps"]).restore(
        state
    )
    # A run without a config does not compare configs.
    Checkpointer(tmp_path).restore(state)
    with pytest.raises(TypeError, match="config"):
        Checkpointer(tmp_path, config=[1, 2])


def test_fingerprint_paths_are_readable():
    fp = tree_fingerprint(make_state(width=4))
    assert fp["step"] == {"shape": [], "dtype": "int32"}
    assert fp["params/blocks/1/bias"] == {"shape": [1], "dtype": "float32"}
    assert any(p.startswith("frozen/drop/rngs/key") for p in fp)


_SHARDED = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from common.checkpoint import Checkpointer

    mesh = jax.make_mesh((8,), ("data",))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    state = {"w": jax.device_put(jnp.arange(32.0).reshape(16, 2), rows),
             "b": jax.device_put(jnp.ones(3), rep)}
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, state)
    # Restore with the shardings swapped: the target decides the placement.
    target = {"w": jax.ShapeDtypeStruct((16, 2), jnp.float32, sharding=rep),
              "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=rep)}
    out, _ = ckpt.restore(target)
    assert out["w"].sharding == rep and out["w"].sharding.is_fully_replicated
    back, _ = ckpt.restore(state)
    assert back["w"].sharding == rows, back["w"].sharding
    assert len(back["w"].addressable_shards) == 8 and back["w"].addressable_shards[0].data.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(state["w"]))
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(state["w"]))
    print("OK")
    """
)


def test_restore_onto_a_mesh_keeps_target_shardings(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
