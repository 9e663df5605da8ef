"""The base autoregressive model for Gridworld-pinpad (internal RL App. D.1, Table A16).

One token per time step: the 637-d binary observation is linearly embedded to n_e, run
through a causal pre-norm `common.nn.TransformerStack` (RMSNorm, ReLU MLP, T5 bucketed
relative position bias with 32 buckets shared by all layers, all initialisers
variance-scaled by 0.1), final-normed, and read out by two heads at the same position t:
the action head p(a_t | o_1:t) (4-way) and the observation head p(o_t+1 | o_1:t), which
is 13 independent 49-way softmaxes, one per entity (docs/internal_rl.md D2). Past actions are not
fed back (Alg. 1).

Residual stream indexing (docs/internal_rl.md D21): e_{t,0} is the embedding, e_{t,l} the output
of block l.
`__call__` returns all L+1 streams and accepts an intervention `e -> ê` at layer l;
`decode_step` is the one-token-at-a-time version with per-layer KV caches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import KVCache, TransformerStack, dense


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base-model hyperparameters (paper Table A16: dim 256, depth 6, 4 heads, MLP 512)."""

    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_hidden: int = 256
    num_buckets: int = 32
    max_distance: int = 128  # docs/internal_rl.md D5
    init_scale: float = 0.1  # variance-scaling factor of every initialiser
    obs_dim: int = 637
    num_actions: int = 4
    num_entities: int = 13  # observation = num_entities one-hots over num_cells
    num_cells: int = 49

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(
                f"model.dim={self.dim} not divisible by model.num_heads={self.num_heads}"
            )
        if self.depth < 1:
            raise ValueError(f"model.depth: expected >= 1, got {self.depth}")
        if self.num_entities * self.num_cells != self.obs_dim:
            raise ValueError(
                f"model.num_entities*num_cells={self.num_entities * self.num_cells} must equal "
                f"model.obs_dim={self.obs_dim}"
            )


class ModelOutput(NamedTuple):
    """action_logits f32 [B, T, A]; obs_logits f32 [B, T, E, C] (E entities over C cells);
    residuals f32 [L+1, B, T, D] (None if not requested)."""

    action_logits: jax.Array
    obs_logits: jax.Array
    residuals: jax.Array | None


Intervention = Callable[[jax.Array], jax.Array]


def categorical_action(key: jax.Array, logits: jax.Array, greedy=False) -> jax.Array:
    """int32 [N]: a sample of softmax(logits f32 [N, A]), or its argmax when greedy
    (greedy may be traced)."""
    return jnp.where(
        greedy, jnp.argmax(logits, axis=-1), jax.random.categorical(key, logits, axis=-1)
    ).astype(jnp.int32)


class BaseModel(nnx.Module):
    """Causal transformer over observations with action and next-observation heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
        self.embed = dense(cfg.obs_dim, cfg.dim, kernel_init=init, rngs=rngs)
        self.stack = TransformerStack(
            cfg.depth,
            cfg.dim,
            cfg.num_heads,
            cfg.mlp_hidden,
            relative_bias=True,
            num_buckets=cfg.num_buckets,
            max_distance=cfg.max_distance,
            # docs/internal_rl.md D5: RMSNorm; one T5 bias table shared by all layers
            activation="relu",
            norm="rms",
            final_norm=True,
            kernel_init=init,
            rngs=rngs,
        )
        self.action_head = dense(cfg.dim, cfg.num_actions, kernel_init=init, rngs=rngs)
        self.obs_head = dense(
            cfg.dim, cfg.num_entities * cfg.num_cells, kernel_init=init, rngs=rngs
        )

    def _check_obs(self, obs: jax.Array, ndim: int, what: str) -> None:
        if obs.ndim != ndim or obs.shape[-1] != self.cfg.obs_dim:
            raise ValueError(
                f"BaseModel: expected obs {what} with D={self.cfg.obs_dim}, "
                f"got shape {tuple(obs.shape)}"
            )

    def _heads(self, out: jax.Array, residuals) -> ModelOutput:
        b, t, _ = out.shape
        obs_logits = self.obs_head(out).reshape(b, t, self.cfg.num_entities, self.cfg.num_cells)
        return ModelOutput(self.action_head(out), obs_logits, residuals)

    def __call__(
        self,
        obs: jax.Array,
        *,
        intervention: Intervention | None = None,
        intervention_layer: int | None = None,
        return_residuals: bool = True,
    ) -> ModelOutput:
        """Full causal forward. obs f32 [B, T, 637] -> ModelOutput.

        intervention(e [B, T, D]) -> ê [B, T, D] replaces stream `intervention_layer`
        (0..L) before the later blocks run; residuals then hold the edited stream there.
        """
        self._check_obs(obs, 3, "[B, T, D]")
        x = self.embed(obs.astype(jnp.float32))
        t = x.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        res = self.stack(
            x,
            mask=mask,
            return_residuals=return_residuals,
            intervention=intervention,
            intervention_layer=intervention_layer,
        )
        return self._heads(res.out, res.residuals)

    def init_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """Empty KV caches (one per layer) for `decode_step`, holding max_len tokens."""
        return self.stack.init_caches(batch, max_len)

    def decode_step(
        self,
        obs_t: jax.Array,
        caches: list[KVCache],
        *,
        intervention: Intervention | None = None,
        intervention_layer: int | None = None,
        return_residuals: bool = True,
    ) -> tuple[ModelOutput, list[KVCache]]:
        """One token. obs_t f32 [B, 637] -> (ModelOutput with T = 1, updated caches).

        Equals `__call__` on the whole prefix at the same position (tested); the caller
        keeps the number of steps <= the caches' max_len.
        """
        self._check_obs(obs_t, 2, "[B, D]")
        x = self.embed(obs_t.astype(jnp.float32))[:, None]
        res = self.stack(
            x,
            caches=caches,
            return_residuals=return_residuals,
            intervention=intervention,
            intervention_layer=intervention_layer,
        )
        return self._heads(res.out, res.residuals), res.caches

    # -- the policy interface shared with `HawkModel` (controllers, metacontroller, RL) --
    def sequence_losses(
        self, out: ModelOutput, batch: dict[str, jax.Array]
    ) -> dict[str, jax.Array]:
        """Per-step losses of a forward pass (`sequence_losses`)."""
        return sequence_losses(out, batch)

    @staticmethod
    def policy_head(out: ModelOutput) -> jax.Array:
        """The action distribution of a one-token output: logits f32 [B, A]."""
        return out.action_logits[:, 0]

    sample_action = staticmethod(categorical_action)

    @staticmethod
    def action_log_prob(logits: jax.Array, action: jax.Array) -> jax.Array:
        """log p(action int32 [...]) under logits f32 [..., A] -> f32 [...]."""
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, action[..., None], axis=-1)[..., 0]

    def action_log_probs(self, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Full causal forward: obs f32 [B, T, 637], action int32 [B, T] ->
        (log p(a_t | o_1:t) f32 [B, T], policy entropy f32 [B, T])."""
        logits = self(obs, return_residuals=False).action_logits.astype(jnp.float32)
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        return (
            self.action_log_prob(logits, action),
            -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1),
        )

    def lower_step(
        self, obs_t: jax.Array, caches: list[KVCache], layer: int
    ) -> tuple[jax.Array, list[KVCache]]:
        """Embed o_t f32 [B, 637] and run blocks 0..layer-1 -> (stream e_{t,layer} f32
        [B, D], caches): the half of the model below an intervention."""
        res = self.stack(
            self.embed(obs_t.astype(jnp.float32))[:, None],
            caches=caches,
            start_layer=0,
            stop_layer=layer,
            return_residuals=True,
        )
        return res.residuals[-1][:, 0], res.caches  # residuals: before any final norm

    def upper_step(
        self, e_hat: jax.Array, caches: list[KVCache], layer: int
    ) -> tuple[jax.Array, list[KVCache]]:
        """Blocks layer..L-1, final norm and action head on the (edited) stream ê f32
        [B, D] -> (logits f32 [B, A], caches)."""
        res = self.stack(e_hat[:, None], caches=caches, start_layer=layer)
        return self.action_head(res.out)[:, 0], res.caches


def sequence_losses(out: ModelOutput, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step losses and accuracies of a forward pass, all f32 [B, T].

    batch: action int32 [B, T], next_cells int32 [B, T, E] (entity cells of o_{t+1}).
    """
    logp_a = jax.nn.log_softmax(out.action_logits.astype(jnp.float32), axis=-1)
    action_nll = -jnp.take_along_axis(logp_a, batch["action"][..., None], axis=-1)[..., 0]
    logp_o = jax.nn.log_softmax(out.obs_logits.astype(jnp.float32), axis=-1)
    ent_nll = -jnp.take_along_axis(logp_o, batch["next_cells"][..., None], axis=-1)[..., 0]
    agent_hit = jnp.argmax(out.obs_logits[..., -1, :], axis=-1) == batch["next_cells"][..., -1]
    return dict(
        action_nll=action_nll,
        obs_nll=jnp.sum(ent_nll, axis=-1),
        action_acc=(jnp.argmax(out.action_logits, axis=-1) == batch["action"]).astype(jnp.float32),
        agent_obs_acc=agent_hit.astype(jnp.float32),
    )


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of f32 [...] over True entries of bool mask [...] (0 if none)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def pretrain_loss(
    model: BaseModel, batch: dict[str, jax.Array], key: jax.Array, obs_coef: float = 0.01
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 5: action NLL + obs_coef * observation NLL, averaged over valid steps
    (per-token mean rather than the paper's per-sequence sum: only rescales the LR).

    batch: obs f32 [B, T, 637], action int32 [B, T], next_cells int32 [B, T, 13],
    mask bool [B, T]. Returns (scalar loss, dict of scalar metrics).
    """
    del key
    per_step = sequence_losses(model(batch["obs"], return_residuals=False), batch)
    metrics = {k: masked_mean(v, batch["mask"]) for k, v in per_step.items()}
    loss = metrics["action_nll"] + obs_coef * metrics["obs_nll"]
    return loss, metrics
