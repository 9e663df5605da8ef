"""lir experiment configs (frozen dataclasses, ``common.config``) and the presets
``tiny`` / ``small`` / ``paper``.

    from common.config import get_preset, override
    cfg = override(get_preset(PRESETS, "tiny"), ["finetune.num_latents=4"])

Every trained section nests a ``common.train.OptimizerConfig`` as ``optim`` (so
``--set pretrain.optim.learning_rate=3e-4`` / ``--set finetune.optim.learning_rate=1e-3`` work
as in the other packages). Phase P uses ``pretrain.optim`` as given (``total_steps`` is its
length). Phase F restarts the optimizer for every stage (LIVR App. B), so ``finetune.optim``
is a template: :func:`stage_optimizer` fills in each stage's ``total_steps``, its warmup
(``finetune.warmup_fraction`` of the stage) and ``finetune.accumulation_steps``.

One run keeps ``data.max_latents`` fixed for pretraining and every fine-tuning arm: the
TAIL/answer position id is ``Layout.tail_position`` = (end of the prompt range) + max_latents
(``lir.data``), so it must not change between the pretrained model and the arms that add
latents.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from common.config import require
from common.train import OptimizerConfig
from lir.data import Layout
from lir.model import LM_LORA_TARGETS, LoRAConfig, ModelConfig
from lir.tasks.registry import TASK_NAMES


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Examples per task and split (docs/lir.md D17: 1,000 / 250 / 1,000; test from the shifted
    generator) and the static sequence layout."""

    image_size: int = 48
    n_train: int = 1000
    n_val: int = 250
    n_test: int = 1000
    max_prompt_len: int = 12
    max_images: int = 3
    max_latents: int = 32


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Phase P (docs/lir.md D14): the whole tiny LMM on a generic single-image QA mixture.
    ``optim.total_steps`` optimizer updates of ``batch_size`` examples (times
    ``optim.accumulation_steps`` train-step calls each)."""

    batch_size: int = 32
    n_examples: int = 6000
    optim: OptimizerConfig = OptimizerConfig(
        learning_rate=1e-3, warmup_steps=100, total_steps=3000, weight_decay=0.01
    )

    def __post_init__(self):
        req = functools.partial(require, self)
        req("batch_size", self.batch_size >= 1, ">= 1")
        req("n_examples", self.n_examples >= self.batch_size, f">= batch_size ({self.batch_size})")

    @property
    def calls(self) -> int:
        """Train-step calls of phase P (optimizer updates x accumulation steps)."""
        return self.optim.total_steps * self.optim.accumulation_steps


# The fields of ``finetune.optim`` that :func:`stage_optimizer` sets per stage, and the
# FinetuneConfig field that says how.
_PER_STAGE = {
    "warmup_steps": "warmup_fraction",
    "total_steps": "the epoch counts",
    "accumulation_steps": "accumulation_steps",
}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Phase F (LIVR §4.3, App. B; docs/lir.md D17): LoRA (+ latents for LIVR) on a frozen LMM.

    ``optim`` (AdamW, cosine decay to 0) is restarted (fresh moments and schedule) for each
    LIVR stage, with ``warmup_fraction`` of the stage as linear warmup (:func:`stage_optimizer`;
    its ``warmup_steps`` / ``total_steps`` / ``accumulation_steps`` are set per stage and must
    stay at their defaults here). Effective batch = batch_size x accumulation_steps (the
    paper: 1 x 8; here 8 x 1, the same effective batch).

    ``prompt_tuning_optim`` is the optimizer of the prompt-tuning arm (LIVR Table 3). That arm
    trains another parameter group (K soft vectors, no LoRA, after Lester et al.) and the
    paper gives no recipe for it, so it has its own section rather than sharing the LoRA
    recipe: docs/lir.md D11 keeps the AdamW settings and raises the learning rate to 3e-3.
    """

    optim: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, weight_decay=0.01)
    prompt_tuning_optim: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, weight_decay=0.01)
    warmup_fraction: float = 0.05
    batch_size: int = 8
    accumulation_steps: int = 1
    sft_epochs: int = 10
    stage1_epochs: int = 4
    stage2_epochs: int = 6
    multitask_sft_epochs: int = 5
    multitask_stage1_epochs: int = 2
    multitask_stage2_epochs: int = 3
    num_latents: int = 16
    latent_init_std: float = 0.02
    # rows per evaluation call (validation each epoch, test diagnostics); shapes are fixed,
    # the last partial batch is padded and weighted out
    eval_batch_size: int = 100
    lora: LoRAConfig = LoRAConfig()

    def __post_init__(self):
        req = functools.partial(require, self)
        req(
            "stage1_epochs",
            self.stage1_epochs + self.stage2_epochs == self.sft_epochs,
            f"stage1_epochs + stage2_epochs ({self.stage2_epochs}) == sft_epochs "
            f"({self.sft_epochs}), so LIVR and SFT get the same budget",
        )
        req("warmup_fraction", 0 <= self.warmup_fraction < 1, "in [0, 1)")
        req("batch_size", self.batch_size >= 1, ">= 1")
        req("accumulation_steps", self.accumulation_steps >= 1, ">= 1")
        default = OptimizerConfig()
        for section in ("optim", "prompt_tuning_optim"):
            opt = getattr(self, section)
            for name, how in _PER_STAGE.items():
                req(
                    section,
                    getattr(opt, name) == getattr(default, name),
                    f"{section}.{name} left at its default {getattr(default, name)}: it is set "
                    f"for each stage from {how}",
                )


LATENT_DESIGNS = ("before_prompt", "shared")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Ablation sweeps (LIVR Table 4(b-c), docs/lir.md D17): stage-1 epochs at a fixed total,
    and K."""

    tasks: tuple[str, ...] = (
        "localization",
        "semantic_correspondence",
        "functional_correspondence",
    )
    stage1_epochs: tuple[int, ...] = (0, 2, 4, 6, 8)
    num_latents: tuple[int, ...] = (4, 8, 16, 32)
    # stage-1 mask variants besides the default bottleneck (LIVR Table 4(a))
    mask_variants: tuple[str, ...] = ("answer_only", "bottleneck_no_latent_prompt")
    # latent-design ablations besides the default (unshared, after the prompt)
    latent_designs: tuple[str, ...] = ("before_prompt", "shared")
    seeds: tuple[int, ...] = (0, 1, 2)
    # Table 2: multi-task SFT vs LIVR on the union of ``LIRConfig.tasks`` (empty: skipped)
    multitask_seeds: tuple[int, ...] = ()

    def __post_init__(self):
        require(
            self,
            "latent_designs",
            all(d in LATENT_DESIGNS for d in self.latent_designs),
            f"names from {LATENT_DESIGNS}",
        )


ARM_NAMES = ("sft", "livr", "latents_only", "mask_only", "prompt_tuning")


@dataclasses.dataclass(frozen=True)
class LIRConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    sweep: SweepConfig = SweepConfig()
    tasks: tuple[str, ...] = TASK_NAMES
    # fine-tuning arms of the Table-1 analogue (zero-shot is always evaluated)
    arms: tuple[str, ...] = ARM_NAMES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seed: int = 42

    def __post_init__(self):
        req = functools.partial(require, self)
        req("tasks", all(t in TASK_NAMES for t in self.tasks), f"task names from {TASK_NAMES}")
        require(
            self.sweep,
            "tasks",
            all(t in TASK_NAMES for t in self.sweep.tasks),
            f"task names from {TASK_NAMES}",
        )
        req("arms", all(a in ARM_NAMES for a in self.arms), f"arm names from {ARM_NAMES}")
        require(
            self.model,
            "image_size",
            self.model.image_size == self.data.image_size,
            f"== data.image_size ({self.data.image_size})",
        )
        require(
            self.model,
            "max_images",
            self.model.max_images >= self.data.max_images,
            f">= data.max_images ({self.data.max_images})",
        )
        k_max = max((self.finetune.num_latents,) + self.sweep.num_latents)
        require(
            self.data,
            "max_latents",
            k_max <= self.data.max_latents,
            f">= every K used (finetune.num_latents and sweep.num_latents; largest {k_max})",
        )


def layout(
    cfg: LIRConfig,
    num_latents: int,
    n_images: int | None = None,
    latent_placement: str = "after_prompt",
) -> Layout:
    """The batch :class:`lir.data.Layout` of this run for ``num_latents`` latent slots."""
    return Layout(
        n_images=n_images or cfg.data.max_images,
        image_size=cfg.data.image_size,
        patch_size=cfg.model.patch_size,
        max_prompt_len=cfg.data.max_prompt_len,
        num_latents=num_latents,
        max_latents=cfg.data.max_latents,
        latent_placement=latent_placement,
    )


def model_config(cfg: LIRConfig, num_latents: int | None = None) -> ModelConfig:
    """``cfg.model`` with its latent table sized for ``num_latents`` (default the run's K)."""
    k = cfg.finetune.num_latents if num_latents is None else num_latents
    return dataclasses.replace(
        cfg.model, num_latents=k, latent_init_std=cfg.finetune.latent_init_std
    )


def stage_optimizer(
    ft: FinetuneConfig, steps: int, optim: OptimizerConfig | None = None
) -> OptimizerConfig:
    """The ``common.train.OptimizerConfig`` of one fine-tuning stage of ``steps`` optimizer
    updates: ``optim`` (default ``ft.optim``; AdamW, cosine to 0 in every preset) with
    ceil(warmup_fraction * steps) warmup and ``ft.accumulation_steps``
    (LIVR App. B, docs/lir.md D5)."""
    if steps < 1:
        raise ValueError(f"a stage needs >= 1 optimizer step; got {steps}")
    warmup = min(math.ceil(ft.warmup_fraction * steps), steps - 1)
    return dataclasses.replace(
        ft.optim if optim is None else optim,
        warmup_steps=warmup,
        total_steps=steps,
        accumulation_steps=ft.accumulation_steps,
    )


def steps_per_epoch(ft: FinetuneConfig, n_train: int) -> int:
    """Optimizer updates per epoch (full batches only)."""
    return n_train // (ft.batch_size * ft.accumulation_steps)


def tiny() -> LIRConfig:
    """About 5 minutes on 2 CPU cores (``make demo``): 32 px single-image tasks with 16 image
    tokens (max_images 1 keeps sequences at 41 tokens), a 2+2-layer 64-wide LMM, a short
    phase P, three tasks (relative reflectance, localization and the negative control), the
    four trained arms of Table 1, 2 seeds, 320 training examples, no ablation sweeps."""
    return LIRConfig(
        model=ModelConfig(
            image_size=32,
            patch_size=8,
            vit_dim=64,
            vit_depth=2,
            vit_heads=4,
            lm_dim=64,
            lm_depth=2,
            lm_heads=4,
            max_images=1,
            num_latents=8,
        ),
        data=DataConfig(
            image_size=32, n_train=320, n_val=100, n_test=300, max_images=1, max_latents=8
        ),
        pretrain=PretrainConfig(
            batch_size=32,
            n_examples=2400,
            optim=OptimizerConfig(
                learning_rate=1e-3, warmup_steps=50, total_steps=600, weight_decay=0.01
            ),
        ),
        finetune=FinetuneConfig(num_latents=8, lora=LoRAConfig(rank=8, alpha=16.0)),
        sweep=SweepConfig(
            tasks=(),
            stage1_epochs=(0, 4, 8),
            num_latents=(4, 8),
            mask_variants=(),
            latent_designs=(),
            seeds=(0,),
        ),
        tasks=("relative_reflectance", "localization", "colour_control"),
        arms=("sft", "livr", "latents_only", "mask_only"),
        seeds=(0, 1),
    )


def small() -> LIRConfig:
    """The committed report, about 1.5 hours on 2 CPU cores: 32 px images (16 tokens
    each, up to 3 images, 77-token sequences), ViT 64x2 and LM 64x3 (the docs/lir.md D15 widths of
    96x4 cost 3.6x more per phase-F step at 32 px here, 72 vs 20 ms at batch 8), K = 8, LoRA r 8 / alpha 16,
    the paper's 1k/250/1k examples and 10-epoch budget, 5 seeds, the four trained Table-1
    arms, on the three tasks that direct SFT lifts above chance from this phase-P model
    (localization, relative reflectance, counting) plus the negative control; the
    stage-split / K / mask / latent-design ablations on localization (one of the paper's three
    ablation tasks) and the multi-task run (Table 2) with 3 seeds. Jigsaw, visual
    correspondence and visual similarity stay at chance under SFT here (one-seed pilot in
    reports/lir/small/report.md), because phase P does not teach the skills they recombine."""
    return LIRConfig(
        model=ModelConfig(image_size=32, vit_depth=2, lm_dim=64, lm_depth=3, num_latents=8),
        data=DataConfig(image_size=32, max_latents=16),
        pretrain=PretrainConfig(
            batch_size=32,
            n_examples=12000,
            optim=OptimizerConfig(
                learning_rate=1e-3, warmup_steps=100, total_steps=3000, weight_decay=0.01
            ),
        ),
        finetune=FinetuneConfig(num_latents=8, lora=LoRAConfig(rank=8, alpha=16.0)),
        sweep=SweepConfig(
            tasks=("localization",),
            stage1_epochs=(0, 2, 4, 6, 8),
            num_latents=(4, 8, 16),
            seeds=(0, 1, 2),
            multitask_seeds=(0, 1, 2),
        ),
        tasks=("localization", "relative_reflectance", "counting", "colour_control"),
        arms=("sft", "livr", "latents_only", "mask_only"),
        seeds=(0, 1, 2, 3, 4),
    )


def paper() -> LIRConfig:
    """The paper's fine-tuning recipe (LIVR §3.3, App. B): AdamW lr 1e-4, wd 0.01, betas
    (0.9, 0.999), eps 1e-8, 5% warmup + cosine per stage, effective batch 8, K = 16, LoRA
    r 16 / alpha 32 / dropout 0.05 on q,k,v,o,gate,up,down of the LM, SFT 10 epochs vs LIVR
    4 + 6, seed 42. Runs on the tiny model here and later on a ported backbone."""
    return LIRConfig(
        model=ModelConfig(num_latents=16),
        data=DataConfig(max_latents=32),
        finetune=FinetuneConfig(
            optim=OptimizerConfig(
                name="adamw",
                learning_rate=1e-4,
                weight_decay=0.01,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                schedule="cosine",
                end_lr_fraction=0.0,
            ),
            warmup_fraction=0.05,
            batch_size=8,
            accumulation_steps=1,
            sft_epochs=10,
            stage1_epochs=4,
            stage2_epochs=6,
            num_latents=16,
            lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.05, targets=LM_LORA_TARGETS),
        ),
        sweep=SweepConfig(seeds=(42,), multitask_seeds=(42,)),
        seeds=(42,),
        seed=42,
    )


PRESETS = {"tiny": tiny, "small": small, "paper": paper}
