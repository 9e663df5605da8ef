"""Configs and presets (tiny | small | paper) for the continuous pinpad pipeline.

Sections: env (Point-pinpad now, MJX Ant-pinpad as the GPU path), data (scripted expert
D with action noise, D* without), model (the Hawk base model), pretrain, probe, and the
later stages' settings (metacontroller + mctrain, rl) so that one config describes a
whole continuous run. `tiny` fits a test (a few steps of a small model), `small` is the
CPU plan B of docs/internal_rl.md D23 (Hawk d=128, L=4, λ=10, AdamW 3e-4 wd 0.03, batch 32, T=200,
~4000 steps), `paper` holds the ant hyperparameters (Tables A5, A10, A14, A15).
"""

from __future__ import annotations

import dataclasses
import functools

from common.config import get_preset, override, require
from common.train import OptimizerConfig
from internal_rl.config import (
    ChainConfig,
    ControlConfig,
    MetaTrainConfig,
    ProbeConfig,
    ReproduceConfig,
    adamw,
)
from internal_rl.metacontroller import MetacontrollerConfig
from internal_rl.models.hawk import HawkConfig
from internal_rl.rl import RLConfig

ENV_KINDS = ("point", "ant")
POINT_OBS_DIM, POINT_ACTION_DIM = 16, 2  # PointPinpad with 4 colours and 1 wall


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """A continuous pinpad (Point-pinpad: docs/internal_rl.md D23; Ant-pinpad: internal RL
    App. A.2, docs/internal_rl.md D7-D9)."""

    kind: str = "point"
    size: int = 4
    cell_size: float = 1.0  # point: 1, ant: 2 (docs/internal_rl.md D23, D8)
    num_colours: int = 4
    num_walls: int = 1
    horizon: int = 200  # T: point 200 (docs/internal_rl.md D23), ant 500 (App. A.2)
    frame_skip: int = 5

    def __post_init__(self):
        require(self, "kind", self.kind in ENV_KINDS, f"one of {ENV_KINDS}")
        require(self, "horizon", self.horizon >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Expert data: D (pretraining) samples the expert with Gaussian action noise, D*
    (controllers, metacontroller) uses its noise-free actions (internal RL App. C.1.1,
    docs/internal_rl.md D23)."""

    batch_size: int = 32
    max_len: int = 200  # steps per padded trajectory (episodes not done by then are dropped)
    noise_std: float = 0.1  # D
    star_noise_std: float = 0.0  # D*
    n_candidates: int | None = None  # episodes rolled out per batch; None = B + max(8, B/4)
    # Ant only: the `python -m internal_rl.ant_expert` run whose latest checkpoint is the
    # expert; noise_std / star_noise_std then scale the expert's own std (1 = sample, 0 = mean)
    expert_run_dir: str | None = None

    def __post_init__(self):
        req = functools.partial(require, self)
        req("batch_size", self.batch_size >= 1, ">= 1")
        req("max_len", self.max_len >= 1, ">= 1")
        req("noise_std", self.noise_std >= 0, ">= 0")
        req("star_noise_std", self.star_noise_std >= 0, ">= 0")
        req(
            "n_candidates",
            self.n_candidates is None or self.n_candidates >= self.batch_size,
            f"None or >= batch_size ({self.batch_size})",
        )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 4000
    obs_coef: float = 10.0  # λ of Eq. 5 (ant: 10, Table A5)
    optim: OptimizerConfig = adamw(4000, 3e-4)
    log_every: int = 50
    save_every: int = 250
    eval_every: int = 500  # 0: only at the end
    eval_episodes: int = 128  # closed-loop episodes per task set (pretraining, held-out); 0: none

    def __post_init__(self):
        require(self, "steps", self.steps >= 0, ">= 0")
        require(self, "eval_episodes", self.eval_episodes >= 0, ">= 0")


@dataclasses.dataclass(frozen=True)
class Config(ChainConfig):
    seed: int = 0
    env: EnvConfig = EnvConfig()
    data: DataConfig = DataConfig()
    model: HawkConfig = HawkConfig(obs_dim=POINT_OBS_DIM, action_dim=POINT_ACTION_DIM)
    pretrain: PretrainConfig = PretrainConfig()
    probe: ProbeConfig = ProbeConfig()
    control: ControlConfig = ControlConfig()
    metacontroller: MetacontrollerConfig = MetacontrollerConfig()
    mctrain: MetaTrainConfig = MetaTrainConfig()
    rl: RLConfig = RLConfig()
    reproduce: ReproduceConfig = ReproduceConfig()


def tiny() -> Config:
    """Test scale: a 2-layer, 32-wide Hawk trained for 40 steps of batch 8 on episodes cut
    at 128 steps (the point expert needs at most ≈130 steps, mean ≈70, so few are lost)."""
    return Config(
        env=EnvConfig(horizon=128),
        data=DataConfig(batch_size=8, max_len=128, n_candidates=12),
        model=HawkConfig(
            dim=32,
            depth=2,
            num_heads=4,
            mlp_hidden=64,
            obs_dim=POINT_OBS_DIM,
            action_dim=POINT_ACTION_DIM,
        ),
        pretrain=PretrainConfig(
            steps=40,
            optim=adamw(40, 3e-3),
            log_every=10,
            save_every=20,
            eval_every=20,
            eval_episodes=16,
        ),
        probe=ProbeConfig(
            train_trajectories=32, eval_trajectories=16, steps=100, batch_size=128, max_position=8
        ),
        metacontroller=MetacontrollerConfig(rank=32, embed_width=32),
        mctrain=MetaTrainConfig(
            steps=100,
            batch_size=8,
            optim=adamw(100, 3e-4),
            alphas=(0.1,),
            cotrain_steps=100,
            cotrain_optim=adamw(100, 3e-4),
            save_every=50,
        ),
        control=ControlConfig(
            layers=(1,),
            steps=20,
            batch_size=8,
            optim=adamw(20, 1e-3),
            save_every=10,
            eval_episodes=16,
        ),
        rl=RLConfig(
            episodes=64, batch_episodes=32, optim=adamw(2, 1e-3, wd=0.0), updates_per_call=2
        ),
        reproduce=ReproduceConfig(
            rl_seeds=1, methods=("internal_rl", "raw_action_rl"), diagnostic_methods=()
        ),
    )


def small() -> Config:
    """CPU plan B of docs/internal_rl.md D23: Point-pinpad, T = 200, Hawk d = 128, L = 4
    (MLP 256, 8 gate heads), λ = 10, AdamW 3e-4 / wd 0.03 constant, batch 32, 4000 steps
    (paper: d 256, L 8, 204800 steps of batch 512). Later stages, cut to fit one CPU session:
    - controllers at layers 0, 2, 4 only, 500 steps of batch 32 on D*;
    - metacontroller: full-rank linear control (rank = d) at lr 3e-4, α ∈ {0.01, 0.03,
      0.1, 0.3} (plan B: {0.1, 0.3}; the grid world's best α was 0.03), 1000 steps each
      (plan B: 2000), β ≡ 1 at the selected α, no co-training;
    - RL: 100 updates of 128 episodes (12,800 episodes, plan B: ≈1e5) at lr 1e-3 (raw-action
      RL 1e-4), 2 seeds per method, on the held-out task 0-1-2-3 and (internal and
      raw-action RL) on the diagnostic task 0-3-2-1 of seen transitions."""
    return Config(
        model=HawkConfig(
            dim=128,
            depth=4,
            num_heads=8,
            mlp_hidden=256,
            obs_dim=POINT_OBS_DIM,
            action_dim=POINT_ACTION_DIM,
        ),
        pretrain=PretrainConfig(
            steps=4000,
            optim=adamw(4000, 3e-4),
            log_every=50,
            save_every=250,
            eval_every=500,
            eval_episodes=128,
        ),
        probe=ProbeConfig(
            train_trajectories=512,
            eval_trajectories=256,
            steps=2000,
            batch_size=512,
            max_position=24,
            checkpoints=(1000, 2000),
        ),
        control=ControlConfig(
            layers=(0, 2, 4),
            steps=500,
            batch_size=32,
            optim=adamw(500, 1e-3),
            save_every=250,
            eval_episodes=256,
        ),
        metacontroller=MetacontrollerConfig(rank=128),
        mctrain=MetaTrainConfig(
            steps=1000,
            batch_size=32,
            optim=adamw(1000, 3e-4),
            alphas=(0.01, 0.03, 0.1, 0.3),
            save_every=250,
            cotrain_steps=4000,
            cotrain_optim=adamw(4000, 3e-4),
            cotrain_from_scratch=False,
        ),
        rl=RLConfig(episodes=12_800, batch_episodes=128, optim=adamw(100, 1e-3, wd=0.0)),
        reproduce=ReproduceConfig(
            rl_seeds=2,
            rl_tasks=("heldout", "seen_transitions"),
            methods=("internal_rl", "raw_action_rl", "no_temporal_abstraction"),
        ),
    )


def paper() -> Config:
    """MJX Ant-pinpad with the paper's hyperparameters: Table A5 (pretraining: Hawk depth
    8, n_e 256, λ 10, 204800 steps of batch 512, AdamW 3e-4 wd 0.03 constant), Table A15
    (LRU width 256, 8 heads, MLP 512, init scale 0.1), Table A6 (probes), Table A10
    (metacontroller: full linear at L/2, 32000 steps of batch 128, lr 3e-4, wd 0.03),
    Table A14 (RL: 51200 updates of batch 256, lr 3e-5, wd 0). Env: T = 500, cell size 2
    (docs/internal_rl.md D8); obs 41-d, 8 torques. Data D samples the trained Ant PPO expert of
    data.expert_run_dir (`python -m internal_rl.ant_expert --preset paper --run-dir
    runs/ant_expert`), D* takes its mean."""
    return Config(
        env=EnvConfig(kind="ant", cell_size=2.0, horizon=500),
        data=DataConfig(
            batch_size=512, max_len=500, noise_std=1.0, expert_run_dir="runs/ant_expert"
        ),
        model=HawkConfig(
            dim=256,
            depth=8,
            lru_width=256,
            num_heads=8,
            mlp_hidden=512,
            init_scale=0.1,
            obs_dim=41,
            action_dim=8,
        ),
        pretrain=PretrainConfig(
            steps=204_800,
            optim=adamw(204_800, 3e-4, clip=None),
            log_every=100,
            save_every=4000,
            eval_every=16_000,
            eval_episodes=1024,
        ),
        probe=ProbeConfig(
            train_trajectories=16_384,
            eval_trajectories=2048,
            steps=8000,
            batch_size=512,
            optim=adamw(8000, 1e-3, wd=0.0, clip=None),
            max_position=32,
            checkpoints=(16_000, 32_000, 64_000, 128_000),
        ),
        metacontroller=MetacontrollerConfig(rank=256),
        mctrain=MetaTrainConfig(
            steps=32_000,
            batch_size=128,
            optim=adamw(32_000, 3e-4, 0.03),
            alphas=(0.0, 0.05, 0.1, 0.17, 0.3, 0.5, 1.0),
            seeds=3,
            cotrain_steps=204_800,
            cotrain_optim=adamw(204_800, 3e-4),
            cotrain_from_scratch=False,
            save_every=4000,
            log_every=100,
            eval_batches=8,
        ),
        rl=RLConfig(
            episodes=51_200 * 256,
            batch_episodes=256,
            optim=adamw(51_200, 3e-5, wd=0.0),
            entropy_coef=0.0,
            policy_width=256,
            updates_per_call=100,
        ),
    )


PRESETS = {"tiny": tiny, "small": small, "paper": paper}


def make_config(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset by name with dotted `key=value` overrides (e.g. "model.depth=6")."""
    return override(get_preset(PRESETS, preset), list(overrides))
