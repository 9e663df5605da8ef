"""Tests of spatia.pipeline: the clip loop with oracle, noisy-oracle and tiny-model generators.

All runs use 16 x 16 frames, clips of N = 4 new frames and M = 1 history frame, so the renderer,
ray caster and memory update each compile once for the module.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spatia import flow, metrics, scenes, slam, trajectories
from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import model as M
from spatia import pipeline as pl
from spatia.model_config import tiny

HW = 16
CFG = pl.PipelineConfig(
    clip_frames=4, history_frames=1, max_refs=2, voxel=0.05, capacity=4096, depth_source="oracle"
)


@pytest.fixture(scope="module")
def world():
    """Room 6 (static, and with two movers) and a 9-pose yaw loop: two clips of 4 new frames."""
    intr = geo.intrinsics_from_fov(HW, HW, 75.0)
    static = scenes.make_scene(6, n_dynamic=0)
    loop = jnp.asarray(trajectories.loop_trajectory(1, 4, scene=static, kind="yaw"))
    return dict(
        static=static,
        dynamic=scenes.make_scene(6, n_dynamic=2),
        intr=intr,
        loop=loop,
        traj=pl.Trajectory(loop, intr, HW, HW),
    )


def _recording(gen, calls):
    """Wraps a generator and records what the loop passes to it."""

    def wrapped(projection, hole_mask, references, history_frames, instruction, key, *, context):
        calls.append(
            dict(
                projection=np.asarray(projection),
                hole=np.asarray(hole_mask),
                refs=references,
                history=np.asarray(history_frames),
                instruction=instruction,
                context=context,
            )
        )
        return gen(
            projection, hole_mask, references, history_frames, instruction, key, context=context
        )

    return wrapped


def _run(world, cfg, gen=None, scene=None, **kw):
    scene = world["static"] if scene is None else scene
    traj = kw.pop("traj", world["traj"])
    memory, start = pl.start_from_scene(scene, traj, cfg)
    gen = pl.oracle_generate_clip(scene) if gen is None else gen
    return pl.generate_video(
        memory, traj, gen, cfg, jax.random.key(0), start=start, scene=scene, **kw
    )


def test_oracle_closed_loop_is_exact_and_memory_stops_growing(world):
    # out and back twice: 17 poses, 4 clips; clips 1-3 only revisit poses seen before
    loop = world["loop"]
    traj = pl.Trajectory(jnp.concatenate([loop, loop[1:]]), world["intr"], HW, HW)
    res = _run(world, CFG, traj=traj)
    gt = scenes.raycast_views(world["static"], traj.w2c, world["intr"], HW, HW)
    np.testing.assert_allclose(res.rgb, gt.rgb, atol=1e-6)
    closed = metrics.closed_loop_metrics(res.rgb)
    assert closed["psnr_c"] > 40 and closed["ssim_c"] > 0.99
    np.testing.assert_array_equal(res.clip_index, [-1] + [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    counts = res.memory_points
    assert len(counts) == 5 and counts[1] > counts[0]  # the sweep reveals new surfaces
    # revisits land in occupied voxels: bounded, and exactly constant on this fixed world grid
    assert counts[2] == counts[3] == counts[4] == counts[1] < CFG.capacity
    # the official per-round rebuild from all frames gives the same memory size
    rebuilt = _run(world, dataclasses.replace(CFG, update="rebuild"), traj=traj)
    assert rebuilt.memory_points[-1] == counts[-1]


def test_switching_off_projection_and_references(world):
    calls_off, calls_on = [], []
    off = dataclasses.replace(CFG, use_projection=False, use_references=False)
    res_off = _run(world, off, gen=_recording(pl.oracle_generate_clip(world["static"]), calls_off))
    res_on = _run(
        world,
        CFG,
        gen=_recording(pl.oracle_generate_clip(world["static"]), calls_on),
        instructions=[2, 3],
    )
    assert len(calls_off) == len(calls_on) == 2
    for c in calls_off:  # empty projections: black, hole everywhere; no valid reference
        assert c["projection"].shape == (5, HW, HW, 3) and c["hole"].shape == (5, HW, HW)
        assert np.all(c["projection"] == 0) and np.all(c["hole"] == 1)
        assert not np.any(np.asarray(c["refs"].valid)) and np.all(c["refs"].frame_index == -1)
        assert c["instruction"] is None
    assert [c["instruction"] for c in calls_on] == [2, 3]
    # with projection: the start frame's memory covers most of the history view (pose 0)
    assert np.mean(calls_on[0]["hole"][0] < 0.5) > 0.8
    # clip 1's references are earlier frames, before its history frame (4), shown as generated
    refs = calls_on[1]["refs"]
    valid = np.asarray(refs.valid)
    assert valid.any() and refs.rgb.shape == (2, HW, HW, 3)
    fi = refs.frame_index[valid]
    assert np.all((fi >= 0) & (fi < 4))
    np.testing.assert_array_equal(np.asarray(refs.rgb)[valid], res_on.rgb[fi])
    np.testing.assert_array_equal(calls_on[1]["history"][0], res_on.rgb[4])
    # the generator output does not depend on the conditions (oracle): same video both ways
    np.testing.assert_allclose(res_off.rgb, res_on.rgb, atol=1e-6)


def test_dynamic_masking_keeps_movers_out_of_memory(world):
    scene = world["dynamic"]

    def near_reserved(memory):  # static colours (and their voxel means) are >= 0.15 away
        rgb = np.asarray(memory.rgb)[np.asarray(memory.valid)]
        d = np.abs(rgb[:, None, :] - scenes.RESERVED_COLOURS[None]).max(-1).min(-1)
        return int(np.sum(d < 0.15))

    masked = _run(world, CFG, scene=scene)
    assert masked.dynamic.sum() > 20  # the movers are in view, and flagged
    assert near_reserved(masked.memory) == 0
    unmasked = _run(world, dataclasses.replace(CFG, dynamic_masking=False), scene=scene)
    assert not unmasked.dynamic.any() and near_reserved(unmasked.memory) > 0
    # the colour key equals the ray caster's object mask on clean renders
    oracle = _run(world, dataclasses.replace(CFG, mask_source="oracle"), scene=scene)
    np.testing.assert_array_equal(oracle.dynamic, masked.dynamic)


def test_edit_memory_hook_reaches_projection_and_output(world):
    colour = np.array([0.2, 0.6, 0.3], np.float32)
    seen = []

    def recolour_all(memory, clip_index):
        seen.append(clip_index)
        if clip_index < 1:
            return memory
        return mem_lib.recolour(memory, memory.valid, colour)

    calls = []
    gen = _recording(pl.noisy_oracle_generate_clip(world["static"]), calls)
    res = _run(
        world, dataclasses.replace(CFG, depth_source="generator"), gen=gen, edit_memory=recolour_all
    )
    assert seen == [0, 1]
    proj, hole = calls[1]["projection"], calls[1]["hole"]
    # soft splats of one colour: premultiplied colour = colour * coverage
    np.testing.assert_allclose(proj, colour * (1 - hole[..., None]), atol=1e-5)
    assert not np.allclose(
        calls[0]["projection"], colour * (1 - calls[0]["hole"][..., None]), atol=1e-2
    )
    # the regenerated frames copy the edited memory where it covers them (up to hole * noise)
    covered = hole[1:] < 1e-3
    assert covered.sum() > 100
    np.testing.assert_allclose(
        res.rgb[5:9][covered], np.broadcast_to(colour, (int(covered.sum()), 3)), atol=1e-3
    )


def test_noisy_oracle_degrades_without_conditioning(world):
    gen = pl.noisy_oracle_generate_clip(world["static"])
    gt = scenes.raycast_views(world["static"], world["loop"], world["intr"], HW, HW)
    base = dataclasses.replace(CFG, depth_source="generator")
    scores = {}
    for name, proj, refs in [("none", False, False), ("proj", True, False), ("both", True, True)]:
        res = _run(
            world, dataclasses.replace(base, use_projection=proj, use_references=refs), gen=gen
        )
        rev = metrics.revisited_frames(res.w2c, res.clip_index)
        scores[name] = metrics.revisit_metrics(res.rgb, gt.rgb, rev)["psnr_revisit"]
    assert scores["none"] + 3 < scores["proj"] < scores["both"], scores


def test_icp_refinement_keeps_exact_frames_at_the_commanded_pose(world):
    res = _run(world, dataclasses.replace(CFG, refine_poses=True))
    rot, dist = np.asarray(slam.pose_error(res.w2c, res.commanded_w2c))
    assert rot.max() < 0.2 and dist.max() < 0.01


def test_model_adapter_runs_the_loop_end_to_end(world):
    # an RGB-D tiny model (random weights) drives two clips with its own depth
    mcfg = dataclasses.replace(tiny(), channels=4, depth=2, control_layers=(0, 1))
    model = M.VideoDiT(mcfg, rngs=nnx.Rngs(0))
    sampler = pl.SamplerConfig(num_steps=1, method="euler", guidance_scale=1.0)
    calls = []
    gen = _recording(pl.model_generate_clip(model, sampler), calls)
    cfg = pl.pipeline_config_for_model(mcfg, CFG, depth_source="generator")
    res = _run(world, cfg, gen=gen, instructions=1)
    assert res.rgb.shape == (9, HW, HW, 3) and np.isfinite(res.rgb).all()
    assert res.rgb.min() >= 0 and res.rgb.max() <= 1
    lo, hi = pl.DEPTH_RANGE
    assert np.all((res.depth[1:] >= lo * 0.999) & (res.depth[1:] <= hi * 1.001))
    assert res.memory_points[-1] > res.memory_points[0]
    assert np.asarray(calls[1]["refs"].valid).any()
    # the adapter's output is flow.sample on the documented batch (B = 1, depth as 4th channel)
    c, ctx = calls[1], calls[1]["context"]
    enc = lambda rgb, d: jnp.concatenate([jnp.asarray(rgb), pl.encode_depth(d)[..., None]], -1)[
        None
    ]
    cond = dict(
        prev=enc(c["history"], ctx.history_depth),
        refs=enc(c["refs"].rgb, c["refs"].depth),
        ref_valid=jnp.asarray(c["refs"].valid)[None],
        proj=enc(c["projection"], ctx.projection_depth),
        hole=jnp.asarray(c["hole"])[None, ..., None],
        instruction=jnp.array([1], jnp.int32),
    )
    gd, st = nnx.split(model)
    key = jax.random.split(jax.random.key(0), 2)[1]
    out = flow.sample(gd, st, cond, key, 1, num_frames=4, method="euler", guidance_scale=1.0)[
        "frames"
    ][0]
    np.testing.assert_allclose(res.rgb[5:9], np.clip(out[..., :3], 0, 1), atol=1e-5)
    np.testing.assert_allclose(res.depth[5:9], pl.decode_depth(out[..., 3]), rtol=1e-5)


def test_config_and_input_errors(world):
    with pytest.raises(ValueError, match="history_frames"):
        pl.PipelineConfig(history_frames=0)
    with pytest.raises(ValueError, match="depth_source"):
        pl.PipelineConfig(depth_source="lidar")
    memory, start = pl.start_from_scene(world["static"], world["traj"], CFG)
    with pytest.raises(ValueError, match="need the scene"):
        pl.generate_video(
            memory,
            world["traj"],
            pl.oracle_generate_clip(world["static"]),
            CFG,
            jax.random.key(0),
            start=start,
        )
    rgb_only = dataclasses.replace(CFG, depth_source="generator")

    def no_depth(projection, hole_mask, references, history_frames, instruction, key, *, context):
        return jnp.zeros((4, HW, HW, 3)), None

    with pytest.raises(ValueError, match="start frame"):
        pl.generate_video(memory, world["traj"], no_depth, rgb_only, jax.random.key(0))
    with pytest.raises(ValueError, match="no depth"):
        pl.generate_video(memory, world["traj"], no_depth, rgb_only, jax.random.key(0), start=start)


def test_depth_encoding_round_trip():
    d = jnp.array([0.0, 0.1, 0.5, 3.0, 16.0])
    x = pl.encode_depth(d)
    assert float(x[0]) == 0.0 and float(x[-1]) == pytest.approx(1.0)
    np.testing.assert_allclose(pl.decode_depth(x)[1:], d[1:], rtol=1e-5)
