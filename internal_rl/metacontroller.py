"""The metacontroller (internal RL Eqs. 2-3, App. C.4, D.2, E.1).

It reads the base model's residual stream e_t at layer l = L/2 and writes it back as
`ê_t = e_t + U_t e_t`, with U_t = f_hyp(z_t) a rank-r hypernetwork output (the same
`LowRankHyperController` as the supervised controllers, fed a continuous code z_t):

    h_t          = GRU(e_t, h_{t-1}),  h_0 = 0                         (history)
    s            = f_emb(e_{1:T})                                      (non-causal, one per sequence)
    μ_t, log σ²_t = f_enc(e_t, h_{t-1}, s);  z̃_t = μ_t + σ_t ε_t       (proposal)
    β_t          = sigmoid(f_switch(e_t, h_{t-1}, z_{t-1}))            (causal switch)
    z_t          = β_t z̃_t + (1 - β_t) z_{t-1},  z_0 = 0               (temporal integration)

What sees the future: only the encoder, through the sequence embedding s. The switching unit
and the GRU are causal functions of (e_{1:t}, z_{1:t-1}), so the RL stage (App. C.5) can run
them step by step with codes chosen by a policy (`Metacontroller.switch_step`). During
training z_{t-1} comes from the encoder and so carries information about the future; that is
the posterior q of App. E.1.

Loss (Eq. 3, λ = 0 as in Tables A9/A10): action NLL of the controlled, frozen base model +
α·KL(N(μ_t, Σ_t) ‖ N(0, I)) charged at every valid step (unweighted by β: the continuous
relaxation of E.1 makes the per-step KL independent of β_t). Both terms are per-valid-step
means, which keeps the ratio α of Eq. 3 and only rescales the learning rate.

Variants: `temporal_abstraction=False` forces β ≡ 1 (z_t = z̃_t, the Fig. 8 "forced resets"
baseline); `cotrain=True` selects a trainable filter that includes the base model (App. C.6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import RMSNorm, dense
from internal_rl.controllers import LowRankHyperController
from internal_rl.models.hawk import HawkModel, HawkOutput
from internal_rl.models.transformer import BaseModel, ModelOutput, masked_mean


@dataclasses.dataclass(frozen=True)
class MetacontrollerConfig:
    """Metacontroller hyperparameters; defaults are the paper's (Tables A9/A10)."""

    n_z: int = 8
    gru_hidden: int = 32  # n_h
    embed_dim: int = 32  # n_s
    embed_width: int | None = None  # RG-LRU width of f_emb; None = the base width D (paper: 256)
    embed_conv_width: int = 4  # Griffin defaults (docs/internal_rl.md D6)
    embed_c: float = 8.0
    encoder_hidden: int = 64
    switch_hidden: int = 64  # not given by the paper (docs/internal_rl.md D12)
    switch_bias_init: float = 2.0  # β ≈ 0.88 at init, against early collapse to "never switch"
    decoder_hidden: int = 32
    rank: int = 16
    layer: int | None = None  # insertion layer; None = depth // 2
    kl_weight: float = 0.1  # α (paper sweeps {0, 0.05, 0.1, 0.17, 0.3, 0.5, 1})
    temporal_abstraction: bool = True  # False: β ≡ 1
    cotrain: bool = False  # the trainer trains the base model too (`trainable_filter`)
    switch_threshold: float = 0.5  # β > threshold counts as a switch (metrics, RL)

    def __post_init__(self):
        positive = (
            "n_z",
            "gru_hidden",
            "embed_dim",
            "embed_conv_width",
            "encoder_hidden",
            "switch_hidden",
            "decoder_hidden",
            "rank",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"MetacontrollerConfig.{name}: expected >= 1, got {getattr(self, name)}"
                )
        if self.embed_width is not None and self.embed_width < 1:
            raise ValueError(
                f"MetacontrollerConfig.embed_width: expected None or >= 1, got {self.embed_width}"
            )
        if self.kl_weight < 0:
            raise ValueError(f"MetacontrollerConfig.kl_weight: expected >= 0, got {self.kl_weight}")
        if not 0.0 < self.switch_threshold < 1.0:
            raise ValueError(
                f"MetacontrollerConfig.switch_threshold: expected in (0, 1), got {self.switch_threshold}"
            )
        if self.embed_c <= 0:
            raise ValueError(f"MetacontrollerConfig.embed_c: expected > 0, got {self.embed_c}")

    def insertion_layer(self, depth: int) -> int:
        """The controlled residual layer for a base model of `depth` blocks (default L/2)."""
        layer = depth // 2 if self.layer is None else self.layer
        if not 0 <= layer <= depth:
            raise ValueError(f"MetacontrollerConfig.layer: expected 0..{depth}, got {layer}")
        return layer


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------


def gaussian_kl(mu: jax.Array, log_var: jax.Array) -> jax.Array:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_i (σ_i² + μ_i² − 1 − log σ_i²).

    mu, log_var f32 [..., n_z] -> f32 [...] (summed over the last axis).
    """
    return 0.5 * jnp.sum(jnp.exp(log_var) + jnp.square(mu) - 1.0 - log_var, axis=-1)


def _integrate_step(beta_t: jax.Array, z_tilde_t: jax.Array, z_prev: jax.Array) -> jax.Array:
    """z_t = β_t z̃_t + (1 − β_t) z_{t−1}; beta_t [B], z's [B, n_z] -> [B, n_z]."""
    b = beta_t[..., None]
    return b * z_tilde_t + (1.0 - b) * z_prev


def _time_major(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 0, 1)


def integrate(beta: jax.Array, z_tilde: jax.Array, z0: jax.Array | None = None) -> jax.Array:
    """Temporal integration with given switches, as a `lax.scan` over time.

    beta f32 [B, T] (one scalar gate per step, broadcast over z), z_tilde f32 [B, T, n_z],
    z0 f32 [B, n_z] (default 0) -> z f32 [B, T, n_z].
    """
    if beta.shape != z_tilde.shape[:-1]:
        raise ValueError(
            f"integrate: beta {tuple(beta.shape)} must be z_tilde's "
            f"{tuple(z_tilde.shape)} without the last axis"
        )
    if z0 is None:
        z0 = jnp.zeros(z_tilde.shape[:1] + z_tilde.shape[2:], z_tilde.dtype)

    def body(z_prev, xs):
        z = _integrate_step(*xs, z_prev)
        return z, z

    _, z = jax.lax.scan(body, z0, (_time_major(beta), _time_major(z_tilde)))
    return _time_major(z)


def switch_and_integrate(
    switch_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    e: jax.Array,
    h_prev: jax.Array,
    z_tilde: jax.Array,
    z0: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The causal switch + integration scan (β_t depends on z_{t−1}, so it is sequential).

    switch_fn(e_t [B, D], h_{t−1} [B, H], z_{t−1} [B, n_z]) -> β_t [B] in (0, 1).
    e f32 [B, T, D], h_prev f32 [B, T, H] (h_{t−1} at t), z_tilde f32 [B, T, n_z]
    -> (beta f32 [B, T], z f32 [B, T, n_z]).
    """
    if z0 is None:
        z0 = jnp.zeros(z_tilde.shape[:1] + z_tilde.shape[2:], z_tilde.dtype)

    def body(z_prev, xs):
        e_t, h_t, zt_t = xs
        beta_t = switch_fn(e_t, h_t, z_prev)
        z = _integrate_step(beta_t, zt_t, z_prev)
        return z, (beta_t, z)

    _, (beta, z) = jax.lax.scan(
        body, z0, (_time_major(e), _time_major(h_prev), _time_major(z_tilde))
    )
    return _time_major(beta), _time_major(z)


def apply_low_rank(decoder: LowRankHyperController, z: jax.Array, e: jax.Array) -> jax.Array:
    """ê = e + U(z) e with per-step codes, U = B(z) A(z) of rank r.

    z f32 [..., n_z], e f32 [..., D] -> f32 [..., D]. Equals `e + decoder.matrix(z) @ e`
    but contracts the hypernetwork heads with e directly, so neither [..., D, D] nor the
    per-step factors [..., r, D] are materialised (the heads are linear in the hidden layer).
    """
    hid = jax.nn.relu(decoder.hidden(z))  # [..., Hd]
    n_h, r, d = hid.shape[-1], decoder.rank, decoder.dim
    a_k = decoder.a_head.kernel[...].reshape(n_h, r, d)
    b_k = decoder.b_head.kernel[...].reshape(n_h, d, r)
    a_b = decoder.a_head.bias[...].reshape(r, d)
    b_b = decoder.b_head.bias[...].reshape(d, r)
    ae = jnp.einsum("...h,...hr->...r", hid, jnp.einsum("hrd,...d->...hr", a_k, e))
    ae = ae + jnp.einsum("rd,...d->...r", a_b, e)  # A(z) e, [..., r]
    bae = jnp.einsum("...hr,hdr->...d", hid[..., :, None] * ae[..., None, :], b_k)
    return e + bae + jnp.einsum("dr,...r->...d", b_b, ae)


def switch_mask(beta: jax.Array, mask: jax.Array, threshold: float = 0.5) -> jax.Array:
    """bool [B, T]: a switch (β_t > threshold) at a valid step."""
    return (beta > threshold) & mask


def switches_per_trajectory(beta: jax.Array, mask: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Number of switches Σ_t 1[β_t > threshold] over valid steps. beta f32 [B, T],
    mask bool [B, T] -> f32 [B]."""
    return jnp.sum(switch_mask(beta, mask, threshold), axis=-1).astype(jnp.float32)


def subgoal_boundaries(
    subgoal: jax.Array, mask: jax.Array, include_start: bool = True
) -> jax.Array:
    """Ground-truth segment starts: bool [B, T], True at valid t with g_t != g_{t−1}.

    With include_start the first step is a boundary too: the metacontroller must pick its
    first code there (z_0 = 0), so a switch at t = 0 is a correct one.
    subgoal int32 [B, T], mask bool [B, T].
    """
    change = subgoal[:, 1:] != subgoal[:, :-1]
    first = jnp.full(subgoal.shape[:1] + (1,), include_start)
    return jnp.concatenate([first, change], axis=1) & mask


def _dilate(x: jax.Array, tolerance: int) -> jax.Array:
    """bool [B, T] -> True where x is True within ±tolerance steps (no wrap-around)."""
    out = x
    t = x.shape[1]
    for k in range(1, min(tolerance, t - 1) + 1):
        pad = jnp.zeros_like(x[:, :k])
        out = out | jnp.concatenate([x[:, k:], pad], 1) | jnp.concatenate([pad, x[:, :-k]], 1)
    return out


def switch_precision_recall(
    beta: jax.Array,
    subgoal: jax.Array,
    mask: jax.Array,
    *,
    tolerance: int = 1,
    threshold: float = 0.5,
    include_start: bool = True,
) -> dict[str, jax.Array]:
    """Switch precision/recall against ground-truth subgoal boundaries, ±tolerance steps.

    A switch is correct if a boundary lies within ±tolerance steps of it; a boundary is
    found if a switch lies within ±tolerance of it (no one-to-one matching, so a switch
    firing on two adjacent steps of one boundary counts twice in precision). Counts are
    pooled over the batch; a ratio with nothing to count is 0.
    beta f32 [B, T], subgoal int32 [B, T], mask bool [B, T] -> dict of f32 scalars:
    precision, recall, num_switches, num_boundaries.
    """
    if tolerance < 0:
        raise ValueError(f"switch_precision_recall: tolerance must be >= 0, got {tolerance}")
    sw = switch_mask(beta, mask, threshold)
    gt = subgoal_boundaries(subgoal, mask, include_start)
    n_sw = jnp.sum(sw).astype(jnp.float32)
    n_gt = jnp.sum(gt).astype(jnp.float32)
    tp_sw = jnp.sum(sw & _dilate(gt, tolerance)).astype(jnp.float32)
    tp_gt = jnp.sum(gt & _dilate(sw, tolerance)).astype(jnp.float32)
    return dict(
        precision=tp_sw / jnp.maximum(n_sw, 1.0),
        recall=tp_gt / jnp.maximum(n_gt, 1.0),
        num_switches=n_sw,
        num_boundaries=n_gt,
    )


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class SequenceEmbedder(nnx.Module):
    """f_emb: one Hawk temporal block over the whole masked sequence (docs/internal_rl.md D11).

    `GeLU(W_1 x) ⊙ RG-LRU(Conv1D(W_2 x))`, read at the last valid step and projected to
    n_s: one vector per sequence, so it sees every valid step (non-causal by design).
    Padded steps neither update the recurrence nor enter the convolution.
    """

    def __init__(
        self,
        dim: int,
        width: int,
        out_dim: int,
        conv_width: int = 4,
        c: float = 8.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.width, self.conv_width, self.c = width, conv_width, c
        self.gate_in = dense(dim, width, rngs=rngs)
        self.x_in = dense(dim, width, rngs=rngs)
        self.conv = nnx.Param(
            nnx.initializers.normal(1.0 / math.sqrt(conv_width))(rngs.params(), (conv_width, width))
        )
        self.r_gate = dense(width, width, rngs=rngs)
        self.i_gate = dense(width, width, rngs=rngs)
        # Λ such that a^c ~ U[0.9, 0.999] (Griffin): slow, long-memory decays at init
        u = jax.random.uniform(rngs.params(), (width,), minval=0.9, maxval=0.999)
        a = u ** (1.0 / c)
        self.log_lambda = nnx.Param(jnp.log(a) - jnp.log1p(-a))  # logit(a)
        self.out = dense(width, out_dim, rngs=rngs)

    def __call__(self, e: jax.Array, mask: jax.Array) -> jax.Array:
        """e f32 [B, T, D], mask bool [B, T] -> s f32 [B, n_s]."""
        m = mask[..., None].astype(e.dtype)
        x = self.x_in(e) * m
        t = x.shape[1]
        xp = jnp.pad(x, ((0, 0), (self.conv_width - 1, 0), (0, 0)))
        w = self.conv[...]
        # causal depthwise conv: tap k looks k steps back
        x = sum(
            xp[:, self.conv_width - 1 - k : self.conv_width - 1 - k + t] * w[k]
            for k in range(self.conv_width)
        )
        r = jax.nn.sigmoid(self.r_gate(x))
        i = jax.nn.sigmoid(self.i_gate(x))
        log_a = -self.c * r * jax.nn.softplus(-self.log_lambda[...])  # log a^{c r}
        a = jnp.exp(log_a)
        scale = jnp.sqrt(jnp.maximum(-jnp.expm1(2.0 * log_a), 1e-12))

        def body(h, xs):
            a_t, u_t, m_t = xs
            h_new = a_t * h + u_t
            return jnp.where(m_t, h_new, h), None

        h0 = jnp.zeros((x.shape[0], self.width), x.dtype)
        h_last, _ = jax.lax.scan(
            body, h0, (_time_major(a), _time_major(scale * i * x), _time_major(mask[..., None]))
        )
        last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
        e_last = jnp.take_along_axis(e, last[:, None, None], axis=1)[:, 0]
        return self.out(jax.nn.gelu(self.gate_in(e_last)) * h_last)


class ControllerEncoder(nnx.Module):
    """f_enc: MLP([e_t, h_{t−1}, s]) -> (μ_t, log σ²_t). The output layer is zero-initialised,
    so the proposal starts at the prior N(0, I) (KL = 0 at init)."""

    def __init__(self, dim: int, n_h: int, n_s: int, hidden: int, n_z: int, *, rngs: nnx.Rngs):
        self.n_z = n_z
        self.hidden = dense(dim + n_h + n_s, hidden, rngs=rngs)
        self.out = dense(hidden, 2 * n_z, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(
        self, e: jax.Array, h_prev: jax.Array, s: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """e [B, T, D], h_prev [B, T, n_h], s [B, n_s] -> (μ, log σ²) f32 [B, T, n_z]."""
        s_t = jnp.broadcast_to(s[:, None], e.shape[:2] + s.shape[-1:])
        y = self.out(jax.nn.relu(self.hidden(jnp.concatenate([e, h_prev, s_t], -1))))
        return y[..., : self.n_z], y[..., self.n_z :]


class SwitchUnit(nnx.Module):
    """f_switch: MLP([e_t, h_{t−1}, z_{t−1}]) -> 64 ReLU -> 1 -> sigmoid
    (docs/internal_rl.md D12)."""

    def __init__(
        self, dim: int, n_h: int, n_z: int, hidden: int, bias_init: float, *, rngs: nnx.Rngs
    ):
        self.hidden = dense(dim + n_h + n_z, hidden, rngs=rngs)
        self.out = dense(hidden, 1, bias_init=nnx.initializers.constant(bias_init), rngs=rngs)

    def __call__(self, e_t: jax.Array, h_prev: jax.Array, z_prev: jax.Array) -> jax.Array:
        """e_t [..., D], h_prev [..., n_h], z_prev [..., n_z] -> β f32 [...] in (0, 1)."""
        x = jnp.concatenate([e_t, h_prev, z_prev], -1)
        return jax.nn.sigmoid(self.out(jax.nn.relu(self.hidden(x)))[..., 0])


class MetacontrollerOutput(NamedTuple):
    """Per-step quantities, all f32: z, z_tilde, mu, log_var [B, T, n_z]; beta [B, T];
    h_prev [B, T, n_h] (GRU state h_{t−1} seen at t); embedding [B, n_s]."""

    z: jax.Array
    z_tilde: jax.Array
    mu: jax.Array
    log_var: jax.Array
    beta: jax.Array
    h_prev: jax.Array
    embedding: jax.Array


class Metacontroller(nnx.Module):
    """All of φ: input norm, history GRU, sequence embedder, encoder, switch unit, decoder."""

    def __init__(self, cfg: MetacontrollerConfig, dim: int, *, rngs: nnx.Rngs):
        self.cfg, self.dim = cfg, dim
        # choice: the residual scale depends on the base model's training; normalise what
        # the metacontroller reads (the controller itself edits the raw stream)
        self.in_norm = RMSNorm(dim, rngs=rngs)
        self.gru = nnx.GRUCell(dim, cfg.gru_hidden, rngs=rngs)
        self.embedder = SequenceEmbedder(
            dim, cfg.embed_width or dim, cfg.embed_dim, cfg.embed_conv_width, cfg.embed_c, rngs=rngs
        )
        self.encoder = ControllerEncoder(
            dim, cfg.gru_hidden, cfg.embed_dim, cfg.encoder_hidden, cfg.n_z, rngs=rngs
        )
        self.switch = SwitchUnit(
            dim, cfg.gru_hidden, cfg.n_z, cfg.switch_hidden, cfg.switch_bias_init, rngs=rngs
        )
        # B head zero, A head small normal: U = 0 at init with non-zero gradients
        # (docs/internal_rl.md D14)
        self.decoder = LowRankHyperController(cfg.n_z, dim, cfg.rank, cfg.decoder_hidden, rngs=rngs)

    def initial_state(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """(h_0 f32 [B, n_h], z_0 f32 [B, n_z]), both zero (docs/internal_rl.md D13)."""
        return (
            jnp.zeros((batch, self.cfg.gru_hidden), jnp.float32),
            jnp.zeros((batch, self.cfg.n_z), jnp.float32),
        )

    def _beta(self, x_t: jax.Array, h_prev: jax.Array, z_prev: jax.Array) -> jax.Array:
        if not self.cfg.temporal_abstraction:
            return jnp.ones(x_t.shape[:-1], x_t.dtype)
        return self.switch(x_t, h_prev, z_prev)

    def switch_step(
        self, e_t: jax.Array, h_prev: jax.Array, z_prev: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """One causal step of (switch unit, GRU) for rollouts (Alg. 1's f_switch).

        e_t f32 [B, D], h_prev f32 [B, n_h], z_prev f32 [B, n_z] (the code in force before
        this step) -> (β_t f32 [B], h_t f32 [B, n_h]).
        """
        x_t = self.in_norm(e_t)
        h_t, _ = self.gru(h_prev, x_t)
        return self._beta(x_t, h_prev, z_prev), h_t

    def control(self, e: jax.Array, z: jax.Array) -> jax.Array:
        """ê = e + U(z) e. e f32 [..., D], z f32 [..., n_z] -> f32 [..., D]."""
        return apply_low_rank(self.decoder, z, e)

    def history(self, x: jax.Array) -> jax.Array:
        """GRU over normalised residuals x f32 [B, T, D] -> h_{t−1} at each t, f32 [B, T, n_h]."""
        h0, _ = self.initial_state(x.shape[0])

        def body(h, x_t):
            h_new, _ = self.gru(h, x_t)
            return h_new, h

        _, h_prev = jax.lax.scan(body, h0, _time_major(x))
        return _time_major(h_prev)

    def __call__(
        self, e: jax.Array, mask: jax.Array, key: jax.Array | None, *, sample: bool = True
    ) -> MetacontrollerOutput:
        """Posterior pass over a whole sequence. e f32 [B, T, D], mask bool [B, T].

        sample: z̃ = μ + σ ε with ε ~ N(0, I) from `key`; False uses z̃ = μ (key unused).
        """
        if e.ndim != 3 or e.shape[-1] != self.dim:
            raise ValueError(f"Metacontroller: expected e [B, T, {self.dim}], got {tuple(e.shape)}")
        if mask.shape != e.shape[:2]:
            raise ValueError(
                f"Metacontroller: mask {tuple(mask.shape)} must be {tuple(e.shape[:2])}"
            )
        if sample and key is None:
            raise ValueError("Metacontroller: sample=True needs a PRNG key")
        mask = mask.astype(bool)
        x = self.in_norm(e)
        h_prev = self.history(x)
        s = self.embedder(x, mask)
        mu, log_var = self.encoder(x, h_prev, s)
        z_tilde = mu
        if sample:
            z_tilde = mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape, mu.dtype)
        beta, z = switch_and_integrate(self._beta, x, h_prev, z_tilde)
        return MetacontrollerOutput(z, z_tilde, mu, log_var, beta, h_prev, s)


class MetacontrolledModel(nnx.Module):
    """A base model whose residual stream at `layer` is edited by a metacontroller."""

    def __init__(self, base: BaseModel | HawkModel, cfg: MetacontrollerConfig, *, rngs: nnx.Rngs):
        self.base = base
        self.cfg = cfg
        self.layer = cfg.insertion_layer(base.cfg.depth)
        self.metacontroller = Metacontroller(cfg, base.cfg.dim, rngs=rngs)

    def __call__(
        self,
        obs: jax.Array,
        mask: jax.Array,
        key: jax.Array | None,
        *,
        sample: bool = True,
        return_residuals: bool = False,
    ) -> tuple[ModelOutput | HawkOutput, MetacontrollerOutput]:
        """obs f32 [B, T, obs_dim], mask bool [B, T] -> (controlled model output, metacontroller
        output). One base forward: the metacontroller runs inside the intervention hook on
        the full stream e_l [B, T, D], and the upper blocks see ê in one causal pass."""
        captured = {}

        def edit(e):
            mc = self.metacontroller(e, mask, key, sample=sample)
            captured["mc"] = mc
            return self.metacontroller.control(e, mc.z)

        out = self.base(
            obs, intervention=edit, intervention_layer=self.layer, return_residuals=return_residuals
        )
        return out, captured["mc"]


# Trainable filters: φ only (base frozen, the paper's setting) or φ + θ (co-training).
METACONTROLLER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("metacontroller"))
ALL_PARAMS = nnx.Param


def trainable_filter(cfg: MetacontrollerConfig):
    """The `create_train_state(trainable=...)` filter for this config."""
    return ALL_PARAMS if cfg.cotrain else METACONTROLLER_PARAMS


def metacontroller_loss(
    model: MetacontrolledModel, batch: dict[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Action NLL + α·KL per valid step (Eq. 3, λ = 0); a `common.train` loss_fn.

    batch: what the base model's `sequence_losses` reads (grid world: obs f32 [B, T, 637],
    action int32 [B, T], next_cells int32 [B, T, 13]; continuous: obs, action f32 [B, T, A],
    next_obs), mask bool [B, T]; optional subgoal int32 [B, T] adds switch precision/recall
    (±1). Metrics: action_nll, action_acc (discrete) or action_mse (continuous), kl (per
    valid step), switches (per trajectory),
    beta_mean, and with subgoal: switch_precision, switch_recall, boundaries.
    """
    mask = batch["mask"].astype(bool)
    out, mc = model(batch["obs"], mask, key)
    per_step = model.base.sequence_losses(out, batch)
    nll = masked_mean(per_step["action_nll"], mask)
    kl = masked_mean(gaussian_kl(mc.mu, mc.log_var), mask)
    thr = model.cfg.switch_threshold
    metrics = dict(
        action_nll=nll,
        **{
            k: masked_mean(per_step[k], mask) for k in ("action_acc", "action_mse") if k in per_step
        },
        kl=kl,
        switches=jnp.mean(switches_per_trajectory(mc.beta, mask, thr)),
        beta_mean=masked_mean(mc.beta, mask),
    )
    if "subgoal" in batch:
        pr = switch_precision_recall(mc.beta, batch["subgoal"], mask, threshold=thr)
        metrics.update(
            switch_precision=pr["precision"],
            switch_recall=pr["recall"],
            boundaries=pr["num_boundaries"] / mask.shape[0],
        )
    return nll + model.cfg.kl_weight * kl, metrics
