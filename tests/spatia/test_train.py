"""Tests of spatia's training data (spatia.datasets), presets (spatia.config) and staged
training (spatia.train).

One tiny configuration (2 main blocks, 16x16 frames, 8 samples) is trained through all three
stages once per module; every test reads that run or shares its compiled step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import train as ctrain
from common.config import ConfigError, override
from spatia import config as C
from spatia import datasets as D
from spatia import model as M
from spatia import train as T
from tests.contracts import assert_resume_bit_exact
from tests.multidevice import assert_params_close, flat_params, run_with_devices

_OVERRIDES = [
    "model.depth=2",
    "model.control_layers=(0,1)",
    "data.num_scenes=1",
    "data.val_scenes=0",
    "data.samples_per_scene=8",
    "data.first_clip_prob=0.25",
    "train.batch_size=4",
    "train.base.steps=30",
    "train.control.steps=3",
    "train.main.steps=3",
    "train.base.optim.warmup_steps=0",
    "train.control.optim.warmup_steps=0",
    "train.main.optim.warmup_steps=0",
    "train.base.optim.learning_rate=3e-3",
    "train.save_every=1000",
    "train.log_every=1000",
    "train.ablations=false",
]


@pytest.fixture(scope="module")
def cfg():
    return override(C.tiny(), _OVERRIDES)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spatia_data")


@pytest.fixture(scope="module")
def data(cfg, cache_dir):
    return D.load_dataset(cfg, cache_dir)


@pytest.fixture(scope="module")
def run(cfg, data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("spatia_run")
    stages = T.train_all(cfg, run_dir, data, verbose=False)
    return run_dir, stages


def _flat(state):
    return {p: np.asarray(v) for p, v in nnx.to_flat_state(state)}


def _model_params(graphdef, state, filt):
    return _flat(nnx.state(ctrain.merge_model(graphdef, state), filt))


# ----------------------------------------------------------------------------------- data


def test_dataset_shapes_ranges_and_invariants(cfg, data):
    m = cfg.model
    S = cfg.data.num_scenes * cfg.data.samples_per_scene
    H, W = m.frame_size
    N, Mp, K, Ch = m.num_target_frames, m.num_prev_frames, m.max_refs, m.channels
    want = dict(
        frames=(S, N, H, W, Ch),
        prev=(S, Mp, H, W, Ch),
        refs=(S, K, H, W, Ch),
        ref_valid=(S, K),
        proj=(S, Mp + N, H, W, Ch),
        hole=(S, Mp + N, H, W, 1),
        instruction=(S,),
    )
    assert {k: v.shape for k, v in data.items()} == want
    for k in ("frames", "prev", "proj", "hole"):
        assert data[k].min() >= 0.0 and data[k].max() <= 1.0, k
    assert data["instruction"].min() >= 0 and data["instruction"].max() < len(D.INSTRUCTIONS)
    # padding references are zeros, and valid ones come first
    rv = data["ref_valid"]
    assert np.all(data["refs"][~rv] == 0.0)
    assert np.all(np.diff(rv.astype(int), axis=1) <= 0)
    # holes are black: colour is at most the splat coverage 1 - hole
    assert np.all(data["proj"][..., :3] <= 1.0 - data["hole"] + 1e-5)
    # RGB-D: the 4th channel is log-depth, positive for every ray-cast pixel
    assert cfg.model.channels == 4 and data["frames"][..., 3].min() > 0.0
    assert (data["hole"] < 0.5).mean() > 0.2  # the memory covers a good part of the views


def test_dataset_is_deterministic_and_cached(cfg, data, cache_dir):
    path = cache_dir / f"train-{D.dataset_key(cfg, 'train')}.npz"
    assert path.exists()
    again = D.load_dataset(cfg, cache_dir)  # from the cache
    fresh = D.generate_split(cfg)  # regenerated
    for k in D.ARRAY_KEYS:
        np.testing.assert_array_equal(again[k], data[k])
        np.testing.assert_array_equal(fresh[k], data[k])
    other = override(cfg, ["data.seed=1"])
    assert D.dataset_key(other, "train") != D.dataset_key(cfg, "train")
    assert D.dataset_key(cfg, "val") != D.dataset_key(cfg, "train")


def test_motion_instruction_classes():
    from spatia.trajectories import pose_from_yaw_pitch

    p0 = np.asarray(pose_from_yaw_pitch(jnp.zeros(3), 0.0, 0.0))
    left = np.asarray(pose_from_yaw_pitch(jnp.zeros(3), np.radians(20.0), 0.0))
    right = np.asarray(pose_from_yaw_pitch(jnp.zeros(3), np.radians(-20.0), 0.0))
    ahead = np.asarray(pose_from_yaw_pitch(jnp.array([0.5, 0.0, 0.0]), 0.0, 0.0))
    back = np.asarray(pose_from_yaw_pitch(jnp.array([-0.5, 0.0, 0.0]), 0.0, 0.0))
    got = [D.motion_instruction(p0, p) for p in (left, right, ahead, back, p0)]
    assert got == [0, 1, 2, 3, 3]


def test_batch_iterator_resumes_and_rejects_missing_keys(data):
    it = D.batch_iterator(data, ("frames", "prev"), 3, seed=5)
    it.next()
    state = it.get_state()
    a = it.next()
    it2 = D.batch_iterator(data, ("frames", "prev"), 3, seed=5)
    it2.set_state(state)
    np.testing.assert_array_equal(it2.next()["frames"], a["frames"])
    with pytest.raises(KeyError, match="lack"):
        D.batch_iterator(data, ("frames", "depth"), 3, seed=0)


# -------------------------------------------------------------------------------- presets


def test_presets_and_overrides():
    for name, make in C.PRESETS.items():
        c = make()
        assert isinstance(c, C.SpatiaConfig), name
    with pytest.raises(ConfigError, match="valid keys"):
        override(C.tiny(), ["train.nope=1"])
    with pytest.raises(ConfigError, match="main_mode"):
        override(C.tiny(), ["train.main_mode=adapter"])
    with pytest.raises(ConfigError, match="max_refs"):
        override(C.tiny(), ["eval.ks=(0,5)"])


def test_paper_preset_structure_and_pixel_data_refusal():
    p = C.paper()
    m = p.model
    assert m.depth == 30 and m.control_layers == tuple(range(0, 30, 4)) and m.max_refs == 7
    # 9 history frames and 72 new ones through a 4x temporal VAE: 3 + 18 latent frames (81 total)
    assert (m.num_prev_frames, m.num_target_frames) == (3, 18)
    assert p.train.main_mode == "lora" and m.lora_rank == 64
    assert (p.train.control.steps, p.train.main.steps) == (8000, 5000)
    assert (p.train.control.optim.learning_rate, p.train.main.optim.learning_rate) == (1e-5, 1e-4)
    with pytest.raises(ValueError, match="channels in"):
        D.generate_split(p)


@pytest.mark.slow
def test_paper_preset_trains_one_step_at_reduced_size():
    # The paper's structure (30 + 8 blocks, K = 7, 3 + 18 latents) through the stage machinery
    # (main stage: LoRA, references, history noise, control input), at reduced width and a 4x4
    # latent grid so that it fits a CPU.
    p = override(
        C.paper(),
        [
            "model.dim=48",
            "model.num_heads=2",
            "model.mlp_hidden=96",
            "model.freq_dim=32",
            "model.frame_size=(4,4)",
            "model.lora_rank=4",
            "model.lora_alpha=4.0",
            "train.batch_size=1",
        ],
    )
    graphdef, state, _ = T.initial_state(p, "main", None)
    step = T.stage_step(p, "main", graphdef)
    r = np.random.default_rng(0)
    m = p.model
    shapes = dict(
        frames=m.num_target_frames,
        prev=m.num_prev_frames,
        refs=m.max_refs,
        proj=m.num_prev_frames + m.num_target_frames,
    )
    batch = {k: r.random((1, f, 4, 4, 48)).astype(np.float32) for k, f in shapes.items()}
    batch["hole"] = r.random((1, shapes["proj"], 4, 4, 48)).astype(np.float32)
    batch["ref_valid"] = np.ones((1, 7), bool)
    batch["instruction"] = np.array([3], np.int32)
    state, metrics = step(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


# ------------------------------------------------------------------------------- training


def test_training_lowers_the_loss(cfg, data, run):
    run_dir, stages = run
    gd0, st0, _ = T.initial_state(cfg, "base", None)
    before = T.validation_loss(cfg, gd0, st0, "base", data)
    gd, st = stages["base"]
    after = T.validation_loss(cfg, gd, st, "base", data)
    assert int(st.step) == cfg.train.base.steps
    assert after < 0.7 * before, (before, after)


def test_stage_steps_and_checkpoints(cfg, run):
    run_dir, stages = run
    assert list(stages) == ["base", "control", "main"]
    for name, (gd_trained, st) in stages.items():
        assert int(st.step) == T.stage_steps(cfg, name)
        assert (T.stage_dir(run_dir, name) / "metrics.jsonl").exists()
        # a child stage starts from its parent's restored weights: still one compiled step
        assert T.stage_step(cfg, name, gd_trained)._cache_size() == 1, name
        gd, loaded = T.load_stage(cfg, run_dir, name)
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(st.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_control_stage_leaves_base_unchanged(run):
    _, stages = run
    base = _model_params(*stages["base"], M.BASE_PARAMS)
    ctrl = _model_params(*stages["control"], M.BASE_PARAMS)
    assert base.keys() == ctrl.keys()
    for p in base:
        np.testing.assert_array_equal(base[p], ctrl[p], err_msg=str(p))
    # ...while the control branch moved away from its init (zero after_proj)
    after = _model_params(*stages["control"], M.CONTROL_PARAMS)
    assert any(np.abs(v).max() > 0 for p, v in after.items() if "after_proj" in p)


def test_stage_filters_train_only_the_intended_parameters(cfg, data, run):
    _, stages = run
    # base: the control branch keeps its (unused) init
    gd0, st0, _ = T.initial_state(cfg, "base", None)
    init_ctrl = _model_params(gd0, st0, M.CONTROL_PARAMS)
    base_ctrl = _model_params(*stages["base"], M.CONTROL_PARAMS)
    for p in init_ctrl:
        np.testing.assert_array_equal(init_ctrl[p], base_ctrl[p], err_msg=str(p))
    # main (LoRA): every non-LoRA parameter equals the control stage's, the LoRA B moved
    ctrl_all = _model_params(*stages["control"], nnx.Param)
    main_gd, main_st = stages["main"]
    main_nonlora = _model_params(main_gd, main_st, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert len(main_nonlora) == len(ctrl_all)
    for p, v in main_nonlora.items():
        q = tuple(k for k in p if k != "base")  # LoRA wraps a Linear as `.base`
        np.testing.assert_array_equal(v, ctrl_all[q], err_msg=str(p))
    lora_b = [
        v for p, v in _model_params(main_gd, main_st, M.LORA_PARAMS).items() if p[-1] == "lora_b"
    ]
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)
    # the trainable partition of each stage is exactly its filter
    for name, (gd, st) in stages.items():
        model = ctrain.merge_model(gd, st)
        want = set(_flat(nnx.state(model, T.trainable_filter(cfg, name))))
        assert set(_flat(st.params)) == want, name


def test_resume_equals_uninterrupted(cfg, data, tmp_path):
    # A stage stopped after 2 steps (as if killed after its checkpoint) and resumed to 4
    # ends bit-identical to a run of 4 steps in one go; both share the compiled step.
    short = override(cfg, ["train.base.steps=4"])

    def run(run_dir, steps):
        return T.train_stage(short, run_dir, "base", data, num_steps=steps, verbose=False)

    (_, straight), (gd, resumed) = assert_resume_bit_exact(
        run, tmp_path, kill_after=2, total=4, compare=lambda out: (out[1].params, out[1].opt_state)
    )
    assert int(resumed.step) == int(straight.step) == 4
    # fresh, resumed and restored-parent states share one sharding: one compiled program
    assert T.stage_step(short, "base", gd)._cache_size() == 1


def test_first_stage_on_8_devices_matches_one_device(cfg, data, cache_dir, tmp_path):
    # A few steps of the base stage with batch 8, once on 1 device and once data-parallel on 8
    # simulated devices (state replicated, one clip per device); the dataset comes from the
    # module's cache, so both runs see the same clips in the same order.
    # (one main block keeps the two subprocesses' compiles short; the data do not depend on it)
    overrides = _OVERRIDES + ["train.batch_size=8", "model.depth=1", "model.control_layers=(0,)"]
    code = """
from common.config import override
from spatia import config as C, datasets as D, train as T
from tests.multidevice import flat_params
cfg = override(C.tiny(), overrides)
gd, st = T.train_stage(cfg, run_dir, "base", D.load_dataset(cfg, cache_dir), num_steps=3,
                       verbose=False)
assert int(st.step) == 3
kernel = next(iter(jax.tree.leaves(st.params)))
assert kernel.sharding.mesh.size == jax.device_count() and kernel.sharding.is_fully_replicated
result = flat_params(st)
"""
    args = dict(overrides=overrides, cache_dir=str(cache_dir))
    ocfg = override(C.tiny(), overrides)  # the 1-device run: this process
    _, st = T.train_stage(
        ocfg, tmp_path / "one", "base", D.load_dataset(ocfg, cache_dir), num_steps=3, verbose=False
    )
    one = flat_params(st)
    eight = run_with_devices(8, code, run_dir=str(tmp_path / "eight"), **args)
    # float32 with matmul precision "highest": the 8-device step sums the per-device gradient
    # partials in another order, which moves the loss in its last bits; 3 Adam steps of lr 3e-3
    # keep the parameters within a few float32 ulps of the update size.
    assert_params_close(eight, one, rtol=1e-5, atol=1e-6)
