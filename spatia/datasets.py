"""Training clips for Spatia's generator, cut from the synthetic worlds (Spatia §3.1,
docs/spatia.md D15).

One sample mirrors the paper's split of a training video into target frames T (N), the
preceding clip P (M) and candidates C (everything outside the window, every `cand_stride`-th):

1. a room (`spatia.scenes.make_scene`, a moving object with probability `dynamic_prob`) and an
   exploration trajectory through it, ray cast to ground-truth RGB, depth and dynamic masks;
2. a window [s, s + M + N): P = its first M frames, T = the next N;
3. memory S = back-projected *static* pixels of 1 random C frame (with probability
   `extra_memory_prob` up to `memory_frames` of them, like the accumulated memory of later rounds),
   voxel-downsampled;
4. projection video + hole mask of S at the M + N poses of P and T (`spatia.render`);
5. references: visibility sets of `retrieval_views` target views vs. all C frames, Hungarian
   matching, pairs with IoU > eps, the K best by IoU; with `random_k` only the first k ~ U{0..K}
   stay valid (padding references are zeros with `ref_valid = False`);
6. an instruction id: the camera motion of the clip (turn left / turn right / forward /
   backward-or-still), standing in for the text prompt.

With `model.channels == 4` the generator is RGB-D (docs/spatia.md D6): every frame carries
`spatia.pipeline.encode_depth` of its metric depth as a 4th channel (ground truth for targets,
history and references; the nearest memory point's depth for the projection, 0 in holes), which
is what `spatia.pipeline.model_generate_clip` feeds the model at inference.

With probability `first_clip_prob` a sample is shaped like the first clip of a rollout instead:
history = the start frame (tiled M times), memory from that frame alone, no references.

Arrays of a split (leading axis S = samples, C = model.channels), float32 in [0, 1] unless noted:
  frames [S, N, H, W, C], prev [S, M, H, W, C], refs [S, K, H, W, C], ref_valid bool [S, K],
  proj [S, M+N, H, W, C], hole [S, M+N, H, W, 1] (1 = no memory), instruction int32 [S].
They are generated once per (config, split) and cached as `<cache_dir>/<split>-<hash>.npz`;
generation is deterministic in `DataConfig.seed`. `batch_iterator` gives a checkpointable
`common.data.ArrayIterator` over the keys a training stage uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from common.config import to_dict
from common.data import ArrayIterator
from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import render as rnd
from spatia import retrieval, scenes, trajectories
from spatia.config import DataConfig, SpatiaConfig
from spatia.pipeline import encode_depth

__all__ = [
    "DATA_VERSION",
    "TYPICAL_DEPTH",
    "INSTRUCTIONS",
    "ARRAY_KEYS",
    "intrinsics",
    "voxel_size",
    "camera_yaw",
    "motion_instruction",
    "project_memory",
    "with_depth",
    "retrieve_references",
    "generate_split",
    "dataset_key",
    "load_dataset",
    "batch_iterator",
]

# Bump when the sample recipe changes, so stale caches are not reused.
DATA_VERSION = 1
# s0 = TYPICAL_DEPTH / fx: one pixel at a typical depth of the rooms (docs/spatia.md D13).
TYPICAL_DEPTH = 3.0
INSTRUCTIONS = ("turn left", "turn right", "forward", "backward or still")
ARRAY_KEYS = ("frames", "prev", "refs", "ref_valid", "proj", "hole", "instruction")
_SPLIT_IDS = {"train": 0, "val": 1}
# choice: a clip turns when its net yaw exceeds 5 degrees, else it moves forward if its
# camera centre advances along the start view direction by more than 5 cm.
_TURN_DEG = 5.0
_FORWARD_M = 0.05


def intrinsics(cfg: SpatiaConfig) -> jnp.ndarray:
    """Pixel intrinsics [4] (fx, fy, cx, cy) of the model's frame size and `data.fov_deg`."""
    h, w = cfg.model.frame_size
    return geo.intrinsics_from_fov(h, w, cfg.data.fov_deg)


def voxel_size(cfg: SpatiaConfig, scale_s0: float | None = None) -> float:
    """Memory voxel in metres: scale_s0 (default `data.voxel_s0`) x s0, s0 = 3 m / fx."""
    scale = cfg.data.voxel_s0 if scale_s0 is None else scale_s0
    return float(scale * TYPICAL_DEPTH / float(intrinsics(cfg)[0]))


def camera_yaw(w2c) -> np.ndarray:
    """Yaw (radians, about world z) of each camera's viewing direction: w2c [..., 4, 4] -> [...]."""
    fwd = np.asarray(w2c, np.float64)[..., 2, :3]  # third row of R = optical axis in world
    return np.arctan2(fwd[..., 1], fwd[..., 0])


def motion_instruction(w2c_start, w2c_end) -> int:
    """Instruction id (index into INSTRUCTIONS) of a camera moving from w2c_start to w2c_end
    (both [4, 4])."""
    dyaw = np.degrees((camera_yaw(w2c_end) - camera_yaw(w2c_start) + np.pi) % (2 * np.pi) - np.pi)
    if dyaw > _TURN_DEG:
        return 0
    if dyaw < -_TURN_DEG:
        return 1
    c0 = np.asarray(geo.camera_centers(jnp.asarray(w2c_start, jnp.float32)), np.float64)
    c1 = np.asarray(geo.camera_centers(jnp.asarray(w2c_end, jnp.float32)), np.float64)
    fwd = np.asarray(w2c_start, np.float64)[2, :3]
    return 2 if float(np.dot(c1 - c0, fwd)) > _FORWARD_M else 3


def project_memory(
    memory: mem_lib.PointMemory, w2c, intr, data: DataConfig, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projection video, hole mask and depth of a memory along poses w2c [T, 4, 4].

    Returns (proj float32 [T, H, W, 3] in [0, 1], black where empty; hole float32 [T, H, W, 1],
    1 where no point covers the pixel, soft at splat borders for the soft modes; depth float32
    [T, H, W] of the nearest point, 0 where empty).
    """
    radius = data.splat_radius if data.render_mode != "point" else 0.0
    out = rnd.render_views(
        memory.xyz,
        memory.rgb,
        memory.valid,
        jnp.asarray(w2c, jnp.float32),
        intr,
        height=height,
        width=width,
        mode=data.render_mode,
        radius=radius,
    )
    proj = np.clip(np.asarray(out.rgb, np.float32), 0.0, 1.0)
    hole = np.clip(np.asarray(out.hole, np.float32), 0.0, 1.0)[..., None]
    return proj, hole, np.asarray(out.depth, np.float32)


def with_depth(rgb, depth, channels: int) -> np.ndarray:
    """Model frames: rgb [..., 3] (channels 3) or rgb ‖ encode_depth(depth) [..., 4]
    (channels 4)."""
    rgb = np.asarray(rgb, np.float32)
    if channels == 3:
        return rgb
    return np.concatenate([rgb, np.asarray(encode_depth(depth), np.float32)[..., None]], -1)


def retrieve_references(
    memory: mem_lib.PointMemory,
    w2c_targets,
    w2c_cands,
    intr,
    k: int,
    *,
    eps: float,
    height: int,
    width: int,
) -> np.ndarray:
    """Indices (into w2c_cands) of up to k reference frames, best IoU first (docs/spatia.md D15).

    w2c_targets [A, 4, 4] target views, w2c_cands [B, 4, 4] candidates. Visibility sets are the
    memory points front-most at their 1-px pixel; candidates are matched one-to-one to targets
    by the Hungarian algorithm on intersection counts, kept if IoU > eps. Returns int64 [<= k].
    """
    if k == 0 or len(w2c_cands) == 0:
        return np.zeros((0,), np.int64)
    vis_t = retrieval.visibility_sets(
        memory.xyz, memory.valid, jnp.asarray(w2c_targets), intr, height=height, width=width
    )
    vis_c = retrieval.visibility_sets(
        memory.xyz, memory.valid, jnp.asarray(w2c_cands), intr, height=height, width=width
    )
    sel = retrieval.select_references(vis_t, vis_c, k, eps=eps, method="hungarian", order="score")
    return np.asarray(sel.candidates, np.int64)


def _check_pixel_model(cfg: SpatiaConfig) -> None:
    m = cfg.model
    if m.channels not in (3, 4) or m.hole_channels != 1:
        raise ValueError(
            f"spatia.datasets makes pixel-space RGB / RGB-D clips: expected model.channels in "
            f"(3, 4) and model.hole_channels=1, got {m.channels} and {m.hole_channels} (the "
            "paper preset runs on Wan-VAE latents, which this package does not include)"
        )


def _scene_clips(cfg: SpatiaConfig, scene_seed: int, rng: np.random.Generator) -> dict:
    """All samples of one room as a dict of stacked arrays (see the module docstring)."""
    d, m = cfg.data, cfg.model
    H, W = m.frame_size
    N, M, K = m.num_target_frames, m.num_prev_frames, m.max_refs
    C = m.channels
    intr = intrinsics(cfg)
    voxel = voxel_size(cfg)
    n_dyn = int(rng.random() < d.dynamic_prob)
    scene = scenes.make_scene(scene_seed, n_dynamic=n_dyn)
    w2c = trajectories.exploration_trajectory(scene_seed, d.traj_frames, scene=scene)
    fr = scenes.raycast_views(scene, w2c, intr, H, W)
    rgb = np.asarray(fr.rgb, np.float32)
    depth = np.asarray(fr.depth, np.float32)
    dyn = np.asarray(fr.dynamic, bool)
    T = d.traj_frames
    if T < M + N + 1:
        raise ValueError(f"DataConfig.traj_frames={T} is shorter than M + N + 1 = {M + N + 1}")
    views = np.unique(np.linspace(0, N - 1, min(d.retrieval_views, N)).round().astype(int))

    out = {k: [] for k in ARRAY_KEYS}
    for _ in range(d.samples_per_scene):
        first = rng.random() < d.first_clip_prob
        if first:
            s = int(rng.integers(0, T - N))
            prev_idx = np.full(M, s)
            tgt_idx = np.arange(s + 1, s + 1 + N)
            src = np.array([s])
            cands = np.zeros((0,), int)
        else:
            s = int(rng.integers(0, T - (M + N) + 1))
            prev_idx = np.arange(s, s + M)
            tgt_idx = np.arange(s + M, s + M + N)
            cands = np.r_[np.arange(0, s), np.arange(s + M + N, T)][:: d.cand_stride]
            n_src = 1
            if d.memory_frames > 1 and rng.random() < d.extra_memory_prob:
                n_src = int(rng.integers(2, d.memory_frames + 1))
            src = rng.choice(cands, size=min(n_src, len(cands)), replace=False)
        # Fixed source slots (unused ones have no depth, hence no points): one compile.
        slots = np.zeros(d.memory_frames, int)
        slots[: len(src)] = src
        slot_depth = np.where(
            (np.arange(d.memory_frames) < len(src))[:, None, None], depth[slots], 0.0
        )
        memory, _ = mem_lib.build_memory(
            rgb[slots],
            slot_depth,
            w2c[slots],
            intr,
            dyn[slots],
            capacity=d.memory_frames * H * W,
            voxel=voxel,
        )
        pt_idx = np.r_[prev_idx, tgt_idx]
        proj, hole, proj_depth = project_memory(memory, w2c[pt_idx], intr, d, H, W)

        refs = np.zeros((K, H, W, C), np.float32)
        ref_valid = np.zeros((K,), bool)
        if K and not first:
            chosen = retrieve_references(
                memory,
                w2c[tgt_idx[views]],
                w2c[cands],
                intr,
                K,
                eps=d.retrieval_eps,
                height=H,
                width=W,
            )
            n_keep = len(chosen)
            if d.random_k:
                n_keep = min(n_keep, int(rng.integers(0, K + 1)))
            ref_idx = cands[chosen[:n_keep]]
            refs[:n_keep] = with_depth(rgb[ref_idx], depth[ref_idx], C)
            ref_valid[:n_keep] = True

        out["frames"].append(with_depth(rgb[tgt_idx], depth[tgt_idx], C))
        out["prev"].append(with_depth(rgb[prev_idx], depth[prev_idx], C))
        out["refs"].append(refs)
        out["ref_valid"].append(ref_valid)
        out["proj"].append(with_depth(proj, proj_depth, C))
        out["hole"].append(hole)
        out["instruction"].append(motion_instruction(w2c[prev_idx[-1]], w2c[tgt_idx[-1]]))
    return {k: np.stack(v) for k, v in out.items()}


def _scene_seed(data: DataConfig, split: str, i: int) -> int:
    # Disjoint seed ranges per split; evaluation loops use seeds >= EvalConfig.seed (10,000).
    return data.seed * 1_000_003 + _SPLIT_IDS[split] * 5_000 + i


def generate_split(cfg: SpatiaConfig, split: str = "train", *, verbose: bool = False) -> dict:
    """All samples of a split ("train": `data.num_scenes` rooms, "val": `data.val_scenes`).

    Deterministic in `cfg.data.seed`. Returns the arrays of the module docstring.
    """
    _check_pixel_model(cfg)
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    n = cfg.data.num_scenes if split == "train" else cfg.data.val_scenes
    if n < 1:
        raise ValueError(f"split {split!r} has no rooms (data.val_scenes = 0)")
    parts = []
    for i in range(n):
        rng = np.random.default_rng([cfg.data.seed, _SPLIT_IDS[split], i])
        parts.append(_scene_clips(cfg, _scene_seed(cfg.data, split, i), rng))
        if verbose and (i + 1) % max(n // 4, 1) == 0:
            print(f"[data] {split}: {i + 1}/{n} rooms", flush=True)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in ARRAY_KEYS}
    arrays["instruction"] = arrays["instruction"].astype(np.int32)
    return arrays


def dataset_key(cfg: SpatiaConfig, split: str) -> str:
    """Hash of everything a split's content depends on (data config, frame layout, version)."""
    m = cfg.model
    desc = {
        "version": DATA_VERSION,
        "split": split,
        "data": to_dict(cfg.data),
        "layout": [
            list(m.frame_size),
            m.num_target_frames,
            m.num_prev_frames,
            m.max_refs,
            m.channels,
        ],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def load_dataset(
    cfg: SpatiaConfig, cache_dir: str | os.PathLike, split: str = "train", *, verbose: bool = False
) -> dict:
    """The split's arrays from `<cache_dir>/<split>-<dataset_key>.npz`, generated on a miss.

    The cache file is written atomically (temporary file + rename), so a killed generation never
    leaves a partial file behind.
    """
    cache = pathlib.Path(cache_dir)
    path = cache / f"{split}-{dataset_key(cfg, split)}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in ARRAY_KEYS}
    arrays = generate_split(cfg, split, verbose=verbose)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def batch_iterator(arrays: dict, keys, batch_size: int, seed: int) -> ArrayIterator:
    """Checkpointable minibatches (`common.data.ArrayIterator`) over the named arrays only."""
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"batch_iterator: arrays lack {missing}; have {sorted(arrays)}")
    return ArrayIterator({k: arrays[k] for k in keys}, batch_size, seed=seed)
