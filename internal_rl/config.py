"""Configs and presets (tiny | small | paper) for the internal-RL part-1 pipeline.

`tiny` runs pretrain + probe + control in a few minutes on 2 CPU cores (smoke scale),
`small` is the CPU reproduction of spec §10.2 (about an hour of pretraining), `paper` is
the paper's Tables A4 / A6 / A7 / A16 (GPU scale; tested to build and run one step).
"""

from __future__ import annotations

import dataclasses

from common.config import get_preset, override
from common.train import OptimizerConfig
from internal_rl.models.transformer import ModelConfig


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    size: int = 7
    num_colours: int = 8
    num_walls: int = 4
    horizon: int = 100


@dataclasses.dataclass(frozen=True)
class DataConfig:
    batch_size: int = 64
    max_len: int = 40  # steps per padded expert trajectory (longer episodes are dropped)
    epsilon: float = 0.0  # expert suboptimality (Fig. A2 varies 0..0.2)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 6000
    obs_coef: float = 0.01  # λ of Eq. 5 (paper searched {0, 0.01})
    optim: OptimizerConfig = OptimizerConfig(
        name="adamw", learning_rate=3e-4, schedule="constant", weight_decay=0.03,
        total_steps=6000, grad_clip_norm=1.0)
    log_every: int = 50
    save_every: int = 500
    eval_every: int = 1000
    eval_episodes: int = 256  # closed-loop success of the base model on pretraining tasks


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    train_trajectories: int = 2048
    eval_trajectories: int = 512
    steps: int = 2000
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_position: int = 16  # accuracy-by-position bins 0..max_position-1 (larger clipped)
    checkpoints: tuple[int, ...] = ()  # earlier pretraining steps also probed (Fig. A1 view)


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    layers: tuple[int, ...] = ()  # insertion layers to sweep; () = every layer 0..L
    rank: int = 16
    hidden: int = 32
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.03
    save_every: int = 500
    eval_episodes: int = 1000
    greedy: bool = False  # sample actions from the controlled policy (choice §8.16)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    env: EnvConfig = EnvConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    probe: ProbeConfig = ProbeConfig()
    control: ControlConfig = ControlConfig()

    def __post_init__(self):
        if self.data.max_len > self.env.horizon:
            raise ValueError(f"data.max_len={self.data.max_len} exceeds env.horizon={self.env.horizon}")
        bad = [layer for layer in self.control.layers if not 0 <= layer <= self.model.depth]
        if bad:
            raise ValueError(f"control.layers {bad} outside 0..model.depth={self.model.depth}")

    @property
    def control_layers(self) -> tuple[int, ...]:
        """Layers to sweep, the middle (L/2, the paper's choice) first so that an
        interrupted sweep has the most informative result."""
        layers = self.control.layers or tuple(range(self.model.depth + 1))
        return tuple(sorted(layers, key=lambda i: (abs(2 * i - self.model.depth), i)))


def _optim(steps: int, lr: float, wd: float, clip: float | None = 1.0) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", learning_rate=lr, schedule="constant",
                           weight_decay=wd, total_steps=steps, grad_clip_norm=clip)


def tiny() -> Config:
    """Smoke scale: a few minutes on 2 CPU cores for pretrain + probe + control."""
    return Config(
        data=DataConfig(batch_size=32, max_len=40),
        model=ModelConfig(dim=64, depth=2, num_heads=2, mlp_hidden=128),
        pretrain=PretrainConfig(steps=300, optim=_optim(300, 1e-3, 0.03), log_every=25,
                                save_every=100, eval_every=300, eval_episodes=64),
        probe=ProbeConfig(train_trajectories=256, eval_trajectories=128, steps=300, batch_size=256),
        control=ControlConfig(steps=150, batch_size=32, save_every=150, eval_episodes=128),
    )


def small() -> Config:
    """Spec §10.2: d 128, L 4, batch 64, 6k steps (~1 h on 2 CPU cores)."""
    return Config(probe=ProbeConfig(checkpoints=(1000, 2000, 4000)))


def paper() -> Config:
    """Tables A4 (pretraining), A6 (probes), A7 (controllers), A16 (transformer)."""
    return Config(
        data=DataConfig(batch_size=1024, max_len=100),
        model=ModelConfig(dim=256, depth=6, num_heads=4, mlp_hidden=512),
        pretrain=PretrainConfig(steps=256_000, optim=_optim(256_000, 3e-4, 0.03, None),
                                log_every=100, save_every=4000, eval_every=16_000,
                                eval_episodes=1024),
        probe=ProbeConfig(train_trajectories=16_384, eval_trajectories=2048, steps=8000,
                          batch_size=512, learning_rate=1e-3, weight_decay=0.0,
                          checkpoints=(16_000, 32_000, 64_000, 128_000)),
        control=ControlConfig(rank=16, hidden=32, steps=3200, batch_size=512,
                              learning_rate=1e-3, weight_decay=0.03, save_every=800,
                              eval_episodes=1024),
    )


PRESETS = {"tiny": tiny, "small": small, "paper": paper}


def make_config(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset by name with dotted `key=value` overrides (e.g. "model.depth=6")."""
    return override(get_preset(PRESETS, preset), list(overrides))
