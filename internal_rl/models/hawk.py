"""Hawk recurrent base model for the continuous pinpads (internal RL App. D.1, Table A15;
Griffin paper).

One token per time step: the observation is linearly embedded to n_e, run through L
pre-norm residual blocks `x += Mixer(Norm(x)); x += MLP(Norm(x))` whose mixer is the Hawk
temporal block

    Mixer(x) = W_out[ GeLU(W_gate x) ⊙ RG-LRU(Conv1D_4(W_in x)) ]

and read out after a final norm by two heads at the same position t: a Gaussian action
head p(a_t | o_1:t) with a learned, state-independent diagonal covariance, and a unit
variance Gaussian observation head p(o_t+1 | o_1:t) (docs/internal_rl.md D6). The RG-LRU is

    r_t = σ(W_a x_t + b_a),  i_t = σ(W_x x_t + b_x)           (block-diagonal, 8 heads)
    log a_t = c r_t log σ(Λ)  (c = 8)
    h_t = a_t ⊙ h_t−1 + sqrt(1 − a_t²) ⊙ (i_t ⊙ x_t)

with Λ initialised so that σ(Λ)^c ~ U[0.9, 0.999] (docs/internal_rl.md D6).

Two code paths compute the same function: `__call__` runs the whole sequence with a
parallel `jax.lax.associative_scan` (training), `decode_step` runs one token with an
explicit carried state per layer (`HawkCache`: the last conv_width − 1 conv inputs and the LRU
state), for rollouts. Residual-stream indexing and interventions follow
`internal_rl.models.transformer` (docs/internal_rl.md D21): e_{t,0} is the embedding, e_{t,l}
the output of block l, and `intervention(e) -> ê` replaces stream `intervention_layer` before
the later blocks run. `start_layer` / `stop_layer` run only part of the stack (Alg. 1's lower
and upper halves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import MLP, RMSNorm, dense

LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class HawkConfig:
    """Hawk base-model hyperparameters (paper Table A15: dim 256, depth 8, LRU width 256,
    8 gate heads, MLP 512 ReLU, init scale 0.1)."""

    dim: int = 128
    depth: int = 4
    lru_width: int | None = None  # None = dim
    num_heads: int = 8  # blocks of the block-diagonal RG-LRU gates
    conv_width: int = 4  # docs/internal_rl.md D6 (Griffin default)
    c: float = 8.0  # RG-LRU decay sharpness (Griffin)
    mlp_hidden: int = 256
    init_scale: float = 0.1  # variance-scaling factor of every dense initialiser
    obs_dim: int = 41
    action_dim: int = 8
    log_std_init: float = 0.0
    log_std_min: float = -5.0  # keep the learned action std away from 0 and from blowing up
    log_std_max: float = 2.0

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"model.depth: expected >= 1, got {self.depth}")
        if self.width % self.num_heads:
            raise ValueError(
                f"model.lru_width={self.width} not divisible by model.num_heads={self.num_heads}"
            )
        if self.conv_width < 1:
            raise ValueError(f"model.conv_width: expected >= 1, got {self.conv_width}")
        if min(self.obs_dim, self.action_dim) < 1:
            raise ValueError(
                f"model.obs_dim / action_dim: expected >= 1, got {self.obs_dim} / {self.action_dim}"
            )

    @property
    def width(self) -> int:
        """The RG-LRU width."""
        return self.dim if self.lru_width is None else self.lru_width


class HawkCache(NamedTuple):
    """Carried state of one Hawk block: conv f32 [B, conv_width − 1, W] (the previous conv
    inputs, oldest first) and h f32 [B, W] (the LRU state)."""

    conv: jax.Array
    h: jax.Array


class HawkOutput(NamedTuple):
    """action_mean f32 [B, T, A]; action_log_std f32 [A] (state-independent);
    obs_mean f32 [B, T, obs_dim] (prediction of o_{t+1}); residuals f32 [n+1, B, T, D] for
    the n blocks run (None if not requested); caches: the L updated HawkCaches."""

    action_mean: jax.Array
    action_log_std: jax.Array
    obs_mean: jax.Array
    residuals: jax.Array | None
    caches: list[HawkCache]


Intervention = Callable[[jax.Array], jax.Array]


def _time_major(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 0, 1)


def linear_recurrence(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
    """h_t = a_t ⊙ h_{t−1} + b_t over axis 1 by a parallel associative scan.

    a, b f32 [B, T, W]; h0 f32 [B, W] -> h f32 [B, T, W] (all states h_1..h_T).
    """
    b = b.at[:, 0].add(a[:, 0] * h0)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return h


class BlockDiagonalLinear(nnx.Module):
    """y = x W + b with W block-diagonal over `num_heads` blocks: [..., W] -> [..., W]."""

    def __init__(self, width: int, num_heads: int, *, kernel_init, rngs: nnx.Rngs):
        self.num_heads = num_heads
        block = width // num_heads
        self.kernel = nnx.Param(kernel_init(rngs.params(), (num_heads, block, block)))
        self.bias = nnx.Param(jnp.zeros((num_heads, block)))

    def __call__(self, x: jax.Array) -> jax.Array:
        xh = x.reshape(*x.shape[:-1], self.num_heads, -1)
        y = jnp.einsum("...hi,hij->...hj", xh, self.kernel[...]) + self.bias[...]
        return y.reshape(x.shape)


class RGLRU(nnx.Module):
    """Real-Gated Linear Recurrent Unit with block-diagonal gates (Griffin)."""

    def __init__(self, width: int, num_heads: int, c: float, *, kernel_init, rngs: nnx.Rngs):
        self.width, self.c = width, c
        self.r_gate = BlockDiagonalLinear(width, num_heads, kernel_init=kernel_init, rngs=rngs)
        self.i_gate = BlockDiagonalLinear(width, num_heads, kernel_init=kernel_init, rngs=rngs)
        # docs/internal_rl.md D6: Λ such that a^c ~ U[0.9, 0.999] (slow, long-memory decays at
        # init)
        u = jax.random.uniform(rngs.params(), (width,), minval=0.9, maxval=0.999)
        a = u ** (1.0 / c)
        self.a_logit = nnx.Param(jnp.log(a) - jnp.log1p(-a))

    def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x f32 [..., W] -> (a_t, b_t) f32 [..., W] of h_t = a_t h_{t−1} + b_t."""
        r = jax.nn.sigmoid(self.r_gate(x))
        i = jax.nn.sigmoid(self.i_gate(x))
        log_a = -self.c * r * jax.nn.softplus(-self.a_logit[...])  # c r log σ(Λ)
        # sqrt(1 − a²) from log a without cancellation; the floor keeps its gradient finite
        scale = jnp.sqrt(jnp.maximum(-jnp.expm1(2.0 * log_a), 1e-12))
        return jnp.exp(log_a), scale * i * x

    def __call__(self, x: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Sequence: x f32 [B, T, W], h0 [B, W] -> (h f32 [B, T, W], last state [B, W])."""
        a, b = self.coefficients(x)
        h = linear_recurrence(a, b, h0)
        return h, h[:, -1]

    def step(self, x_t: jax.Array, h: jax.Array) -> jax.Array:
        """One step: x_t f32 [B, W], h [B, W] -> new state [B, W]."""
        a, b = self.coefficients(x_t)
        return a * h + b


class CausalConv1D(nnx.Module):
    """Depthwise causal temporal convolution with bias: tap k looks k steps back."""

    def __init__(self, width: int, conv_width: int, *, rngs: nnx.Rngs):
        self.conv_width = conv_width
        init = nnx.initializers.normal(1.0 / math.sqrt(conv_width))
        self.kernel = nnx.Param(init(rngs.params(), (conv_width, width)))  # [K, W], tap 0 = now
        self.bias = nnx.Param(jnp.zeros((width,)))

    def __call__(self, x: jax.Array, buffer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Sequence: x f32 [B, T, W], buffer [B, K−1, W] (inputs before x, oldest first) ->
        (y f32 [B, T, W], new buffer [B, K−1, W])."""
        k = self.conv_width
        t = x.shape[1]
        xp = jnp.concatenate([buffer, x], axis=1)  # [B, K−1+T, W]
        w = self.kernel[...]
        y = sum(xp[:, k - 1 - j : k - 1 - j + t] * w[j] for j in range(k)) + self.bias[...]
        return y, xp[:, t:]

    def step(self, x_t: jax.Array, buffer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step: x_t f32 [B, W], buffer [B, K−1, W] -> (y [B, W], new buffer)."""
        window = jnp.concatenate([buffer, x_t[:, None]], axis=1)  # [B, K, W], newest last
        y = jnp.einsum("bkw,kw->bw", window, self.kernel[...][::-1]) + self.bias[...]
        return y, window[:, 1:]


class HawkMixer(nnx.Module):
    """Hawk temporal block `W_out[GeLU(W_gate x) ⊙ RG-LRU(Conv1D(W_in x))]`: [.., D] -> [.., D]."""

    def __init__(self, cfg: HawkConfig, *, kernel_init, rngs: nnx.Rngs):
        w = cfg.width
        self.gate_proj = dense(cfg.dim, w, kernel_init=kernel_init, rngs=rngs)
        self.in_proj = dense(cfg.dim, w, kernel_init=kernel_init, rngs=rngs)
        self.conv = CausalConv1D(w, cfg.conv_width, rngs=rngs)
        self.lru = RGLRU(w, cfg.num_heads, cfg.c, kernel_init=kernel_init, rngs=rngs)
        self.out_proj = dense(w, cfg.dim, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x: jax.Array, cache: HawkCache) -> tuple[jax.Array, HawkCache]:
        """Sequence path: x f32 [B, T, D] -> (y [B, T, D], cache after the last step)."""
        gate = jax.nn.gelu(self.gate_proj(x), approximate=False)
        u, conv = self.conv(self.in_proj(x), cache.conv)
        h, h_last = self.lru(u, cache.h)
        return self.out_proj(gate * h), HawkCache(conv, h_last)

    def step(self, x_t: jax.Array, cache: HawkCache) -> tuple[jax.Array, HawkCache]:
        """Step path: x_t f32 [B, D] -> (y [B, D], new cache)."""
        gate = jax.nn.gelu(self.gate_proj(x_t), approximate=False)
        u, conv = self.conv.step(self.in_proj(x_t), cache.conv)
        h = self.lru.step(u, cache.h)
        return self.out_proj(gate * h), HawkCache(conv, h)


class HawkBlock(nnx.Module):
    """Pre-norm residual block: `x += mixer(norm1(x)); x += mlp(norm2(x))` (RMSNorm, ReLU MLP)."""

    def __init__(self, cfg: HawkConfig, *, kernel_init, rngs: nnx.Rngs):
        # docs/internal_rl.md D6: RMSNorm
        self.norm1 = RMSNorm(cfg.dim, rngs=rngs)
        self.mixer = HawkMixer(cfg, kernel_init=kernel_init, rngs=rngs)
        self.norm2 = RMSNorm(cfg.dim, rngs=rngs)
        self.mlp = MLP(cfg.dim, cfg.mlp_hidden, "relu", kernel_init=kernel_init, rngs=rngs)

    def __call__(
        self, x: jax.Array, cache: HawkCache, *, step: bool = False
    ) -> tuple[jax.Array, HawkCache]:
        """x f32 [B, T, D] -> (x [B, T, D], cache). step=True requires T = 1 and uses the
        recurrent path."""
        h = self.norm1(x)
        if step:
            y, cache = self.mixer.step(h[:, 0], cache)
            y = y[:, None]
        else:
            y, cache = self.mixer(h, cache)
        x = x + y
        return x + self.mlp(self.norm2(x)), cache


def gaussian_action(key: jax.Array, head: tuple[jax.Array, jax.Array], greedy=False) -> jax.Array:
    """f32 [N, A]: a sample of N(mean, diag exp(log_std)²), or the mean when greedy (may be
    traced). head = (mean f32 [N, A], log_std f32 [A] or [N, A]). Not clipped: the env
    clips to its control range."""
    mean, log_std = head
    return jnp.where(greedy, mean, mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape))


class HawkModel(nnx.Module):
    """Causal Hawk stack over continuous observations with Gaussian action and observation
    heads (the ant / point-mass analogue of `internal_rl.models.transformer.BaseModel`)."""

    def __init__(self, cfg: HawkConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
        self.embed = dense(cfg.obs_dim, cfg.dim, kernel_init=init, rngs=rngs)
        self.blocks = nnx.List(
            [HawkBlock(cfg, kernel_init=init, rngs=rngs) for _ in range(cfg.depth)]
        )
        self.final_norm = RMSNorm(cfg.dim, rngs=rngs)
        self.action_head = dense(cfg.dim, cfg.action_dim, kernel_init=init, rngs=rngs)
        self.action_log_std = nnx.Param(jnp.full((cfg.action_dim,), cfg.log_std_init, jnp.float32))
        self.obs_head = dense(cfg.dim, cfg.obs_dim, kernel_init=init, rngs=rngs)

    # ---------------------------------------------------------------- state
    def init_caches(self, batch: int, max_len: int | None = None) -> list[HawkCache]:
        """Zero state (one HawkCache per layer). `max_len` is accepted for API parity with
        the transformer's KV caches and ignored: the Hawk state has a fixed size."""
        del max_len
        w, k = self.cfg.width, self.cfg.conv_width
        return [
            HawkCache(jnp.zeros((batch, k - 1, w)), jnp.zeros((batch, w)))
            for _ in range(self.cfg.depth)
        ]

    def log_std(self) -> jax.Array:
        """f32 [A]: the action head's log standard deviation, clipped to its range."""
        return jnp.clip(self.action_log_std[...], self.cfg.log_std_min, self.cfg.log_std_max)

    # ---------------------------------------------------------------- forward
    def _check(self, x: jax.Array, ndim: int, last: int, what: str) -> None:
        if x.ndim != ndim or x.shape[-1] != last:
            raise ValueError(
                f"HawkModel: expected {what} with last dim {last}, got shape {tuple(x.shape)}"
            )

    def run_blocks(
        self,
        x: jax.Array,
        caches: list[HawkCache],
        *,
        step: bool = False,
        start_layer: int = 0,
        stop_layer: int | None = None,
        intervention: Intervention | None = None,
        intervention_layer: int | None = None,
        return_residuals: bool = True,
    ) -> tuple[jax.Array, jax.Array | None, list[HawkCache]]:
        """Blocks start_layer..stop_layer−1 on stream x f32 [B, T, D] (stream start_layer).

        Returns (x after the last block run (not final-normed), residuals [n+1, B, T, D] or
        None, the L caches with the run layers updated). Interventions as `__call__`.
        """
        depth = self.cfg.depth
        stop = depth if stop_layer is None else stop_layer
        if not 0 <= start_layer <= stop <= depth:
            raise ValueError(
                f"HawkModel: need 0 <= start_layer <= stop_layer <= {depth}, "
                f"got ({start_layer}, {stop})"
            )
        if (intervention is None) != (intervention_layer is None):
            raise ValueError("HawkModel: give both intervention and intervention_layer")
        if intervention_layer is not None and not start_layer <= intervention_layer <= stop:
            raise ValueError(
                f"HawkModel: intervention_layer {intervention_layer} outside the "
                f"layers run [{start_layer}, {stop}]"
            )
        if len(caches) != depth:
            raise ValueError(f"HawkModel: need {depth} caches, got {len(caches)}")
        self._check(x, 3, self.cfg.dim, "x [B, T, D]")
        if step and x.shape[1] != 1:
            raise ValueError(f"HawkModel: the step path takes one token, got T={x.shape[1]}")
        caches = list(caches)
        if intervention_layer == start_layer:
            x = intervention(x)
        residuals = [x]
        for i in range(start_layer, stop):
            x, caches[i] = self.blocks[i](x, caches[i], step=step)
            if intervention_layer == i + 1:
                x = intervention(x)
            residuals.append(x)
        return x, (jnp.stack(residuals) if return_residuals else None), caches

    def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Final stream f32 [B, T, D] -> (action_mean [B, T, A], log_std [A], obs_mean)."""
        out = self.final_norm(x)
        return self.action_head(out), self.log_std(), self.obs_head(out)

    def __call__(
        self,
        obs: jax.Array,
        *,
        caches: list[HawkCache] | None = None,
        intervention: Intervention | None = None,
        intervention_layer: int | None = None,
        return_residuals: bool = True,
    ) -> HawkOutput:
        """Full causal forward with the parallel scan. obs f32 [B, T, obs_dim] -> HawkOutput.

        caches: state to continue from (default zeros); the output carries the state after
        the last step. intervention(e [B, T, D]) -> ê replaces stream intervention_layer
        (0..L) before the later blocks run; residuals then hold the edited stream there.
        """
        self._check(obs, 3, self.cfg.obs_dim, "obs [B, T, obs_dim]")
        if caches is None:
            caches = self.init_caches(obs.shape[0])
        x = self.embed(obs.astype(jnp.float32))
        x, residuals, caches = self.run_blocks(
            x,
            caches,
            intervention=intervention,
            intervention_layer=intervention_layer,
            return_residuals=return_residuals,
        )
        return HawkOutput(*self.heads(x), residuals, caches)

    def decode_step(
        self,
        obs_t: jax.Array,
        caches: list[HawkCache],
        *,
        intervention: Intervention | None = None,
        intervention_layer: int | None = None,
        return_residuals: bool = True,
    ) -> tuple[HawkOutput, list[HawkCache]]:
        """One token with the recurrent path. obs_t f32 [B, obs_dim] -> (HawkOutput with
        T = 1, updated caches). Equals `__call__` on the whole prefix at the same position
        (tested). The intervention sees the stream as [B, 1, D]."""
        self._check(obs_t, 2, self.cfg.obs_dim, "obs_t [B, obs_dim]")
        x = self.embed(obs_t.astype(jnp.float32))[:, None]
        x, residuals, caches = self.run_blocks(
            x,
            caches,
            step=True,
            intervention=intervention,
            intervention_layer=intervention_layer,
            return_residuals=return_residuals,
        )
        return HawkOutput(*self.heads(x), residuals, caches), caches

    # -- the policy interface shared with the transformer `BaseModel` (controllers,
    # -- metacontroller, RL); a policy head is (mean f32 [B, A], log_std f32 [A])
    def sequence_losses(self, out: HawkOutput, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-step losses of a forward pass (`sequence_losses`)."""
        return sequence_losses(out, batch)

    @staticmethod
    def policy_head(out: HawkOutput) -> tuple[jax.Array, jax.Array]:
        """The action distribution of a one-token output: (mean f32 [B, A], log_std [A])."""
        return out.action_mean[:, 0], out.action_log_std

    sample_action = staticmethod(gaussian_action)

    @staticmethod
    def action_log_prob(head: tuple[jax.Array, jax.Array], action: jax.Array) -> jax.Array:
        """log N(action f32 [..., A]; mean, diag exp(log_std)²) -> f32 [...]."""
        mean, log_std = head
        return -gaussian_nll(action, mean, log_std)

    def action_log_probs(self, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Full causal forward: obs f32 [B, T, obs_dim], action f32 [B, T, A] ->
        (log p(a_t | o_1:t) f32 [B, T], policy entropy f32 [] (state-independent))."""
        out = self(obs, return_residuals=False)
        log_std = out.action_log_std
        entropy = jnp.sum(jnp.broadcast_to(log_std, (self.cfg.action_dim,)) + 0.5 * (LOG_2PI + 1.0))
        return self.action_log_prob((out.action_mean, log_std), action), entropy

    def lower_step(
        self, obs_t: jax.Array, caches: list[HawkCache], layer: int
    ) -> tuple[jax.Array, list[HawkCache]]:
        """Embed o_t f32 [B, obs_dim] and run blocks 0..layer-1 with the step path ->
        (stream e_{t,layer} f32 [B, D], caches): the half below an intervention."""
        self._check(obs_t, 2, self.cfg.obs_dim, "obs_t [B, obs_dim]")
        x = self.embed(obs_t.astype(jnp.float32))[:, None]
        x, _, caches = self.run_blocks(
            x, caches, step=True, stop_layer=layer, return_residuals=False
        )
        return x[:, 0], caches

    def upper_step(
        self, e_hat: jax.Array, caches: list[HawkCache], layer: int
    ) -> tuple[tuple[jax.Array, jax.Array], list[HawkCache]]:
        """Blocks layer..L-1, final norm and action head on the (edited) stream ê f32
        [B, D] -> ((mean f32 [B, A], log_std f32 [A]), caches)."""
        x, _, caches = self.run_blocks(
            e_hat[:, None], caches, step=True, start_layer=layer, return_residuals=False
        )
        mean, log_std, _ = self.heads(x)
        return (mean[:, 0], log_std), caches


# ------------------------------------------------------------------------------- losses
def gaussian_nll(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """Negative log density of a diagonal Gaussian, summed over the last axis.

    x, mean f32 [..., K]; log_std broadcastable to them -> f32 [...].
    """
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(0.5 * jnp.square(z) + log_std + 0.5 * LOG_2PI, axis=-1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of f32 [...] over True entries of bool mask [...] (0 if none)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def sequence_losses(out: HawkOutput, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step losses, all f32 [B, T].

    batch: action f32 [B, T, A], next_obs f32 [B, T, obs_dim] (o_{t+1}).
    action_nll is under the learned diagonal Gaussian; obs_nll under a unit-variance
    Gaussian (docs/internal_rl.md D6: ‖o − ô‖²/2 + const).
    """
    action_nll = gaussian_nll(batch["action"], out.action_mean, out.action_log_std)
    obs_nll = gaussian_nll(batch["next_obs"], out.obs_mean, jnp.zeros(()))
    return dict(
        action_nll=action_nll,
        obs_nll=obs_nll,
        action_mse=jnp.mean(jnp.square(batch["action"] - out.action_mean), axis=-1),
        obs_mse=jnp.mean(jnp.square(batch["next_obs"] - out.obs_mean), axis=-1),
    )


def pretrain_loss(
    model: HawkModel, batch: dict[str, jax.Array], key: jax.Array, obs_coef: float = 10.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 5 with λ = obs_coef (ant: 10, Table A5): action NLL + λ · observation NLL,
    averaged over valid steps (per-token mean; only rescales the LR vs the paper's sum).

    batch: obs f32 [B, T, obs_dim], action f32 [B, T, A], next_obs f32 [B, T, obs_dim],
    mask bool [B, T]. Returns (scalar loss, dict of scalar metrics).
    """
    del key
    per_step = sequence_losses(model(batch["obs"], return_residuals=False), batch)
    metrics = {k: masked_mean(v, batch["mask"]) for k, v in per_step.items()}
    loss = metrics["action_nll"] + obs_coef * metrics["obs_nll"]
    return loss, metrics
