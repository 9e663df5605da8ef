"""Supervised linear residual controllers (paper Eq. 1, C.3, Table A7).

At layer l the residual stream is edited as `e <- e + U e` with `U = f_hyp(z)`, a
hypernetwork output of rank r: `U = B(z) A(z)`, A [r, D], B [D, r]. For the supervised
controllers z = onehot(g_t) over the K = 4 ground-truth subgoals (the metacontroller with
β ≡ 1). The B head is zero-initialised (weights and bias) and the A head small-normal
(docs/internal_rl.md D14), so U = 0 at init with non-zero gradients. Training minimises the action
NLL (λ = 0) on expert data with the base model frozen; evaluation switches controllers
with the ground-truth labels on the held-out task (`rollouts.closed_loop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import KVCache, dense
from internal_rl.models.hawk import HawkModel, HawkOutput
from internal_rl.models.transformer import BaseModel, ModelOutput, masked_mean


class LowRankHyperController(nnx.Module):
    """f_hyp: code z f32 [..., K] -> MLP(hidden, ReLU) -> factors A [..., r, D], B [..., D, r]."""

    def __init__(
        self, code_dim: int, dim: int, rank: int = 16, hidden: int = 32, *, rngs: nnx.Rngs
    ):
        self.code_dim, self.dim, self.rank = code_dim, dim, rank
        self.hidden = dense(code_dim, hidden, rngs=rngs)
        self.a_head = dense(
            hidden, rank * dim, kernel_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        self.b_head = dense(
            hidden, dim * rank, kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )

    def factors(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jax.nn.relu(self.hidden(z))
        lead = z.shape[:-1]
        a = self.a_head(h).reshape(*lead, self.rank, self.dim)
        b = self.b_head(h).reshape(*lead, self.dim, self.rank)
        return a, b

    def matrix(self, z: jax.Array) -> jax.Array:
        """Dense U f32 [..., D, D] (for analysis and tests)."""
        a, b = self.factors(z)
        return b @ a

    def apply_codes(self, e: jax.Array, weights: jax.Array) -> jax.Array:
        """Per-step mixture over the K basis codes: e f32 [..., D], weights f32 [..., K] ->
        e + sum_k w_k U(onehot_k) e. Equals `e + U(onehot(g)) e` for one-hot weights, without
        materialising a [..., D, D] or per-step factor tensor."""
        a, b = self.factors(jnp.eye(self.code_dim, dtype=e.dtype))  # [K, r, D], [K, D, r]
        h = jnp.einsum("krd,...d->...kr", a, e) * weights[..., None]
        return e + jnp.einsum("kdr,...kr->...d", b, h)


class ControlledModel(nnx.Module):
    """A base model with a label-conditioned controller at residual layer `layer`."""

    def __init__(
        self,
        base: BaseModel | HawkModel,
        layer: int,
        num_codes: int,
        rank: int = 16,
        hidden: int = 32,
        *,
        rngs: nnx.Rngs,
    ):
        if not 0 <= layer <= base.cfg.depth:
            raise ValueError(f"layer: expected 0..{base.cfg.depth}, got {layer}")
        self.base = base
        self.layer = layer
        self.num_codes = num_codes
        self.controller = LowRankHyperController(num_codes, base.cfg.dim, rank, hidden, rngs=rngs)

    def _edit(self, labels: jax.Array):
        w = jax.nn.one_hot(labels, self.num_codes, dtype=jnp.float32)
        return lambda e: self.controller.apply_codes(e, w)

    def __call__(
        self, obs: jax.Array, labels: jax.Array, *, return_residuals: bool = False
    ) -> ModelOutput | HawkOutput:
        """obs f32 [B, T, obs_dim], labels int32 [B, T] -> the controlled model output."""
        return self.base(
            obs,
            intervention=self._edit(labels),
            intervention_layer=self.layer,
            return_residuals=return_residuals,
        )

    def decode_step(
        self, obs_t: jax.Array, caches: list[KVCache], labels: jax.Array
    ) -> tuple[ModelOutput | HawkOutput, list]:
        """obs_t f32 [B, obs_dim], labels int32 [B] -> (model output with T = 1, caches)."""
        return self.base.decode_step(
            obs_t,
            caches,
            intervention=self._edit(labels[:, None]),
            intervention_layer=self.layer,
            return_residuals=False,
        )


# Only the controller's parameters are trained; the base model stays frozen.
CONTROLLER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("controller"))


def controller_loss(
    model: ControlledModel, batch: dict[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Action NLL of the controlled model on valid steps (λ = 0, Table A7), with the
    action accuracy (discrete) or mean squared action error (continuous)."""
    del key
    per_step = model.base.sequence_losses(model(batch["obs"], batch["subgoal"]), batch)
    metrics = {
        k: masked_mean(v, batch["mask"])
        for k, v in per_step.items()
        if k in ("action_nll", "action_acc", "action_mse")
    }
    return metrics["action_nll"], metrics
