"""Run configuration of Spatia's reproduction: model + data + training + evaluation presets.

`SpatiaConfig` nests the generator's `VideoModelConfig` (spatia.model_config) with the settings of
the synthetic training data (`DataConfig`, spatia.datasets), the staged training
(`TrainConfig`, spatia.train) and the closed-loop evaluation (`EvalConfig`, spatia.reproduce).
Frame size and the counts N (target), M (history) and K (references) come from the model config
alone, so the data can never disagree with the network.

Presets (`PRESETS`, used as ``python -m spatia train|reproduce --preset NAME --set key=value``):
  tiny:  RGB-D 16x16 frames, N = 4, M = 1, K = 2, width 64, 4 + 2 blocks, a few hundred steps per
         stage; the whole reproduction takes minutes on 2 CPU cores.
  small: RGB-D 32x32 frames, patch (2, 8, 8), N = 8, M = 2, K = 4, width 128, 6 + 3 blocks
         (docs/spatia.md D14); about an hour on 2 CPU cores.
  paper: the paper's structure (Spatia §3.1.3, §4; docs/spatia.md D7): 30 main blocks of width
         3072, 8 control blocks paired with main layers 0, 4, ..., 28, K = 7 references, 9
         history frames and 81-frame clips (3 + 18 latent frames of a 4x temporal VAE), control
         stage 8,000 steps at lr 1e-5, LoRA (rank 64) stage 5,000 steps at lr 1e-4, batch 64. It
         runs on VAE latents, which this package does not ship: the synthetic pixel dataset
         refuses it (see spatia.datasets).

# choice (docs/spatia.md D6): the tiny and small generators are RGB-D (model.channels = 4, the
# 4th channel is log-depth), so a rollout updates its memory from its own depth and the camera
# score can estimate each generated frame's pose by ICP; EvalConfig.depth_source="oracle" uses
# ray-cast depth instead (the upper bound of docs/spatia.md D6).
"""

from __future__ import annotations

import dataclasses
import functools

from common.config import require
from common.train import OptimizerConfig
from spatia import model_config as mc

__all__ = [
    "DataConfig",
    "StageConfig",
    "TrainConfig",
    "EvalConfig",
    "SpatiaConfig",
    "PRESETS",
    "tiny",
    "small",
    "paper",
]

_MAIN_MODES = ("lora", "full")
_RENDER_MODES = ("point", "minfilter", "footprint", "soft", "soft_minfilter")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Synthetic training clips (docs/spatia.md D15), generated once and cached.

    num_scenes / val_scenes: rooms of the training / validation split (disjoint seeds).
    traj_frames: length of each room's exploration trajectory; samples_per_scene windows of
      M + N consecutive frames are cut from it.
    fov_deg: horizontal field of view of the pinhole camera.
    dynamic_prob: probability that a room has one moving object (its pixels never enter memory).
    first_clip_prob: fraction of samples shaped like the first clip (history slot = the start
      frame, memory built from it alone, no references).
    memory_frames: the memory of an ordinary sample is built from 1 candidate frame, and with
      probability extra_memory_prob from up to memory_frames (imitating later rounds).
    voxel_s0: memory voxel in units of s0 = 3 m / fx (one pixel at a typical depth,
      docs/spatia.md D13).
    render_mode / splat_radius: how the memory is rendered into the projection video
      (spatia.render modes; radius in pixels).
    cand_stride: stride of the candidate (reference) frames outside the window.
    retrieval_views: number of target views that drive retrieval (docs/spatia.md D4).
    retrieval_eps: IoU threshold of Spatia Alg. 1 (docs/spatia.md D15: 0.05).
    random_k: draw the number of valid references per sample from U{0..K} (docs/spatia.md D14,
      so one model can be evaluated at every K).
    seed: base seed of rooms, trajectories and sample choices.
    """

    num_scenes: int = 24
    val_scenes: int = 4
    traj_frames: int = 24
    samples_per_scene: int = 12
    fov_deg: float = 75.0
    dynamic_prob: float = 0.5
    first_clip_prob: float = 0.25
    memory_frames: int = 4
    extra_memory_prob: float = 0.5
    voxel_s0: float = 0.5
    render_mode: str = "soft"
    splat_radius: float = 1.0
    cand_stride: int = 2
    retrieval_views: int = 4
    retrieval_eps: float = 0.05
    random_k: bool = True
    seed: int = 0

    def __post_init__(self):
        req = functools.partial(require, self)
        for f in (
            "num_scenes",
            "samples_per_scene",
            "memory_frames",
            "cand_stride",
            "retrieval_views",
        ):
            req(f, getattr(self, f) >= 1, ">= 1")
        req("val_scenes", self.val_scenes >= 0, ">= 0")
        for f in ("dynamic_prob", "first_clip_prob", "extra_memory_prob"):
            req(f, 0.0 <= getattr(self, f) <= 1.0, "in [0, 1]")
        req("voxel_s0", self.voxel_s0 > 0, "> 0")
        req("render_mode", self.render_mode in _RENDER_MODES, f"one of {_RENDER_MODES}")
        req("fov_deg", 0.0 < self.fov_deg < 170.0, "in (0, 170)")


def adamw(learning_rate: float, *, warmup_steps: int = 20) -> OptimizerConfig:
    """The optimiser of every stage (docs/spatia.md D9): AdamW, linear warm-up then constant lr,
    weight decay 0.01, gradient clipping at norm 1. The constant schedule ignores total_steps."""
    return OptimizerConfig(
        name="adamw",
        learning_rate=learning_rate,
        schedule="constant",
        warmup_steps=warmup_steps,
        weight_decay=0.01,
        grad_clip_norm=1.0,
    )


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: its number of optimizer steps and its optimiser.

    steps = 0 skips the stage's updates (its checkpoint is the initialised model).
    """

    steps: int = 200
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: adamw(1e-3))

    def __post_init__(self):
        require(self, "steps", self.steps >= 0, ">= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The three training stages (Spatia §4, docs/spatia.md D14), each a `StageConfig`.

    base (no memory; also the no-memory baseline) trains every non-control parameter on
    history + instruction; control freezes the base and trains the control branch on the memory
    projection; main trains the main blocks with references and history (main_mode "lora":
    LoRA of rank model.lora_rank, "full": all base parameters), control frozen, with
    t_aug ~ U[0, hist_noise_max] noise on the history frames. Each stage's optimiser is
    `<stage>.optim` (e.g. ``--set train.control.optim.learning_rate=1e-5``).
    ablations: also train the Table 4 variants "main_proj" (no references) and "main_refs"
      (no control branch, references only) with the main stage's settings.
    seed: root of the named random streams of training (model init, LoRA init, step keys,
      batch order; `common.rng.stream_seed`).
    """

    batch_size: int = 8
    base: StageConfig = StageConfig(steps=300)
    control: StageConfig = StageConfig(steps=200)
    main: StageConfig = StageConfig(steps=200)
    main_mode: str = "lora"
    hist_noise_max: float = 0.05
    ablations: bool = True
    save_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        req = functools.partial(require, self)
        req("batch_size", self.batch_size >= 1, ">= 1")
        req("main_mode", self.main_mode in _MAIN_MODES, f"one of {_MAIN_MODES}")
        req("hist_noise_max", 0.0 <= self.hist_noise_max < 1.0, "in [0, 1)")
        req("save_every", self.save_every >= 1, ">= 1")
        req("log_every", self.log_every >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Closed-loop evaluation (Spatia Table 3, docs/spatia.md D16).

    num_loops: held-out rooms, each with one out-and-back loop (seeds disjoint from training).
    loop_kind / yaw_deg / dist_m: the loop (spatia.trajectories.loop_trajectory).
    clips: numbers of clips a loop is split into for the long-horizon table (first = default).
    ks: reference counts of the K table (<= model.max_refs).
    voxels_s0: memory voxel sizes of the density table, in units of s0.
    sample_steps / sampler / guidance_scale: the ODE sampler of every generated clip.
    dynamic_loops: rooms with a moving object for the ghost test.
    depth_source: depth of generated frames for the memory update: "generator" (the RGB-D
      output) or "oracle" (ray-cast at the commanded pose).
    update: memory update policy of spatia.pipeline ("incremental" | "rebuild").
    """

    num_loops: int = 4
    loop_kind: str = "orbit"
    yaw_deg: float = 40.0
    dist_m: float = 0.4
    clips: tuple[int, ...] = (2, 4, 6)
    ks: tuple[int, ...] = (0, 1, 2)
    voxels_s0: tuple[float, ...] = (1.0, 3.0, 5.0, 7.0)
    sample_steps: int = 8
    sampler: str = "euler"
    guidance_scale: float = 1.0
    dynamic_loops: int = 2
    depth_source: str = "generator"
    update: str = "incremental"
    seed: int = 10_000

    def __post_init__(self):
        req = functools.partial(require, self)
        req("num_loops", self.num_loops >= 1, ">= 1")
        req(
            "clips",
            bool(self.clips) and min(self.clips) >= 1,
            "a non-empty tuple of clip counts >= 1",
        )
        req("ks", all(k >= 0 for k in self.ks), "reference counts >= 0")
        req(
            "voxels_s0",
            bool(self.voxels_s0) and min(self.voxels_s0) > 0,
            "a non-empty tuple of positive sizes",
        )
        req("sample_steps", self.sample_steps >= 1, ">= 1")
        req("sampler", self.sampler in ("euler", "heun"), "'euler' or 'heun'")
        req("loop_kind", self.loop_kind in ("yaw", "dolly", "orbit"), "'yaw', 'dolly' or 'orbit'")
        req("depth_source", self.depth_source in ("generator", "oracle"), "'generator' or 'oracle'")
        req("update", self.update in ("incremental", "rebuild"), "'incremental' or 'rebuild'")


@dataclasses.dataclass(frozen=True)
class SpatiaConfig:
    """One reproduction: `model`, `data`, `train`, `eval` (see their docstrings)."""

    model: mc.VideoModelConfig = dataclasses.field(default_factory=lambda: _rgbd(mc.tiny()))
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if max(self.eval.ks, default=0) > self.model.max_refs:
            raise ValueError(
                f"SpatiaConfig: eval.ks={self.eval.ks} exceeds model.max_refs={self.model.max_refs}"
            )
        if self.train.main_mode == "lora" and self.model.lora_rank < 1:
            raise ValueError("SpatiaConfig: train.main_mode='lora' needs model.lora_rank >= 1")


def _rgbd(model: mc.VideoModelConfig) -> mc.VideoModelConfig:
    return dataclasses.replace(model, channels=4)


def tiny() -> SpatiaConfig:
    return SpatiaConfig()


def small() -> SpatiaConfig:
    return SpatiaConfig(
        model=_rgbd(mc.small()),
        data=DataConfig(num_scenes=96, val_scenes=8, traj_frames=32, samples_per_scene=16),
        train=TrainConfig(
            batch_size=8,
            base=StageConfig(2000, adamw(5e-4, warmup_steps=100)),
            control=StageConfig(800, adamw(5e-4, warmup_steps=100)),
            main=StageConfig(800, adamw(5e-4, warmup_steps=100)),
            save_every=200,
            log_every=20,
        ),
        eval=EvalConfig(num_loops=8, ks=(0, 1, 2, 4), sample_steps=12, dynamic_loops=4),
    )


def paper() -> SpatiaConfig:
    return SpatiaConfig(
        model=mc.paper(),
        # 720P pixels are 81 frames of 704 x 1248; the model sees 3 + 18 Wan-VAE latent frames.
        data=DataConfig(
            num_scenes=50_000,
            traj_frames=193,
            samples_per_scene=1,
            cand_stride=4,
            retrieval_views=7,
            retrieval_eps=0.1,
            voxel_s0=0.33,
            splat_radius=3.5,
        ),
        train=TrainConfig(
            batch_size=64,
            # the paper starts from the pretrained Wan2.2-TI2V-5B, so the base stage is empty
            base=StageConfig(0, adamw(1e-3, warmup_steps=200)),
            control=StageConfig(8000, adamw(1e-5, warmup_steps=200)),
            main=StageConfig(5000, adamw(1e-4, warmup_steps=200)),
            ablations=False,
            save_every=500,
            log_every=50,
        ),
        eval=EvalConfig(
            num_loops=100,
            ks=(1, 3, 5, 7),
            sample_steps=40,
            guidance_scale=3.5,
            sampler="euler",
            dynamic_loops=20,
        ),
    )


PRESETS = {"tiny": tiny, "small": small, "paper": paper}
