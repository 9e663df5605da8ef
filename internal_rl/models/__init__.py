"""Sequence models of internal RL: the base autoregressive transformer (grid world)."""

from internal_rl.models.transformer import (
    BaseModel,
    ModelConfig,
    ModelOutput,
    masked_mean,
    pretrain_loss,
    sequence_losses,
)

__all__ = [
    "BaseModel",
    "ModelConfig",
    "ModelOutput",
    "masked_mean",
    "pretrain_loss",
    "sequence_losses",
]
