"""Tests of common.train: optimizer/schedule, the functional step and the resumable loop.

One tiny MLP (1 -> 16 -> 1 with dropout) and one jitted train step are shared by most tests
(module-scoped fixtures) to keep compiles few; data shapes are identical everywhere.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from common import train as T
from common.checkpoint import Checkpointer
from tests.contracts import assert_resume_bit_exact, assert_trees_equal

REPO = pathlib.Path(__file__).resolve().parents[2]
WIDTH = 16
BATCH = 16
OPT = T.OptimizerConfig(learning_rate=2e-2, warmup_steps=5, total_steps=300, weight_decay=1e-4)
RESUME_STEPS = 12  # 3 epochs of 4 batches: resume crosses epoch boundaries


class Counter(nnx.Variable):
    """Non-trainable state that a training forward pass updates."""


class MLP(nnx.Module):
    def __init__(self, width: int, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(1, width, rngs=rngs)
        self.drop = nnx.Dropout(0.1)
        self.l2 = nnx.Linear(width, 1, rngs=rngs)
        self.calls = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x, key=None):
        h = jnp.tanh(self.l1(x))
        if key is not None:  # training: dropout with the step's key
            h = self.drop(h, deterministic=False, rngs=key)
            self.calls[...] = self.calls[...] + 1
        return self.l2(h)


def loss_fn(model, batch, key):
    mse = jnp.mean((model(batch["x"], key) - batch["y"]) ** 2)
    return mse, {"mse": mse}


def eval_fn(model, batch, key):
    del key
    return {"mse": jnp.mean((model(batch["x"]) - batch["y"]) ** 2)}


def toy_arrays(n: int = 64) -> dict[str, np.ndarray]:
    x = np.linspace(-1.0, 1.0, n, dtype=np.float32)[:, None]
    return {"x": x, "y": np.sin(3.0 * x).astype(np.float32)}


def fresh(width: int = WIDTH, seed: int = 0, trainable=nnx.Param):
    return T.create_train_state(
        MLP(width, seed), T.make_optimizer(OPT), jax.random.key(42), trainable
    )


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


class ListWriter:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics):
        self.rows.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def step_fn():
    graphdef, _ = fresh()
    return T.make_train_step(graphdef, loss_fn, T.make_optimizer(OPT))


@pytest.fixture(scope="module")
def eval_step():
    graphdef, _ = fresh()
    return T.make_eval_step(graphdef, eval_fn)


def _outcome(state, data):
    """What a resumed run must reproduce bit for bit: (step, params, frozen, opt_state) on
    the host and the data iterator's position."""
    return host((state.step, state.params, state.frozen, state.opt_state)), data.get_state()


def _resume(step_fn, ckpt: Checkpointer, seed: int, save_every: int):
    """Continues the checkpointed run in `ckpt` to RESUME_STEPS with everything new: model
    (init `seed`, overwritten by the restore), iterator and checkpointer."""
    _, state = fresh(seed=seed)
    data = T.ArrayIterator(toy_arrays(), BATCH, seed=3)
    state = T.train(state, step_fn, data, RESUME_STEPS, checkpointer=ckpt, save_every=save_every)
    return _outcome(state, data)


@pytest.fixture(scope="module")
def uninterrupted(step_fn):
    """RESUME_STEPS straight steps (`_outcome`)."""
    _, state = fresh()
    data = T.ArrayIterator(toy_arrays(), BATCH, seed=3)
    state = T.train(state, step_fn, data, RESUME_STEPS)
    return _outcome(state, data)


# ------------------------------------------------------------------ optimizer and schedule


def test_warmup_cosine_schedule_values():
    cfg = T.OptimizerConfig(
        learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_fraction=0.1
    )
    sched = T.make_schedule(cfg)
    expected = {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.1 + 0.9 * 0.5, 110: 0.1, 500: 0.1}
    for step, lr in expected.items():
        np.testing.assert_allclose(
            float(sched(step)), lr, rtol=1e-6, atol=1e-7, err_msg=f"step {step}"
        )
    # Cosine shape: a quarter into the decay the lr is 0.1 + 0.9 * (1 + cos(pi/4)) / 2.
    np.testing.assert_allclose(float(sched(35)), 0.1 + 0.45 * (1 + np.cos(np.pi / 4)), rtol=1e-6)

    const = T.make_schedule(
        T.OptimizerConfig(learning_rate=2.0, schedule="constant", warmup_steps=4)
    )
    assert [float(const(s)) for s in (0, 2, 4, 1000)] == [0.0, 1.0, 2.0, 2.0]
    no_warmup = T.make_schedule(T.OptimizerConfig(learning_rate=1.0, total_steps=100))
    assert float(no_warmup(0)) == 1.0 and abs(float(no_warmup(100))) < 1e-7


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "lion"}, "name"),
        ({"schedule": "linear"}, "schedule"),
        ({"warmup_steps": 10, "total_steps": 10}, "total_steps"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_optimizer_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"OptimizerConfig.{field}"):
        T.OptimizerConfig(**kwargs)


def test_make_optimizer_matches_optax_adamw_with_clipping():
    cfg = T.OptimizerConfig(
        learning_rate=0.1, warmup_steps=2, total_steps=10, weight_decay=0.01, grad_clip_norm=0.5
    )
    ref = optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(T.make_schedule(cfg), weight_decay=0.01)
    )
    ours = T.make_optimizer(cfg)
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    s_ours, s_ref = ours.init(params), ref.init(params)
    for i in range(4):
        g = jax.tree.map(lambda p, i=i: jnp.sin(p + i) * 3.0, params)
        u_ours, s_ours = ours.update(g, s_ours, params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u_ours, u_ref
        )
        params = optax.apply_updates(params, u_ours)


def test_gradient_accumulation_equals_one_big_batch():
    """accumulation_steps=2 over batches b1, b2 == one step on concat(b1, b2) (SGD, mean loss)."""

    def lin_loss(model, batch, key):
        del key
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}

    cfg = dict(name="sgd", learning_rate=0.1, schedule="constant", grad_clip_norm=None)
    rng = np.random.default_rng(0)
    b1, b2 = (
        {
            "x": rng.normal(size=(4, 3)).astype(np.float32),
            "y": rng.normal(size=(4, 2)).astype(np.float32),
        }
        for _ in range(2)
    )
    big = {k: np.concatenate([b1[k], b2[k]]) for k in b1}

    tx_acc = T.make_optimizer(T.OptimizerConfig(accumulation_steps=2, **cfg))
    graphdef, s_acc = T.create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(1)), tx_acc, 0)
    initial = host(s_acc.params)
    step_acc = T.make_train_step(graphdef, lin_loss, tx_acc, donate=False)
    s_acc, _ = step_acc(s_acc, b1)
    assert_trees_equal(host(s_acc.params), initial)  # the first micro-step does not update
    s_acc, _ = step_acc(s_acc, b2)

    tx_one = T.make_optimizer(T.OptimizerConfig(**cfg))
    graphdef, s_one = T.create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(1)), tx_one, 0)
    s_one, _ = T.make_train_step(graphdef, lin_loss, tx_one, donate=False)(s_one, big)

    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), host(s_one.params), initial)
    assert min(jax.tree.leaves(moved)) > 1e-3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        host(s_acc.params),
        host(s_one.params),
    )


# ------------------------------------------------------------------ data iterator


def test_array_iterator_epochs_and_state():
    arrays = {"i": np.arange(10)}
    it = T.ArrayIterator(arrays, batch_size=3, seed=7)
    epoch0 = np.concatenate([it.next()["i"] for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch, 1 row dropped
    assert it.get_state() == {"epoch": 0, "position": 9}
    first_of_epoch1 = it.next()["i"]
    assert it.get_state() == {"epoch": 1, "position": 3}
    assert not np.array_equal(first_of_epoch1, epoch0[:3])  # a new permutation per epoch
    saved = json.loads(json.dumps(it.get_state()))
    rest = [it.next()["i"] for _ in range(5)]

    again = T.ArrayIterator(arrays, batch_size=3, seed=7)
    again.set_state(saved)
    for expected in rest:
        np.testing.assert_array_equal(again.next()["i"], expected)
    ordered = T.ArrayIterator(arrays, batch_size=5, shuffle=False)
    np.testing.assert_array_equal(ordered.next()["i"], np.arange(5))
    with pytest.raises(ValueError, match="batch_size"):
        T.ArrayIterator(arrays, batch_size=11)
    with pytest.raises(ValueError, match="leading length"):
        T.ArrayIterator({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1)
    with pytest.raises(ValueError, match="set_state"):
        again.set_state({"epoch": 0})


# ------------------------------------------------------------------ training


def test_toy_regression_trains_to_low_loss(step_fn, eval_step):
    graphdef, state = fresh()
    arrays = toy_arrays()
    full = [arrays]
    before = T.evaluate(eval_step, state, full)["mse"]
    writer = ListWriter()
    evals = []

    def eval_cb(s):
        out = T.evaluate(eval_step, s, full)
        evals.append(out["mse"])
        return out

    state = T.train(
        state,
        step_fn,
        T.ArrayIterator(arrays, BATCH, seed=0),
        300,
        metrics_writer=writer,
        log_every=50,
        eval_fn=eval_cb,
        eval_every=150,
    )
    after = T.evaluate(eval_step, state, full)["mse"]
    # The best straight line has mse ~0.17 on sin(3x): reaching 0.05 needs a learned nonlinearity.
    x, y = arrays["x"][:, 0], arrays["y"][:, 0]
    linear_mse = float(np.mean((np.polyval(np.polyfit(x, y, 1), x) - y) ** 2))
    assert before > 0.2, before
    assert after < min(0.05, 0.3 * linear_mse), (before, after, linear_mse)
    assert int(state.step) == 300
    train_rows = [(s, m) for s, m in writer.rows if "loss" in m]
    assert [s for s, _ in train_rows] == [50, 100, 150, 200, 250, 300]
    assert set(train_rows[0][1]) == {"loss", "grad_norm", "learning_rate", "mse"}
    # The logged lr is the schedule's value for that update (step 50 is update index 49).
    np.testing.assert_allclose(
        train_rows[0][1]["learning_rate"], float(T.make_schedule(OPT)(49)), rtol=1e-6
    )
    assert [s for s, m in writer.rows if "eval/mse" in m] == [150, 300]
    assert evals[-1] == pytest.approx(after)
    # A train loss_fn doubles as an eval_fn: (loss, aux) becomes {"loss", **aux}.
    as_eval = T.evaluate(T.make_eval_step(graphdef, loss_fn), state, full)
    assert set(as_eval) == {"loss", "mse"} and as_eval["loss"] < 0.1
    # The non-trainable counter advanced once per training forward pass.
    assert int(T.merge_model(graphdef, state).calls[...]) == 300


def test_resume_equals_uninterrupted(step_fn, uninterrupted, tmp_path):
    class Crash(Exception):
        pass

    def crash(directory, kill_after):
        def stop(step, metrics):
            if step == kill_after:
                raise Crash

        _, state = fresh()
        with pytest.raises(Crash):
            T.train(
                state,
                step_fn,
                T.ArrayIterator(toy_arrays(), BATCH, seed=3),
                RESUME_STEPS,
                checkpointer=Checkpointer(directory),
                save_every=4,
                progress=stop,
            )

    def resume(directory, total):
        ckpt = Checkpointer(directory)
        assert ckpt.latest_step() == 4  # the crash at step 6: steps 5-6 are redone
        outcome = _resume(step_fn, ckpt, seed=99, save_every=4)
        assert ckpt.all_steps() == [4, 8, 12]
        return outcome

    assert_resume_bit_exact(
        resume,
        tmp_path,
        kill_after=6,
        total=RESUME_STEPS,
        uninterrupted=uninterrupted,
        interrupt=crash,
    )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(step_fn, tmp_path):
    arrays = toy_arrays(96)
    arrays["x"][64:80] = np.nan  # the 5th batch in order: step 5 has a NaN loss

    def run(directory, **kw):
        _, state = fresh()
        ckpt = Checkpointer(directory)
        data = T.ArrayIterator(arrays, BATCH, shuffle=False)
        with pytest.raises(T.NonFiniteLossError) as err:
            T.train(state, step_fn, data, 20, checkpointer=ckpt, **kw)
        return err.value, ckpt

    err, ckpt = run(tmp_path / "every_step", save_every=2)
    assert err.step == 5 and not np.isfinite(err.metrics["loss"])
    assert "step 5" in str(err) and "last good checkpoint is step 4" in str(err)
    assert ckpt.latest_step() == 4
    _, target = fresh()
    restored, data_state = ckpt.restore(target)
    assert int(restored.step) == 4 and data_state == {"epoch": 0, "position": 64}
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(restored.params)))

    # Checking only every 100 steps still checks before each save: the NaN at step 5 is
    # caught at the save of step 6, which therefore never happens.
    err, ckpt = run(tmp_path / "relaxed", save_every=3, check_finite_every=100)
    assert err.step == 5 and ckpt.all_steps() == [3]


def test_frozen_subset_is_untouched(tmp_path):
    trainable = nnx.All(nnx.Param, nnx.PathContains("l2"))
    graphdef, state = fresh(trainable=trainable)
    initial_frozen = host(state.frozen)
    initial_params = host(state.params)
    opt_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    ]
    assert opt_paths and all("l1" not in p for p in opt_paths)
    assert any("l2" in p for p in opt_paths)

    step = T.make_train_step(graphdef, loss_fn, T.make_optimizer(OPT))
    state = T.train(state, step, T.ArrayIterator(toy_arrays(), BATCH, seed=0), 5)
    model = T.merge_model(graphdef, state)
    np.testing.assert_array_equal(
        np.asarray(model.l1.kernel[...]), initial_frozen["l1"]["kernel"][...]
    )
    np.testing.assert_array_equal(np.asarray(model.l1.bias[...]), initial_frozen["l1"]["bias"][...])
    assert not np.array_equal(np.asarray(model.l2.kernel[...]), initial_params["l2"]["kernel"][...])
    assert int(model.calls[...]) == 5  # non-param state still updates


# ------------------------------------------------------------------ a real kill


def _worker(directory: str, seconds_per_step: float) -> None:
    """Subprocess body: the uninterrupted run's config, slowed so the parent can kill it mid-run."""
    import tests.conftest  # noqa: F401  (same compile cache and matmul precision as pytest)

    graphdef, state = fresh()
    step = T.make_train_step(graphdef, loss_fn, T.make_optimizer(OPT))
    T.train(
        state,
        step,
        T.ArrayIterator(toy_arrays(), BATCH, seed=3),
        RESUME_STEPS,
        checkpointer=Checkpointer(directory),
        save_every=2,
        progress=lambda step, metrics: time.sleep(seconds_per_step),
    )


def test_sigkill_then_resume_is_bit_identical(step_fn, uninterrupted, tmp_path):
    def kill(directory, kill_after):
        """Runs `_worker` in a subprocess and SIGKILLs it once step `kill_after` is saved."""
        directory.mkdir(parents=True)
        code = f"from tests.common.test_train import _worker; _worker({str(directory)!r}, 0.25)"
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
                if steps and max(steps) >= kill_after:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]

    def resume(directory, total):
        ckpt = Checkpointer(directory)
        resumed_from = ckpt.latest_step()
        assert resumed_from is not None and 4 <= resumed_from < total
        return _resume(step_fn, ckpt, seed=7, save_every=2)

    assert_resume_bit_exact(
        resume,
        tmp_path,
        kill_after=4,
        total=RESUME_STEPS,
        uninterrupted=uninterrupted,
        interrupt=kill,
    )
    assert not [p for p in os.listdir(tmp_path / "interrupted") if "tmp" in p]
