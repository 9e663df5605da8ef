"""Spatia's clip loop (Spatia §3.2, docs/spatia.md D1, D15), independent of the video generator.

`generate_video` produces a video along a commanded camera trajectory, one clip at a time::

    video[0] = start frame (its static pixels usually initialise the memory: `start_from_scene`)
    for clip r = 0, 1, ...:                       (frames 1 + rN .. rN + N of the trajectory)
        memory          = edit_memory(memory, r)                     # optional hook (3-D editing)
        proj, hole      = render(memory, poses of history + targets)  # scene projection video
        refs            = retrieve(memory, target poses, earlier frames, K)
        history         = last M frames of the video
        rgb, depth      = generate_clip(proj, hole, refs, history, instruction_r, key_r,
                                        context=ClipContext(...))
        memory          = update(memory, static pixels of rgb with depth at the (ICP-refined) poses)

The generator is any callable with that signature (see `GenerateClip`): `model_generate_clip`
wraps a `spatia.model.VideoDiT` and `spatia.flow.sample`; `oracle_generate_clip` returns
ground-truth renders (tests, upper bound); `noisy_oracle_generate_clip` is a cheap stand-in for a
trained model whose output degrades when a condition is missing.

Switches of `PipelineConfig` give the ablations of Table 4 (``use_projection`` /
``use_references``: none, proj, refs, both), Table 5 (``max_refs``), Table 7 (``voxel``) and the
dynamic-masking test of docs/spatia.md D16 (``dynamic_masking``). Camera control is the
trajectory itself; 3-D editing goes through the same loop via ``edit_memory``, e.g. removing a
prop from the world before the second clip::

    from spatia import memory as mem_lib

    def remove_prop(memory, clip_index):
        if clip_index < 1:
            return memory
        box = mem_lib.box_mask(memory, lo=(1.0, -0.5, 0.0), hi=(2.0, 0.5, 1.5))
        return mem_lib.delete(memory, box)

    memory, start = start_from_scene(scene, traj, cfg)
    result = generate_video(memory, traj, generate_clip, cfg, key, start=start,
                            edit_memory=remove_prop)

The hook runs before each clip's projection is rendered, so an edit made for clip r is in the
projection of clip r and of every later clip (it is re-applied after a ``update="rebuild"``).

The loop over clips is Python; rendering, retrieval's visibility sets, memory updates, ICP and
sampling are jitted functions with static shapes (the last clip is padded to N frames by repeating
the final pose, like the official code; padded frames never enter the video or the memory).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import require
from spatia import flow, metrics, retrieval, scenes, slam
from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import render as rnd

__all__ = [
    "DEPTH_RANGE",
    "PipelineConfig",
    "pipeline_config_for_model",
    "Trajectory",
    "StartFrame",
    "References",
    "ClipContext",
    "ClipRecord",
    "VideoResult",
    "GenerateClip",
    "SamplerConfig",
    "encode_depth",
    "decode_depth",
    "dynamic_colour_mask",
    "start_from_scene",
    "initial_memory",
    "generate_video",
    "model_generate_clip",
    "oracle_generate_clip",
    "noisy_oracle_generate_clip",
]

# Log-depth normalisation of an RGB-D generator's 4th channel (docs/spatia.md D6), metres.
DEPTH_RANGE = (0.1, 16.0)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of the clip loop.

    clip_frames (N): new frames per clip. history_frames (M): last frames of the video passed to
      the generator (round 0: the start frame, repeated if M > 1).
    max_refs (K): reference slots (always K arrays; unused slots have valid = False).
    use_projection / use_references: off = the generator gets an empty projection (zeros, hole
      1 everywhere) / no valid reference.
    voxel: memory voxel in metres (None keeps every pixel); capacity: memory slots.
    update: "incremental" (add the new frames, re-voxelise; paper wording) or "rebuild" (rebuild
      from every frame with known depth so far; the official code).
    dynamic_masking: keep dynamic pixels out of memory; mask_source "colour_key" (pixels within
      ``colour_key_tol`` (L-inf) of a reserved colour of `spatia.scenes`: the SAM2 stand-in) or
      "oracle" (the ray caster's dynamic mask at the commanded pose; needs the scene).
    depth_source: "generator" (the generator's depth output) or "oracle" (ray-cast depth at the
      commanded pose: upper bound; needs the scene).
    refine_poses: align each new frame to the memory by ICP before inserting it (else the
      commanded pose is used, as in the official code); icp_damping: its Levenberg damping
      (1.0, as `spatia.metrics.CAMERA_ICP`: pins directions a planar view cannot observe).
    render_mode / render_radius / render_k: `spatia.render` settings of the projection video.
    ref_target_stride / ref_cand_stride / ref_eps / ref_method: retrieval (`spatia.retrieval`):
      targets are every s-th new frame, candidates every s-th frame before the history.
    """

    clip_frames: int = 4
    history_frames: int = 1
    max_refs: int = 2
    use_projection: bool = True
    use_references: bool = True
    voxel: float | None = 0.05
    capacity: int = 32768
    update: str = "incremental"
    dynamic_masking: bool = True
    mask_source: str = "colour_key"
    colour_key_tol: float = 0.1
    depth_source: str = "generator"
    refine_poses: bool = False
    icp_damping: float = 1.0
    render_mode: str = "soft"
    render_radius: float = 1.5
    render_k: int = 5
    ref_target_stride: int = 2
    ref_cand_stride: int = 1
    ref_eps: float = 0.0
    ref_method: str = "hungarian"

    def __post_init__(self):
        req = functools.partial(require, self)
        req("clip_frames", self.clip_frames >= 1, ">= 1")
        req(
            "history_frames",
            self.history_frames >= 1,
            ">= 1 (round 0 conditions on the start frame)",
        )
        req("max_refs", self.max_refs >= 0, ">= 0")
        req("voxel", self.voxel is None or self.voxel > 0, "> 0 or None")
        req("capacity", self.capacity >= 1, ">= 1")
        req("update", self.update in ("incremental", "rebuild"), "'incremental' or 'rebuild'")
        req("mask_source", self.mask_source in ("colour_key", "oracle"), "'colour_key' or 'oracle'")
        req(
            "colour_key_tol",
            0 <= self.colour_key_tol < 0.15,
            "in [0, 0.15) (static colours are >= 0.15 from every reserved colour)",
        )
        req("depth_source", self.depth_source in ("generator", "oracle"), "'generator' or 'oracle'")
        req("render_mode", self.render_mode in rnd.MODES, f"one of {rnd.MODES}")
        req(
            "render_radius",
            self.render_mode == "point" or self.render_radius > 0,
            f"> 0 for render_mode {self.render_mode!r}",
        )
        req("ref_target_stride", self.ref_target_stride >= 1, ">= 1")
        req("ref_cand_stride", self.ref_cand_stride >= 1, ">= 1")
        req("icp_damping", self.icp_damping >= 0, ">= 0")
        req("ref_method", self.ref_method in ("hungarian", "greedy"), "'hungarian' or 'greedy'")


def pipeline_config_for_model(
    model_config, base: PipelineConfig | None = None, **overrides
) -> PipelineConfig:
    """A `PipelineConfig` whose N, M and K are the model's (``num_target_frames``,
    ``num_prev_frames``, ``max_refs``), starting from ``base`` (default `PipelineConfig()`).

    For pixel-space models (the tiny and small presets); a latent model counts latent frames, so
    its loop needs the pixel counts instead (the paper preset: 72 / 9 / 7)."""
    base = PipelineConfig() if base is None else base
    fields = dict(
        clip_frames=model_config.num_target_frames,
        history_frames=model_config.num_prev_frames,
        max_refs=model_config.max_refs,
    )
    return dataclasses.replace(base, **{**fields, **overrides})


class Trajectory(NamedTuple):
    """Commanded cameras: w2c [T, 4, 4] OpenCV, intr [4] pixels, image size, and the scene time of
    each frame (times [T] or None = frame index; only oracle generators use it)."""

    w2c: jnp.ndarray
    intr: jnp.ndarray
    height: int
    width: int
    times: jnp.ndarray | None = None


class StartFrame(NamedTuple):
    """Frame 0 of the video: rgb [H, W, 3] in [0, 1]; depth [H, W] metric z or None; dynamic
    [H, W] bool or None."""

    rgb: jnp.ndarray
    depth: jnp.ndarray | None = None
    dynamic: jnp.ndarray | None = None


class References(NamedTuple):
    """K reference slots: rgb [K, H, W, 3] (zeros where invalid), depth [K, H, W] (0 where unknown),
    w2c [K, 4, 4] (pose used for the frame), valid [K] bool, frame_index [K] int32 (-1 where
    invalid)."""

    rgb: jnp.ndarray
    depth: jnp.ndarray
    w2c: jnp.ndarray
    valid: jnp.ndarray
    frame_index: np.ndarray


class ClipContext(NamedTuple):
    """What a generator may need besides the paper's conditions.

    clip_index; frame_index int [M + N] (history then targets; padded targets repeat the last
    frame); n_history (M); n_valid (real target frames, <= N); w2c [M + N, 4, 4] commanded
    cameras; intr [4]; times [M + N]; history_depth [M, H, W] (0 where unknown);
    projection_depth [M + N, H, W] (depth of the nearest memory point, 0 in holes).
    """

    clip_index: int
    frame_index: np.ndarray
    n_history: int
    n_valid: int
    w2c: jnp.ndarray
    intr: jnp.ndarray
    times: jnp.ndarray
    history_depth: jnp.ndarray
    projection_depth: jnp.ndarray

    @property
    def target_w2c(self) -> jnp.ndarray:
        return self.w2c[self.n_history :]

    @property
    def target_times(self) -> jnp.ndarray:
        return self.times[self.n_history :]


class GenerateClip(Protocol):
    """``(projection [M+N, H, W, 3], hole_mask [M+N, H, W] (1 = no memory), references,
    history_frames [M, H, W, 3], instruction int | None, key, *, context) -> (rgb [N, H, W, 3]
    float32 in [0, 1], depth [N, H, W] metric z or None)``."""

    def __call__(
        self,
        projection,
        hole_mask,
        references: References,
        history_frames,
        instruction,
        key,
        *,
        context: ClipContext,
    ): ...


class ClipRecord(NamedTuple):
    """One clip of a run: target frame indices (real frames only), history indices, the
    projection [M+N, H, W, 3] and hole mask [M+N, H, W] passed to the generator, the references,
    the memory size after the update and the points that did not fit (0 unless overflow)."""

    frame_index: np.ndarray
    history_index: np.ndarray
    projection: np.ndarray
    hole: np.ndarray
    references: References
    memory_points: int
    n_overflow: int


class VideoResult(NamedTuple):
    """Output of `generate_video`.

    rgb [T, H, W, 3] float32; depth [T, H, W] (0 = unknown); dynamic [T, H, W] bool (pixels kept
    out of memory); commanded_w2c [T, 4, 4]; w2c [T, 4, 4] (poses used for the memory: commanded
    or ICP-refined); clip_index int [T] (-1 = start frame); memory: the final `PointMemory`;
    memory_points: list, points before the first clip and after each clip; clips: `ClipRecord`s.
    """

    rgb: np.ndarray
    depth: np.ndarray
    dynamic: np.ndarray
    commanded_w2c: np.ndarray
    w2c: np.ndarray
    clip_index: np.ndarray
    memory: mem_lib.PointMemory
    memory_points: list
    clips: list


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


@jax.jit
def encode_depth(depth) -> jnp.ndarray:
    """Metric depth [...] -> log-depth channel in [0, 1] over `DEPTH_RANGE` (0 where depth <= 0)."""
    lo, hi = DEPTH_RANGE
    depth = jnp.asarray(depth, jnp.float32)
    x = jnp.log(jnp.clip(depth, lo, hi) / lo) / math.log(hi / lo)
    return jnp.where(depth > 0, x, 0.0)


@jax.jit
def decode_depth(channel) -> jnp.ndarray:
    """Inverse of `encode_depth` (the channel is clipped to [0, 1] first) -> metric depth [...]."""
    lo, hi = DEPTH_RANGE
    return lo * jnp.exp(jnp.clip(jnp.asarray(channel, jnp.float32), 0.0, 1.0) * math.log(hi / lo))


@jax.jit
def dynamic_colour_mask(rgb, tol=0.1) -> jnp.ndarray:
    """Pixels within ``tol`` (L-inf) of a reserved moving-object colour: rgb [..., 3] -> [...].

    Static colours of `spatia.scenes` lie in [0.05, 0.85] per channel and every reserved colour
    has a channel equal to 1, so tol < 0.15 never flags a static pixel of a clean render.
    Returns a bool mask.
    """
    rgb = jnp.asarray(rgb, jnp.float32)
    cols = jnp.asarray(scenes.RESERVED_COLOURS)
    dist = jnp.max(jnp.abs(rgb[..., None, :] - cols), axis=-1)
    return jnp.any(dist <= tol, axis=-1)


def _check_trajectory(traj: Trajectory):
    w2c = jnp.asarray(traj.w2c, jnp.float32)
    if w2c.ndim != 3 or w2c.shape[1:] != (4, 4) or w2c.shape[0] < 2:
        raise ValueError(f"trajectory.w2c must be [T >= 2, 4, 4], got {w2c.shape}")
    intr = jnp.asarray(traj.intr, jnp.float32)
    if intr.shape != (4,):
        raise ValueError(f"trajectory.intr must be [4] = (fx, fy, cx, cy), got {intr.shape}")
    t_n = w2c.shape[0]
    times = (
        jnp.arange(t_n, dtype=jnp.float32)
        if traj.times is None
        else jnp.asarray(traj.times, jnp.float32)
    )
    if times.shape != (t_n,):
        raise ValueError(f"trajectory.times must be [T={t_n}], got {times.shape}")
    return w2c, intr, times


def initial_memory(start: StartFrame, w2c0, intr, cfg: PipelineConfig) -> mem_lib.PointMemory:
    """Memory from the static pixels of the start frame (needs ``start.depth``)."""
    if start.depth is None:
        raise ValueError("initial_memory: the start frame has no depth")
    dyn = (
        None
        if (start.dynamic is None or not cfg.dynamic_masking)
        else jnp.asarray(start.dynamic)[None]
    )
    mem, _ = mem_lib.build_memory(
        jnp.asarray(start.rgb)[None],
        jnp.asarray(start.depth)[None],
        jnp.asarray(w2c0, jnp.float32)[None],
        intr,
        dyn,
        capacity=cfg.capacity,
        voxel=cfg.voxel,
    )
    return mem


def start_from_scene(scene: scenes.Scene, traj: Trajectory, cfg: PipelineConfig):
    """Ground-truth start frame at the first pose (scene time ``times[0]``) and the memory built
    from its static pixels. Returns (PointMemory, StartFrame)."""
    w2c, intr, times = _check_trajectory(traj)
    fr = scenes.raycast(scene, w2c[0], intr, traj.height, traj.width, times[0])
    start = StartFrame(fr.rgb, fr.depth, fr.dynamic)
    return initial_memory(start, w2c[0], intr, cfg), start


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _clip_schedule(t_n: int, n: int, m: int):
    """Per clip: (target indices padded to N, number of real targets, history indices [M])."""
    out = []
    for first in range(1, t_n, n):
        real = np.arange(first, min(first + n, t_n))
        tgt = np.concatenate([real, np.full(n - len(real), real[-1])])
        hist = np.maximum(np.arange(first - m, first), 0)  # before frame 0: repeat the start frame
        out.append((tgt, len(real), hist))
    return out


def _render(memory, w2c, intr, h, w, cfg: PipelineConfig):
    out = rnd.render_views(
        memory.xyz,
        memory.rgb,
        memory.valid,
        w2c,
        intr,
        height=h,
        width=w,
        mode=cfg.render_mode,
        radius=cfg.render_radius if cfg.render_mode != "point" else 0.0,
        k=cfg.render_k,
    )
    return jnp.clip(out.rgb, 0.0, 1.0), jnp.asarray(out.hole, jnp.float32), out.depth


def _empty_references(k: int, h: int, w: int) -> References:
    return References(
        jnp.zeros((k, h, w, 3), jnp.float32),
        jnp.zeros((k, h, w), jnp.float32),
        jnp.broadcast_to(jnp.eye(4, dtype=jnp.float32), (k, 4, 4)),
        jnp.zeros((k,), bool),
        np.full((k,), -1, np.int32),
    )


def _retrieve(
    memory,
    targets_w2c,
    cand_index,
    video_rgb,
    video_depth,
    used_w2c,
    intr,
    h,
    w,
    cfg: PipelineConfig,
) -> References:
    """Up to K earlier frames that see the most of the memory points the target views see."""
    k = cfg.max_refs
    refs = _empty_references(k, h, w)
    if k == 0 or len(cand_index) == 0 or memory.count() == 0:
        return refs
    vis_t = retrieval.visibility_sets(
        memory.xyz, memory.valid, targets_w2c, intr, height=h, width=w
    )
    vis_c = retrieval.visibility_sets(
        memory.xyz, memory.valid, used_w2c[cand_index], intr, height=h, width=w
    )
    sel = retrieval.select_references(vis_t, vis_c, k, eps=cfg.ref_eps, method=cfg.ref_method)
    idx = np.asarray(cand_index)[sel.candidates]
    n = len(idx)
    if n == 0:
        return refs
    valid = np.arange(k) < n
    pad = np.concatenate([idx, np.full(k - n, idx[0])])
    frame_index = np.where(valid, pad, -1).astype(np.int32)
    vmask = jnp.asarray(valid)
    return References(
        jnp.where(vmask[:, None, None, None], jnp.asarray(video_rgb[pad]), 0.0),
        jnp.where(vmask[:, None, None], jnp.asarray(video_depth[pad]), 0.0),
        jnp.asarray(used_w2c[pad]),
        vmask,
        frame_index,
    )


def generate_video(
    memory: mem_lib.PointMemory,
    trajectory: Trajectory,
    generate_clip: GenerateClip,
    cfg: PipelineConfig,
    key,
    *,
    start: StartFrame | None = None,
    scene: scenes.Scene | None = None,
    instructions: int | Sequence[int | None] | None = None,
    edit_memory: Callable[[mem_lib.PointMemory, int], mem_lib.PointMemory] | None = None,
) -> VideoResult:
    """Generate a video along ``trajectory`` clip by clip (module docstring).

    Args:
      memory: the initial spatial memory (e.g. from `start_from_scene` / `initial_memory`); its
        capacity is used as is (``cfg.capacity`` only sizes memories this module builds).
      trajectory: commanded cameras (T poses; frame 0 is the start frame).
      generate_clip: a `GenerateClip`. cfg: `PipelineConfig`. key: PRNG key (split per clip).
      start: the start frame (video[0]; the history of clip 0); None = the ground-truth render
        of ``scene`` at the first pose.
      scene: the synthetic scene, needed by ``start=None``, ``depth_source="oracle"`` and
        ``mask_source="oracle"``.
      instructions: one id for all clips, one per clip, or None.
      edit_memory: ``(memory, clip_index) -> memory`` applied before each clip is rendered.
    Returns: `VideoResult`.
    """
    w2c_cmd, intr, times = _check_trajectory(trajectory)
    h, w = trajectory.height, trajectory.width
    t_n = w2c_cmd.shape[0]
    n, m = cfg.clip_frames, cfg.history_frames
    needs_scene = cfg.depth_source == "oracle" or (
        cfg.dynamic_masking and cfg.mask_source == "oracle"
    )
    if needs_scene and scene is None:
        raise ValueError(
            "generate_video: depth_source='oracle' / mask_source='oracle' need the scene"
        )
    if start is None:
        if scene is None:
            raise ValueError(
                "generate_video: give the start frame (start=...) or the scene to render it"
            )
        fr0 = scenes.raycast(scene, w2c_cmd[0], intr, h, w, times[0])
        start = StartFrame(fr0.rgb, fr0.depth, fr0.dynamic)
    if np.shape(start.rgb) != (h, w, 3):
        raise ValueError(
            f"generate_video: start.rgb must be [{h}, {w}, 3], got {np.shape(start.rgb)}"
        )
    schedule = _clip_schedule(t_n, n, m)
    if isinstance(instructions, Sequence):
        if len(instructions) != len(schedule):
            raise ValueError(
                f"generate_video: {len(instructions)} instructions for {len(schedule)} clips"
            )
        instr_list = list(instructions)
    else:
        instr_list = [instructions] * len(schedule)

    video = np.zeros((t_n, h, w, 3), np.float32)
    depth = np.zeros((t_n, h, w), np.float32)
    dynamic = np.zeros((t_n, h, w), bool)
    video[0] = np.asarray(start.rgb, np.float32)
    start_depth = start.depth
    if start_depth is None and cfg.depth_source == "oracle":
        start_depth = scenes.raycast(scene, w2c_cmd[0], intr, h, w, times[0]).depth
    if start_depth is not None:
        depth[0] = np.asarray(start_depth, np.float32)
    if start.dynamic is not None:
        dynamic[0] = np.asarray(start.dynamic, bool) & cfg.dynamic_masking
    used_w2c = np.asarray(w2c_cmd).copy()
    clip_index = np.full((t_n,), -1, np.int32)
    counts = [memory.count()]
    records = []
    keys = jax.random.split(key, len(schedule))

    for r, (tgt, n_real, hist) in enumerate(schedule):
        if edit_memory is not None:
            memory = edit_memory(memory, r)
        cam = np.concatenate([hist, tgt])
        cam_w2c = w2c_cmd[cam]
        if cfg.use_projection:
            proj, hole, proj_depth = _render(memory, cam_w2c, intr, h, w, cfg)
        else:
            proj, hole = (
                jnp.zeros((m + n, h, w, 3), jnp.float32),
                jnp.ones((m + n, h, w), jnp.float32),
            )
            proj_depth = jnp.zeros((m + n, h, w), jnp.float32)
        if cfg.use_references:
            cands = np.arange(0, int(hist[0]), cfg.ref_cand_stride)  # frames before the history
            refs = _retrieve(
                memory,
                w2c_cmd[tgt[: n_real : cfg.ref_target_stride]],
                cands,
                video,
                depth,
                jnp.asarray(used_w2c),
                intr,
                h,
                w,
                cfg,
            )
        else:
            refs = _empty_references(cfg.max_refs, h, w)
        ctx = ClipContext(
            r, cam, m, n_real, cam_w2c, intr, times[cam], jnp.asarray(depth[hist]), proj_depth
        )
        rgb, gen_depth = generate_clip(
            proj, hole, refs, jnp.asarray(video[hist]), instr_list[r], keys[r], context=ctx
        )
        rgb = jnp.clip(jnp.asarray(rgb, jnp.float32), 0.0, 1.0)
        if rgb.shape != (n, h, w, 3):
            raise ValueError(
                f"generate_clip returned rgb {rgb.shape}, expected [N={n}, {h}, {w}, 3]"
            )
        oracle = None
        if needs_scene:
            oracle = scenes.raycast_views(scene, w2c_cmd[tgt], intr, h, w, times[tgt])
        if cfg.depth_source == "oracle":
            new_depth = oracle.depth
        elif gen_depth is None:
            raise ValueError(
                "generate_clip returned no depth; use depth_source='oracle' or an RGB-D generator"
            )
        else:
            new_depth = jnp.asarray(gen_depth, jnp.float32)
            if new_depth.shape != (n, h, w):
                raise ValueError(
                    f"generate_clip returned depth {new_depth.shape}, expected [{n}, {h}, {w}]"
                )
        if not cfg.dynamic_masking:
            dyn = jnp.zeros((n, h, w), bool)
        elif cfg.mask_source == "oracle":
            dyn = oracle.dynamic
        else:
            dyn = dynamic_colour_mask(rgb, cfg.colour_key_tol)
        # padded frames carry no depth, so they add no points (and shapes stay static)
        real = jnp.arange(n) < n_real
        ins_depth = jnp.where(real[:, None, None], new_depth, 0.0)
        new_w2c = w2c_cmd[tgt]
        if cfg.refine_poses:
            icp = slam.ICPConfig(damping=cfg.icp_damping)
            res = slam.icp_refine_batch(memory, ins_depth, new_w2c, intr, dyn, icp)
            new_w2c = jnp.where((res.n_pairs >= 12)[:, None, None], res.w2c, new_w2c)
        idx = tgt[:n_real]
        video[idx] = np.asarray(rgb[:n_real])
        depth[idx] = np.asarray(new_depth[:n_real])
        dynamic[idx] = np.asarray(dyn[:n_real])
        used_w2c[idx] = np.asarray(new_w2c[:n_real])
        clip_index[idx] = r
        if cfg.update == "incremental":
            memory, stats = mem_lib.update_memory(
                memory, rgb, ins_depth, new_w2c, intr, dyn, voxel=cfg.voxel
            )
        else:  # fixed [T] shapes: frames not generated yet have depth 0 and add nothing
            memory, stats = mem_lib.build_memory(
                video, depth, used_w2c, intr, dynamic, capacity=memory.capacity, voxel=cfg.voxel
            )
        counts.append(memory.count())
        records.append(
            ClipRecord(
                idx, hist, np.asarray(proj), np.asarray(hole), refs, counts[-1], stats.n_overflow
            )
        )
    return VideoResult(
        video, depth, dynamic, np.asarray(w2c_cmd), used_w2c, clip_index, memory, counts, records
    )


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """`spatia.flow.sample` options; None = the model config's default."""

    num_steps: int = 16
    method: str | None = None
    guidance_scale: float | None = None
    shift: float | None = None


def model_generate_clip(model, sampler: SamplerConfig = SamplerConfig()) -> GenerateClip:
    """A `GenerateClip` that samples a `spatia.model.VideoDiT` with `spatia.flow.sample`.

    ``model``: a VideoDiT, or ``(graphdef, state)`` / ``(graphdef, (state, ...))`` from
    ``nnx.split``. The batch (B = 1) holds "prev" (history), "refs" + "ref_valid" (if K > 0),
    "proj" + "hole" (if the model has a control branch) and "instruction" (if not None). With
    ``config.channels == 4`` the model is RGB-D: every frame carries `encode_depth` of its depth
    as the 4th channel (history / reference depths, the projection's depth) and the generated
    4th channel is decoded back to metres; with 3 channels the depth output is None.
    """
    if isinstance(model, tuple):
        graphdef, state = model
        cfg = nnx.merge(graphdef, *(state if isinstance(state, tuple | list) else (state,))).config
        has_control = bool(cfg.control_layers)
    else:
        graphdef, state = nnx.split(model)
        cfg = model.config
        has_control = model.control is not None
    if cfg.channels not in (3, 4):
        raise ValueError(
            f"model_generate_clip: config.channels must be 3 (RGB) or 4 (RGB-D), got {cfg.channels}"
        )
    if cfg.hole_channels != 1:
        raise ValueError(
            "model_generate_clip: pixel-space hole masks have 1 channel, config has "
            f"{cfg.hole_channels}"
        )
    rgbd = cfg.channels == 4

    def frames(rgb, d):
        rgb = jnp.asarray(rgb, jnp.float32)
        return jnp.concatenate([rgb, encode_depth(d)[..., None]], -1) if rgbd else rgb

    def generate(projection, hole_mask, references, history_frames, instruction, key, *, context):
        n = len(context.frame_index) - context.n_history
        cond = {"prev": frames(history_frames, context.history_depth)[None]}
        if references.rgb.shape[0] > 0:
            cond["refs"] = frames(references.rgb, references.depth)[None]
            cond["ref_valid"] = jnp.asarray(references.valid, bool)[None]
        if has_control:
            cond["proj"] = frames(projection, context.projection_depth)[None]
            cond["hole"] = jnp.asarray(hole_mask, jnp.float32)[None, ..., None]
        if instruction is not None:
            cond["instruction"] = jnp.asarray([instruction], jnp.int32)
        out = flow.sample(
            graphdef,
            state,
            cond,
            key,
            sampler.num_steps,
            num_frames=n,
            method=sampler.method,
            guidance_scale=sampler.guidance_scale,
            shift=sampler.shift,
        )["frames"][0]
        rgb = jnp.clip(out[..., :3], 0.0, 1.0)
        return rgb, (decode_depth(out[..., 3]) if rgbd else None)

    return generate


def oracle_generate_clip(scene: scenes.Scene) -> GenerateClip:
    """A `GenerateClip` returning the ground-truth renders (RGB and depth) at the commanded cameras
    and scene times: the loop's upper bound and its test fixture. Ignores every condition."""

    def generate(projection, hole_mask, references, history_frames, instruction, key, *, context):
        h, w = projection.shape[1:3]
        fr = scenes.raycast_views(
            scene, context.target_w2c, context.intr, h, w, context.target_times
        )
        return fr.rgb, fr.depth

    return generate


@jax.jit
def _seen_by_references(depth_t, w2c_t, ref_depth, ref_w2c, ref_valid, intr):
    """[N, H, W] bool: target pixels whose true 3D point a valid reference frame also sees."""

    def one_target(d, wt):
        def one_ref(dr, wr, v):
            cov, _, _ = metrics.covisible_pixels(d, d > 0, wt, dr, wr, intr)
            return cov & v

        return jnp.any(jax.vmap(one_ref)(ref_depth, ref_w2c, ref_valid), axis=0)

    return jax.vmap(one_target)(depth_t, w2c_t)


def noisy_oracle_generate_clip(
    scene: scenes.Scene,
    *,
    noise_std: float = 0.2,
    ref_noise_std: float = 0.03,
    colour_shift: float = 0.08,
    drift_deg: float = 1.5,
    drift_m: float = 0.03,
) -> GenerateClip:
    """A cheap stand-in for a trained generator: ground truth, corrupted where a condition is off.

    Per clip (random draws from the key):
      * camera: the target frames are rendered at the commanded pose moved by a drift that grows
        by ``drift_deg`` / ``drift_m`` per frame along the clip (random axis and direction per
        clip), scaled by the mean hole fraction of the target projection: a full projection
        pins the camera, an empty one lets it drift (the generator has only the history frames);
      * appearance: "hallucinated" pixels are the true colours plus a per-clip colour shift of
        size ``colour_shift`` and i.i.d. Gaussian noise ``noise_std``; pixels whose true 3D point
        a valid reference frame sees (by the references' depths and poses) keep their true colour
        up to noise ``ref_noise_std``;
      * memory: the output composites the projection over that, ``out = proj + hole * appearance``
        (proj is the premultiplied splat colour and hole = 1 - coverage), so memory content,
        including its errors and edits, is copied where it covers the frame.
    Depth is the true depth at the camera actually rendered. With every condition present and a
    correct memory the output is close to the oracle; each missing condition costs PSNR.
    """

    def generate(projection, hole_mask, references, history_frames, instruction, key, *, context):
        h, w = projection.shape[1:3]
        m = context.n_history
        hole_t = jnp.asarray(hole_mask, jnp.float32)[m:]
        proj_t = jnp.asarray(projection, jnp.float32)[m:]
        n = hole_t.shape[0]
        k_axis, k_dir, k_shift, k_noise = jax.random.split(key, 4)
        axis = jax.random.normal(k_axis, (3,))
        axis = axis / jnp.linalg.norm(axis)
        direction = jax.random.normal(k_dir, (3,))
        direction = direction / jnp.linalg.norm(direction)
        steps = (jnp.arange(n, dtype=jnp.float32) + 1.0) * jnp.mean(hole_t)
        xi = jnp.concatenate(
            [steps[:, None] * jnp.radians(drift_deg) * axis, steps[:, None] * drift_m * direction],
            -1,
        )
        w2c = geo.se3_exp(xi) @ context.target_w2c
        fr = scenes.raycast_views(scene, w2c, context.intr, h, w, context.target_times)
        shift = colour_shift * jax.random.normal(k_shift, (3,))
        seen = _seen_by_references(
            fr.depth, w2c, references.depth, references.w2c, references.valid, context.intr
        )
        std = jnp.where(seen, ref_noise_std, noise_std)[..., None]
        app = (
            fr.rgb
            + jnp.where(seen[..., None], 0.0, shift)
            + std * jax.random.normal(k_noise, fr.rgb.shape)
        )
        out = proj_t + hole_t[..., None] * jnp.clip(app, 0.0, 1.0)
        return jnp.clip(out, 0.0, 1.0), fr.depth

    return generate
