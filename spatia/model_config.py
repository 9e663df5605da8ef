"""Configuration of Spatia's video generator (`spatia.model.VideoDiT`) with presets.

Presets (the `model` part of `spatia.config`'s presets of the same names):
  tiny:  16x16 RGB frames, patch (1,4,4), width 64, 4 main + 2 control blocks; CPU, seconds per step.
  small: 32x32 RGB frames, spatio-temporal patch (2,8,8) (16 tokens per latent frame,
         docs/spatia.md D14), width 128, 6 main + 3 control blocks (~2.8 M parameters).
  paper: Wan2.2-TI2V-5B's DiT as Spatia uses it (docs/spatia.md D7): 30 blocks of width 3072,
         24 heads, FFN 14336, patch (1,2,2) on 48-channel VAE latents, 8 control blocks paired with
         main layers 0,4,...,28, K = 7 references, 3 history latents (9 frames), 18 target
         latents (72 frames), 40 sampling steps with shift 5 and CFG 3.5. Frame sizes here are
         latent grids; the model itself takes any grid (no learned position table).

The model is resolution-agnostic: `frame_size` and the frame counts are the defaults a data
pipeline uses, not parameters of the network.
"""

from __future__ import annotations

import dataclasses
import functools

from common.config import require

__all__ = ["VideoModelConfig", "tiny", "small", "paper"]

_SAMPLERS = ("euler", "heun")


@dataclasses.dataclass(frozen=True)
class VideoModelConfig:
    """Architecture, objective and sampling defaults of the video generator.

    Data layout (what `frames`/`prev`/`refs` arrays look like; the model accepts other counts):
      channels: channels of a frame after `encode` (3 = RGB in pixel space, 4 = RGB-D, 48 = Wan latents).
      hole_channels: channels of the hole mask (1 in pixel space; 48 for the VAE-encoded mask).
      frame_size: (H, W) of a frame (pixel or latent).
      num_target_frames / num_prev_frames / max_refs: N, M and K of a training sample.
      patch_size: (pt, ph, pw) spatio-temporal patch; references (single frames) are tiled pt times.

    Transformer:
      dim, depth, num_heads, mlp_hidden, freq_dim (sinusoid size of the timestep embedder),
      norm_eps, rope_theta; rope_sections are derived from the head dim (Wan's t/h/w split).
      control_layers: main-block indices after which control hint j is added (one control
        block per entry; empty = no control branch).
      num_instructions: size of the instruction vocabulary standing in for text (id
        `num_instructions` is the learned null / unconditional embedding).

    Objective (spatia.flow): noise level t ~ sigmoid(N(logit_mean, logit_std)), then shifted by
      `timestep_shift`; cond_drop_prob: instruction -> null for CFG; ref_drop_prob: drop all
      references of a sample; hist_noise_max: t_aug ~ U[0, hist_noise_max] noise on history
      frames (Spatia supp. §6, 0.05 = 50/1000), passed to the model as those tokens' timestep.

    remat: recompute each transformer block's activations in the backward pass instead of
      storing them (`nnx.remat`): the same gradients for about one more forward pass, and the
      activation memory of one block instead of every block (needed at the paper's size).

    LoRA on the main blocks (stage 2): lora_rank, lora_alpha, lora_targets.
    Sampling defaults: sampler ("euler" | "heun"), sample_steps, sample_shift, guidance_scale.
    """

    channels: int = 3
    hole_channels: int = 1
    frame_size: tuple[int, int] = (16, 16)
    num_target_frames: int = 4
    num_prev_frames: int = 1
    max_refs: int = 2
    patch_size: tuple[int, int, int] = (1, 4, 4)

    dim: int = 64
    depth: int = 4
    num_heads: int = 2
    mlp_hidden: int = 256
    freq_dim: int = 64
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    control_layers: tuple[int, ...] = (0, 2)
    num_instructions: int = 4
    remat: bool = False
    # Query rows per chunk of self-attention (`common.nn.chunked_attention`): bounds each
    # block's softmax to [B, H, chunk, L] instead of [B, H, L, L]; None: one pass.
    attention_chunk: int | None = None

    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 1.0
    cond_drop_prob: float = 0.1
    ref_drop_prob: float = 0.0
    hist_noise_max: float = 0.0

    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")

    sampler: str = "heun"
    sample_steps: int = 16
    sample_shift: float = 1.0
    guidance_scale: float = 1.0

    def __post_init__(self):
        req = functools.partial(require, self)
        req(
            "patch_size",
            len(self.patch_size) == 3 and min(self.patch_size) >= 1,
            "(pt, ph, pw) of positive ints",
        )
        req("frame_size", len(self.frame_size) == 2, "(H, W)")
        pt, ph, pw = self.patch_size
        req(
            "frame_size",
            self.frame_size[0] % ph == 0 and self.frame_size[1] % pw == 0,
            f"multiples of the spatial patch ({ph}, {pw})",
        )
        for f in ("num_target_frames", "num_prev_frames"):
            req(f, getattr(self, f) % pt == 0, f"a multiple of the temporal patch {pt}")
        req("num_target_frames", self.num_target_frames >= pt, f">= {pt}")
        req("num_prev_frames", self.num_prev_frames >= 0, ">= 0")
        req("max_refs", self.max_refs >= 0, ">= 0")
        req("num_heads", self.dim % self.num_heads == 0, f"a divisor of dim={self.dim}")
        head_dim = self.dim // self.num_heads
        req(
            "num_heads",
            head_dim % 2 == 0 and head_dim // 2 >= 3,
            f"a head dim dim/num_heads that is even and >= 6, got {head_dim}",
        )
        req(
            "control_layers",
            all(0 <= j < self.depth for j in self.control_layers),
            f"indices in [0, depth={self.depth})",
        )
        req(
            "control_layers",
            list(self.control_layers) == sorted(set(self.control_layers)),
            "strictly increasing indices",
        )
        req("num_instructions", self.num_instructions >= 0, ">= 0")
        for f in ("cond_drop_prob", "ref_drop_prob"):
            req(f, 0.0 <= getattr(self, f) <= 1.0, "in [0, 1]")
        req("hist_noise_max", 0.0 <= self.hist_noise_max < 1.0, "in [0, 1)")
        req("logit_std", self.logit_std > 0, "> 0")
        req("timestep_shift", self.timestep_shift > 0, "> 0")
        req("sample_shift", self.sample_shift > 0, "> 0")
        req("sampler", self.sampler in _SAMPLERS, f"one of {_SAMPLERS}")
        req("sample_steps", self.sample_steps >= 1, ">= 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_sections(self) -> tuple[int, int, int]:
        """Frequency slots (t, h, w) summing to head_dim/2; Wan's 128-d heads give (22, 21, 21)."""
        half = self.head_dim // 2
        hw = half // 3
        return (half - 2 * hw, hw, hw)


def tiny() -> VideoModelConfig:
    return VideoModelConfig()


def small() -> VideoModelConfig:
    # A token must be able to carry its patch: (1, 4, 4) patches of RGB-D are 64 values for a
    # 128-wide model. With 32 x 32 frames in (2, 8, 8) patches (512 values squeezed through
    # 128 dims) the velocity loss plateaued at 0.83 after 200 steps and closed-loop frames
    # stayed noise-like (PSNR_C ≈ 8 dB); 32 x 32 in (2, 4, 4) patches trained ≈ 4x slower.
    return VideoModelConfig(
        frame_size=(16, 16),
        num_target_frames=8,
        num_prev_frames=2,
        max_refs=4,
        patch_size=(1, 4, 4),
        dim=128,
        depth=6,
        num_heads=4,
        mlp_hidden=512,
        freq_dim=128,
        control_layers=(0, 2, 4),
        num_instructions=8,
        hist_noise_max=0.05,
        lora_rank=16,
        lora_alpha=16.0,
        sample_steps=16,
        guidance_scale=2.0,
    )


def paper() -> VideoModelConfig:
    return VideoModelConfig(
        channels=48,
        hole_channels=48,
        frame_size=(44, 78),
        num_target_frames=18,
        num_prev_frames=3,
        max_refs=7,
        patch_size=(1, 2, 2),
        dim=3072,
        depth=30,
        num_heads=24,
        mlp_hidden=14336,
        freq_dim=256,
        control_layers=tuple(range(0, 30, 4)),
        num_instructions=64,
        remat=True,
        attention_chunk=1024,
        timestep_shift=1.0,
        cond_drop_prob=0.1,
        hist_noise_max=0.05,
        lora_rank=64,
        lora_alpha=64.0,
        sampler="euler",
        sample_steps=40,
        sample_shift=5.0,
        guidance_scale=3.5,
    )
