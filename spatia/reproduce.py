"""``python -m spatia reproduce``: train the staged generator, roll it out on closed loops and
write ``report.md`` + ``results.json`` with our numbers beside the paper's (Spatia Tables 3-7,
docs/spatia.md D16).

Steps (each resumable: the dataset is cached, every training stage is checkpointed):

1. training clips of the synthetic rooms (`spatia.datasets`), train + validation split;
2. stages base -> control -> main (+ the ablations main_proj, main_refs) (`spatia.train`);
3. closed-loop rollouts on held-out rooms (`spatia.pipeline.generate_video` with
   `spatia.pipeline.model_generate_clip`), scored by `spatia.metrics`:
   * Table 3 analogue: memory (full model) vs. no memory (base model) on 2-clip loops:
     PSNR_C / SSIM_C (first vs. last frame), geometric match accuracy, PSNR of revisited frames;
   * Table 4: projection / references on or off (none, proj, refs, both): camera score, PSNR_C,
     SSIM_C;
   * Table 5: number of references K (the full model evaluated with K slots valid);
   * Table 6: 2 / 4 / 6 clips with vs. without memory;
   * Table 7: memory voxel size vs. fidelity and memory size;
   * dynamic-object ghost test: rooms with a moving object, memory with vs. without dynamic
     masking: ghost pixels in the projection and PSNR on static pixels.
4. a frame strip of one closed loop (`loop_strip.png`).

``results.json`` holds ``table3``, ``table4`` = {none|proj|refs|both: {psnr_c, ssim_c,
camera_score}}, ``table5`` = {K: {...}}, ``table6`` = {memory|no_memory: {clips: psnr_c}} (plus
``table6_full`` with every metric), ``table7``, ``dynamic``, ``training``, ``paper`` and
``config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from common.config import to_dict, to_json
from common.metrics import read_metrics
from common.report import Report, StageClock, command_line
from common.rng import stream_key
from common.runtime import start_run_dir
from spatia import datasets as D
from spatia import memory as mem_lib
from spatia import metrics as sm
from spatia import pipeline as pl
from spatia import scenes, trajectories
from spatia import train as T
from spatia.config import SpatiaConfig
from spatia.paper import PAPER
from spatia.report import loop_strip, write_report

__all__ = [
    "VARIANTS",
    "Loop",
    "make_loops",
    "pipeline_config",
    "clip_instructions",
    "pad_references",
    "rollout_metrics",
    "model_generator",
    "evaluate_variant",
    "evaluate",
    "reproduce",
]

# ICP estimates with fewer inlier pairs are rejected (the threshold spatia.metrics applies).
_MIN_ICP_PAIRS = 12

# Table 4 variants: (training stage, projection on, references on).
VARIANTS = {
    "none": ("base", False, False),
    "proj": ("main_proj", True, False),
    "refs": ("main_refs", False, True),
    "both": ("main", True, True),
}


@dataclasses.dataclass(frozen=True)
class Loop:
    """A held-out closed loop: room, commanded cameras and the ground truth along them."""

    seed: int
    scene: scenes.Scene
    trajectory: pl.Trajectory
    gt_rgb: np.ndarray  # [T, H, W, 3]
    gt_depth: np.ndarray  # [T, H, W]
    gt_dynamic: np.ndarray  # [T, H, W] bool


def make_loops(cfg: SpatiaConfig, n_clips: int, *, dynamic: bool = False) -> list[Loop]:
    """Held-out out-and-back loops of 1 + n_clips * N frames (room seeds from `eval.seed`).

    The loop's extent (yaw_deg, dist_m) is fixed, so more clips sample the same path more finely.
    dynamic: rooms with one moving object (the ghost test), from a separate seed range.
    """
    e, m = cfg.eval, cfg.model
    H, W = m.frame_size
    n_frames = n_clips * m.num_target_frames
    n_out = -(-n_frames // 2)
    intr = D.intrinsics(cfg)
    count = e.dynamic_loops if dynamic else e.num_loops
    loops = []
    for i in range(count):
        seed = e.seed + (1000 if dynamic else 0) + i
        scene = scenes.make_scene(seed, n_dynamic=int(dynamic))
        w2c = trajectories.loop_trajectory(
            seed, n_out, scene=scene, kind=e.loop_kind, yaw_deg=e.yaw_deg, dist_m=e.dist_m
        )
        w2c = jnp.asarray(w2c[: n_frames + 1])
        fr = scenes.raycast_views(scene, w2c, intr, H, W)
        traj = pl.Trajectory(w2c, intr, H, W)
        loops.append(
            Loop(
                seed, scene, traj, np.asarray(fr.rgb), np.asarray(fr.depth), np.asarray(fr.dynamic)
            )
        )
    return loops


def pipeline_config(
    cfg: SpatiaConfig,
    *,
    projection: bool,
    references: bool,
    max_refs: int | None = None,
    voxel_s0: float | None = None,
    dynamic_masking: bool = True,
) -> pl.PipelineConfig:
    """The clip loop's settings, matching how the training clips were made."""
    m, d, e = cfg.model, cfg.data, cfg.eval
    H, W = m.frame_size
    return pl.PipelineConfig(
        clip_frames=m.num_target_frames,
        history_frames=m.num_prev_frames,
        max_refs=(m.max_refs if max_refs is None else max_refs) if references else 0,
        use_projection=projection,
        use_references=references,
        voxel=D.voxel_size(cfg, voxel_s0),
        # every pixel of every frame of the longest loop fits, so an update never overflows
        capacity=(1 + max(e.clips) * m.num_target_frames) * H * W,
        update=e.update,
        dynamic_masking=dynamic_masking,
        depth_source=e.depth_source,
        render_mode=d.render_mode,
        render_radius=d.splat_radius,
        ref_eps=d.retrieval_eps,
    )


def clip_instructions(w2c, clip_frames: int) -> list[int]:
    """Instruction id of each clip of a trajectory (the loop's schedule: clip r makes frames
    1 + r N .. (r + 1) N), from the camera motion between its history and its last frame."""
    w2c = np.asarray(w2c)
    t_n = w2c.shape[0]
    return [
        D.motion_instruction(w2c[first - 1], w2c[min(first + clip_frames, t_n) - 1])
        for first in range(1, t_n, clip_frames)
    ]


def pad_references(generate: pl.GenerateClip, k_model: int) -> pl.GenerateClip:
    """Pads the references a loop passes (K <= k_model slots, also none) with invalid slots to
    k_model, so every variant and every K of the K table shares one token layout (invalid
    references are masked out of attention: the result equals running without them)."""

    def wrapped(projection, hole_mask, references, history_frames, instruction, key, *, context):
        k = references.rgb.shape[0]
        if k < k_model:
            pad = k_model - k

            def padded(a, fill=0):
                a = jnp.asarray(a)
                return jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])

            references = pl.References(
                padded(references.rgb),
                padded(references.depth),
                jnp.concatenate([references.w2c, jnp.broadcast_to(jnp.eye(4), (pad, 4, 4))]),
                padded(references.valid, False),
                np.concatenate([references.frame_index, np.full((pad,), -1, np.int32)]),
            )
        return generate(
            projection, hole_mask, references, history_frames, instruction, key, context=context
        )

    return wrapped


def rollout_metrics(loop: Loop, result: pl.VideoResult, *, capacity: int) -> dict:
    """Closed-loop metrics of one rollout (docs/spatia.md D16): psnr_c, ssim_c, match_acc,
    psnr_revisit, ssim_revisit, psnr_all (mean over generated frames vs. ground truth),
    camera_score and the final memory size."""
    out = dict(sm.closed_loop_metrics(result.rgb))
    traj = loop.trajectory
    w2c = np.asarray(traj.w2c)
    acc, _, _ = sm.match_accuracy(
        result.rgb[0],
        result.rgb[-1],
        loop.gt_depth[0],
        loop.gt_depth[-1],
        w2c[0],
        w2c[-1],
        traj.intr,
        valid_i=~loop.gt_dynamic[0],
    )
    out["match_acc"] = acc
    revisited = sm.revisited_frames(w2c, result.clip_index)
    rev = sm.revisit_metrics(result.rgb, loop.gt_rgb, revisited)
    out["psnr_revisit"], out["ssim_revisit"] = rev["psnr_revisit"], rev["ssim_revisit"]
    out["psnr_all"] = float(np.mean(rev["psnr"][1:]))
    model = sm.scene_model(
        loop.gt_rgb, loop.gt_depth, w2c, traj.intr, loop.gt_dynamic, capacity=capacity
    )
    cam = sm.camera_control_error(
        model, result.depth[1:], w2c[1:], traj.intr, dynamic=result.dynamic[1:]
    )
    # choice: a frame whose depth ICP cannot align (too few pairs, so the estimate stays at the
    # commanded pose) counts as a failure with the maximum errors, not as a perfect frame.
    aligned = np.asarray(cam.n_pairs) >= _MIN_ICP_PAIRS
    rot = np.where(aligned, cam.rotation_deg, sm.ROTATION_ERROR_MAX_DEG)
    trans = np.where(aligned, cam.translation, sm.TRANSLATION_ERROR_MAX)
    out["camera_score"] = sm.camera_score(rot, trans)
    out["camera_aligned"] = float(np.mean(aligned))
    out["rotation_err_deg"] = float(np.mean(rot))
    out["translation_err_m"] = float(np.mean(trans))
    out["memory_points"] = int(result.memory_points[-1])
    return out


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def model_generator(cfg: SpatiaConfig, model) -> Callable[[Loop], pl.GenerateClip]:
    """The generator of a trained stage for every loop: `model_generate_clip` with the eval
    sampler, references padded to the model's K slots. model: (graphdef, state(s))."""
    e = cfg.eval
    sampler = pl.SamplerConfig(
        num_steps=e.sample_steps, method=e.sampler, guidance_scale=e.guidance_scale
    )
    gen = pad_references(pl.model_generate_clip(model, sampler), cfg.model.max_refs)
    return lambda loop: gen


def evaluate_variant(
    cfg: SpatiaConfig,
    generator: Callable[[Loop], pl.GenerateClip],
    loops: list[Loop],
    pcfg: pl.PipelineConfig,
    *,
    seed: int = 0,
    keep: bool = False,
):
    """Mean `rollout_metrics` over loops of the clip loop with `generator(loop)` (e.g.
    `model_generator`, or `spatia.pipeline.oracle_generate_clip` of the loop's scene); with keep
    also the `VideoResult`s."""
    rows, results = [], []
    for i, loop in enumerate(loops):
        gen = generator(loop)
        memory, start = pl.start_from_scene(loop.scene, loop.trajectory, pcfg)
        instr = clip_instructions(loop.trajectory.w2c, pcfg.clip_frames)
        res = pl.generate_video(
            memory,
            loop.trajectory,
            gen,
            pcfg,
            stream_key(seed, "rollout", i),
            start=start,
            scene=loop.scene,
            instructions=instr,
        )
        rows.append(rollout_metrics(loop, res, capacity=loop.gt_rgb[..., 0].size))
        if keep:
            results.append(res)
    return (_mean(rows), results) if keep else _mean(rows)


def _ghost_metrics(loop: Loop, result: pl.VideoResult) -> dict:
    """Ghosts: projection pixels of later clips that show a dynamic colour where the ground truth
    at that pose and time shows static scene; PSNR of generated frames on static pixels."""
    ghost = 0
    for r, rec in enumerate(result.clips):
        if r == 0:
            continue
        idx = np.concatenate([rec.history_index, rec.frame_index])
        proj = rec.projection[: len(idx)]
        shows_dyn = np.asarray(pl.dynamic_colour_mask(proj))
        ghost += int(np.sum(shows_dyn & ~loop.gt_dynamic[idx]))
    static = ~loop.gt_dynamic[1:]
    err = (result.rgb[1:] - loop.gt_rgb[1:]) ** 2
    mse = float(err[static].mean())
    mem = result.memory
    n = mem.count()
    dyn_points = int(np.sum(np.asarray(pl.dynamic_colour_mask(mem.rgb[:n])))) if n else 0
    return {
        "ghost_pixels": ghost,
        "dynamic_points_in_memory": dyn_points,
        "psnr_static": float(-10.0 * np.log10(max(mse, 1e-12))),
    }


def _stage_model(cfg: SpatiaConfig, stages: dict, name: str):
    gd, st = stages[name]
    return model_generator(cfg, (gd, (st.params, st.frozen)))


def evaluate(cfg: SpatiaConfig, stages: dict, *, verbose: bool = True) -> dict:
    """Every evaluation table (module docstring) from the trained stages {name: (gd, state)}."""
    e, m = cfg.eval, cfg.model
    log = (lambda s: print(f"[eval] {s}", flush=True)) if verbose else (lambda s: None)
    variants = {k: v for k, v in VARIANTS.items() if v[0] in stages}
    out: dict = {}
    base_clips = e.clips[0]
    loops = make_loops(cfg, base_clips)

    rollouts = {}
    t4 = {}
    for name, (stage, proj, refs) in variants.items():
        pcfg = pipeline_config(cfg, projection=proj, references=refs)
        t4[name], rollouts[name] = evaluate_variant(
            cfg, _stage_model(cfg, stages, stage), loops, pcfg, keep=True
        )
        log(f"table 4 {name}: {t4[name]['psnr_c']:.2f} dB, camera {t4[name]['camera_score']:.1f}")
    out["table4_full"] = t4
    out["table4"] = {
        k: {f: v[f] for f in ("psnr_c", "ssim_c", "camera_score")} for k, v in t4.items()
    }
    out["table3"] = {"no_memory": t4["none"], "memory": t4["both"]}

    t5 = {}
    for k in e.ks:
        pcfg = pipeline_config(cfg, projection=True, references=k > 0, max_refs=k)
        t5[k] = (
            t4["both"]
            if k == m.max_refs
            else evaluate_variant(cfg, _stage_model(cfg, stages, "main"), loops, pcfg)
        )
        log(f"table 5 K={k}: {t5[k]['psnr_c']:.2f} dB")
    out["table5"] = t5

    t6 = {"memory": {base_clips: t4["both"]}, "no_memory": {base_clips: t4["none"]}}
    for n_clips in e.clips[1:]:
        longer = make_loops(cfg, n_clips)
        for key, name in (("memory", "both"), ("no_memory", "none")):
            stage, proj, refs = VARIANTS[name]
            pcfg = pipeline_config(cfg, projection=proj, references=refs)
            t6[key][n_clips] = evaluate_variant(cfg, _stage_model(cfg, stages, stage), longer, pcfg)
        log(
            f"table 6 {n_clips} clips: memory {t6['memory'][n_clips]['psnr_c']:.2f} dB, "
            f"no memory {t6['no_memory'][n_clips]['psnr_c']:.2f} dB"
        )
    out["table6_full"] = t6
    out["table6"] = {k: {c: v["psnr_c"] for c, v in rows.items()} for k, rows in t6.items()}

    t7 = {}
    for v in e.voxels_s0:
        pcfg = pipeline_config(cfg, projection=True, references=True, voxel_s0=v)
        row = evaluate_variant(cfg, _stage_model(cfg, stages, "main"), loops, pcfg)
        row["voxel_m"] = pcfg.voxel
        row["memory_bytes"] = row["memory_points"] * mem_lib.bytes_per_point()
        t7[v] = row
        log(f"table 7 voxel {v} s0: {row['psnr_all']:.2f} dB, {row['memory_points']:.0f} points")
    out["table7"] = t7

    if e.dynamic_loops:
        dyn_loops = make_loops(cfg, base_clips, dynamic=True)
        dyn = {}
        for masking in (True, False):
            pcfg = pipeline_config(cfg, projection=True, references=True, dynamic_masking=masking)
            summary, results = evaluate_variant(
                cfg, _stage_model(cfg, stages, "main"), dyn_loops, pcfg, keep=True
            )
            ghosts = _mean(
                [_ghost_metrics(lp, r) for lp, r in zip(dyn_loops, results, strict=True)]
            )
            dyn["masked" if masking else "unmasked"] = {**ghosts, "psnr_c": summary["psnr_c"]}
        out["dynamic"] = dyn
        log(
            f"dynamic: ghost pixels masked {dyn['masked']['ghost_pixels']:.1f}, "
            f"unmasked {dyn['unmasked']['ghost_pixels']:.1f}"
        )
    out["_strip"] = (loops[0], {k: rollouts[k][0] for k in ("none", "both") if k in rollouts})
    return out


# --------------------------------------------------------------------------- orchestration


def _training_summary(cfg: SpatiaConfig, run_dir, stages: dict, val: dict | None) -> dict:
    out = {}
    for name, (gd, st) in stages.items():
        recs = read_metrics(T.stage_dir(run_dir, name) / "metrics.jsonl")
        losses = [r["loss"] for r in recs if "loss" in r and isinstance(r["loss"], float)]
        row = {"steps": int(st.step), "final_train_loss": losses[-1] if losses else None}
        if val is not None:
            row["val_loss"] = T.validation_loss(cfg, gd, st, name, val)
        out[name] = row
    return out


def _json_form(results: dict) -> dict:
    """`results` as it reads back from JSON (numbers as Python floats/ints, every key a str),
    so a fresh evaluation and one loaded from its cache give the report the same dict."""
    return json.loads(json.dumps(results, default=lambda x: np.asarray(x).tolist()))


def _config_hash(cfg: SpatiaConfig) -> str:
    return hashlib.sha1(to_json(cfg).encode()).hexdigest()[:12]


def _train_stages(cfg: SpatiaConfig, run_dir, data, clock: StageClock, verbose: bool) -> dict:
    """Trains (resuming) or loads every stage; {name: (graphdef, state)}.

    A stage's training is a cached result (`train-<steps>.json` in its directory, holding the
    compute seconds), so a rerun that only loads the checkpoint still counts its training time.
    """
    stages = {}
    for name in T.stage_order(cfg):
        steps = T.stage_steps(cfg, name)
        path = T.stage_dir(run_dir, name) / f"train-{steps}.json"
        if path.exists() and not T.is_trained(cfg, run_dir, name):
            path.unlink()  # its checkpoints were removed: the stage trains again
        trained = {}

        def train(name=name, steps=steps, trained=trained):
            if verbose:
                print(f"[train] stage {name}: training ({steps} steps)", flush=True)
            trained[name] = T.train_stage(cfg, run_dir, name, data, verbose=verbose)
            return {"steps": int(trained[name][1].step)}

        clock.cached(f"train {name}", path, train)
        if name in trained:
            stages[name] = trained[name]
        else:
            if verbose:
                print(f"[train] stage {name}: done, loading ({steps} steps)", flush=True)
            stages[name] = T.load_stage(cfg, run_dir, name)
    return stages


def reproduce(
    cfg: SpatiaConfig, run_dir, *, preset: str | None = None, verbose: bool = True
) -> dict:
    """Data -> staged training (resuming) -> closed-loop evaluation -> report.md + results.json.

    Every expensive step is resumable or cached: the datasets (`spatia.datasets`), each stage's
    checkpoints and training time, and the evaluation (``eval-<config hash>.json``, which also
    holds its compute seconds), so a rerun rebuilds the report from caches and its provenance
    still states the compute time of every stage. Returns the results dict of ``results.json``.
    """
    t0 = time.time()
    run_dir = start_run_dir(run_dir, cfg)
    clock = StageClock()
    report = Report(
        f"Spatia on synthetic rooms ({preset or 'custom'} preset)", command=command_line()
    )
    with clock.stage("data"):
        data = D.load_dataset(cfg, run_dir / "data", "train", verbose=verbose)
        val = (
            D.load_dataset(cfg, run_dir / "data", "val", verbose=verbose)
            if cfg.data.val_scenes
            else None
        )
    stages = _train_stages(cfg, run_dir, data, clock, verbose)
    with clock.stage("validation"):
        results = {"training": _training_summary(cfg, run_dir, stages, val)}

    def run_evaluation():
        ev = evaluate(cfg, stages, verbose=verbose)
        loop, strip = ev.pop("_strip")
        loop_strip(run_dir / "loop_strip.png", loop, strip)
        return _json_form(ev)

    results.update(
        clock.cached("evaluate", run_dir / f"eval-{_config_hash(cfg)}.json", run_evaluation)
    )
    results["paper"] = PAPER
    results["config"] = to_dict(cfg)
    write_report(cfg, results, report, preset)
    report.write(run_dir, results, clock=clock)
    if verbose:
        print(
            f"[reproduce] wrote {run_dir / 'report.md'} and results.json in "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
    return results
