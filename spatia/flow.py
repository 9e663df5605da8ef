"""Flow matching for Spatia's video generator: timesteps, interpolation, loss and ODE samplers.

Convention (Wan's code, docs/spatia.md D8): t is the *noise level*. t = 0 is clean data, t = 1
is pure noise:

    x_t = (1 - t) * x + t * noise,        velocity target  v = d x_t / d t = noise - x.

Clean conditioning tokens therefore carry t = 0 (exactly x), and sampling integrates
dx/dt = v from t = 1 down to t = 0. (The paper writes the same path with t' = 1 - t and the
opposite sign of v.)

Pure pieces (timesteps, interpolation, masked MSE, `integrate`) take arrays only. On top of
them, for `spatia.model.VideoDiT` and the batch dict documented in `spatia.model`:
`training_inputs`, `loss_fn` / `make_loss_fn` (for `common.train.make_train_step`) and the jitted
Euler/Heun sampler `sample` with classifier-free guidance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spatia.model import VideoDiT, decode, tokenize, unpatchify_video
from spatia.model_config import VideoModelConfig

__all__ = [
    "shift_timesteps",
    "logit_normal_timesteps",
    "interpolate",
    "velocity_target",
    "masked_mse",
    "time_grid",
    "integrate",
    "training_inputs",
    "make_loss_fn",
    "loss_fn",
    "sample",
]

# Keeps sampled t strictly inside (0, 1) in float32 (sigmoid rounds to 1.0 beyond ~17).
_T_EPS = 1e-6


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    """Wan/SD3 resolution shift `s t / (1 + (s - 1) t)`: s > 1 moves t toward 1 (more noise).

    t float [...] in [0, 1] -> same shape; shift = 1 is the identity; 0 and 1 are fixed points.
    """
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def logit_normal_timesteps(
    key: jax.Array,
    shape: tuple[int, ...],
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Noise levels t = shift(sigmoid(mean + std * n)), n ~ N(0, 1) -> float32 `shape` in (0, 1).

    The median (before the shift) is sigmoid(mean).
    """
    n = jax.random.normal(key, shape, jnp.float32)
    t = jax.nn.sigmoid(mean + std * n)
    return jnp.clip(shift_timesteps(t, shift), _T_EPS, 1.0 - _T_EPS)


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x + t noise. x, noise [..., P]; t [...] (per token) broadcast over P.

    Tokens with t = 0 come back bit-identical to x.
    """
    t = jnp.asarray(t, x.dtype)[..., None]
    return (1.0 - t) * x + t * noise


def velocity_target(x: jax.Array, noise: jax.Array) -> jax.Array:
    """d x_t / d t = noise - x (same shape as x)."""
    return noise - x


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error over the tokens where mask is True.

    pred, target float [B, L, P]; mask bool [B, L] (or [L]). Returns a float32 scalar: the
    mean over masked tokens and all P features. Unmasked tokens get no loss and no gradient.
    """
    if pred.shape != target.shape:
        raise ValueError(f"masked_mse: pred {pred.shape} and target {target.shape} differ")
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), pred.shape[:-1])
    w = mask.astype(jnp.float32)[..., None]
    err = jnp.where(mask[..., None], (pred.astype(jnp.float32) - target) ** 2, 0.0)
    denom = jnp.maximum(jnp.sum(w) * pred.shape[-1], 1.0)
    return jnp.sum(err) / denom


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
    """float32 [num_steps + 1]: noise levels from 1 down to 0, uniform then shifted."""
    if num_steps < 1:
        raise ValueError(f"time_grid: num_steps must be >= 1, got {num_steps}")
    return shift_timesteps(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def integrate(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_init: jax.Array,
    times: jax.Array,
    method: str = "euler",
    clamp_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Integrates dx/dt = velocity_fn(x, t) along `times` (a `lax.scan` over the steps).

    Args:
      velocity_fn: (x like x_init, t float32 scalar) -> velocity like x_init.
      x_init: state at times[0] (e.g. noise at t = 1).
      times: float32 [S + 1], e.g. `time_grid(S)`.
      method: "euler" (first order) or "heun" (trapezoid predictor-corrector, second order:
        exact for velocities affine in t).
      clamp_fn: applied after every (sub)step, e.g. to reset clean conditioning tokens.
    Returns: the state at times[-1].
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"integrate: method must be 'euler' or 'heun', got {method!r}")
    clamp = clamp_fn if clamp_fn is not None else (lambda x: x)

    def step(x, ts):
        t0, t1 = ts[0], ts[1]
        dt = t1 - t0
        d0 = velocity_fn(x, t0)
        if method == "euler":
            return clamp(x + dt * d0), None
        x_pred = clamp(x + dt * d0)
        d1 = velocity_fn(x_pred, t1)
        return clamp(x + dt * 0.5 * (d0 + d1)), None

    pairs = jnp.stack([times[:-1], times[1:]], axis=-1)
    x, _ = jax.lax.scan(step, clamp(x_init), pairs)
    return x


# ------------------------------------------------------------------------------- training


def training_inputs(
    config: VideoModelConfig,
    batch: dict,
    key: jax.Array,
    *,
    cond_drop_prob: float | None = None,
    ref_drop_prob: float | None = None,
    hist_noise_max: float | None = None,
) -> dict[str, Any]:
    """Noised model inputs and flow-matching targets of a training batch.

    Target tokens get t ~ logit-normal (one t per sample) and x_t = (1 - t) x + t noise;
    reference tokens stay exactly clean with t = 0; history tokens too unless
    hist_noise_max > 0 (then t_aug ~ U[0, hist_noise_max] per sample is applied and passed
    as their timestep). Probabilities default to the config's.
    Returns the `tokenize` dict plus "x_t" [B, L, P], "t" [B, L], "target" [B, L, P]
    (noise - x), "loss_mask" bool [B, L] (target tokens) and "instruction" after dropout.
    """
    p_cond = config.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
    p_ref = config.ref_drop_prob if ref_drop_prob is None else ref_drop_prob
    t_aug_max = config.hist_noise_max if hist_noise_max is None else hist_noise_max
    inp = tokenize(config, batch)
    x, layout = inp["tokens"], inp["layout"]
    B, L, _ = x.shape
    k_t, k_noise, k_cond, k_ref, k_aug = jax.random.split(key, 5)

    t = logit_normal_timesteps(
        k_t, (B,), config.logit_mean, config.logit_std, config.timestep_shift
    )
    is_target = jnp.asarray(layout.target_mask())
    t_tok = jnp.where(is_target[None], t[:, None], 0.0)
    if t_aug_max > 0 and layout.num_prev > 0:
        t_aug = jax.random.uniform(k_aug, (B,), jnp.float32, 0.0, t_aug_max)
        t_tok = jnp.where(jnp.asarray(layout.prev_mask())[None], t_aug[:, None], t_tok)
    noise = jax.random.normal(k_noise, x.shape, jnp.float32)

    instruction = inp["instruction"]
    if instruction is not None and p_cond > 0:
        drop = jax.random.uniform(k_cond, (B,)) < p_cond
        instruction = jnp.where(drop, config.num_instructions, instruction)
    key_valid = inp["key_valid"]
    if p_ref > 0 and layout.num_refs > 0:
        keep = jax.random.uniform(k_ref, (B,)) >= p_ref
        is_ref = jnp.arange(L) < layout.ref_tokens
        kv = jnp.ones((B, L), bool) if key_valid is None else key_valid
        key_valid = kv & (keep[:, None] | ~is_ref[None])
    return dict(
        inp,
        x_t=interpolate(x, noise, t_tok),
        t=t_tok,
        target=velocity_target(x, noise),
        loss_mask=jnp.broadcast_to(is_target[None], (B, L)),
        instruction=instruction,
        key_valid=key_valid,
    )


def make_loss_fn(**overrides):
    """`loss_fn(model, batch, key) -> (loss, aux)` for `common.train.make_train_step`.

    overrides: `cond_drop_prob`, `ref_drop_prob`, `hist_noise_max` (default: the model's
    config), e.g. `make_loss_fn(hist_noise_max=0.05)` for stage 2. The loss is the velocity MSE
    on target tokens only; aux has "t_mean" (mean target noise level).
    """
    allowed = {"cond_drop_prob", "ref_drop_prob", "hist_noise_max"}
    if set(overrides) - allowed:
        raise ValueError(
            f"make_loss_fn: unknown options {sorted(set(overrides) - allowed)}; valid: {sorted(allowed)}"
        )

    def _loss_fn(model: VideoDiT, batch: dict, key: jax.Array):
        inp = training_inputs(model.config, batch, key, **overrides)
        v = model(
            inp["x_t"],
            inp["t"],
            inp["layout"],
            control=inp["control"],
            instruction=inp["instruction"],
            key_valid=inp["key_valid"],
        )
        loss = masked_mse(v, inp["target"], inp["loss_mask"])
        t_mean = jnp.sum(jnp.where(inp["loss_mask"], inp["t"], 0.0)) / jnp.sum(inp["loss_mask"])
        return loss, {"t_mean": t_mean}

    return _loss_fn


loss_fn = make_loss_fn()
loss_fn.__doc__ = (
    "Flow-matching loss with the config's dropout/augmentation settings; see make_loss_fn."
)


# ------------------------------------------------------------------------------- sampling


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "num_steps", "num_frames", "method", "guidance_scale", "shift"),
)
def sample(
    graphdef: nnx.GraphDef,
    state: Any,
    cond: dict,
    key: jax.Array,
    num_steps: int,
    *,
    num_frames: int | None = None,
    method: str | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
) -> dict[str, jax.Array]:
    """Generates the target frames of a clip (jitted; graphdef and the options are static).

    Args:
      graphdef, state: from `nnx.split(model)`; state may also be a tuple of states (e.g.
        `(train_state.params, train_state.frozen)`).
      cond: the batch dict without "frames" (prev, refs, proj/hole, instruction, validity);
        at least one of prev / refs / proj gives the batch size and frame size.
      key: PRNG key of the initial noise.
      num_steps: ODE steps from t = 1 to 0 (Heun costs two model calls per step).
      num_frames: N target frames (default config.num_target_frames).
      method: "euler" | "heun" (default config.sampler).
      guidance_scale: CFG scale s: v = v_null + s (v_cond - v_null) with the null instruction;
        1 (default config.guidance_scale) runs the model once per evaluation.
      shift: time-grid shift (default config.sample_shift).
    Reference and history tokens are reset to their clean values after every step.
    Returns {"frames": float32 [B, N, H, W, C] decoded (pixel range, unclipped),
             "sequence": float32 [B, L, P] final token sequence (refs | prev | target)}.
    """
    states = state if isinstance(state, tuple | list) else (state,)
    model = nnx.merge(graphdef, *states)
    cfg = model.config
    num_frames = cfg.num_target_frames if num_frames is None else num_frames
    method = cfg.sampler if method is None else method
    guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    shift = cfg.sample_shift if shift is None else shift
    if "frames" in cond:
        raise ValueError("sample: cond must not contain 'frames' (the targets are generated)")
    inp = tokenize(cfg, dict(cond, num_target=num_frames))
    layout = inp["layout"]
    clean = inp["tokens"]
    B, L, _ = clean.shape
    c = layout.cond_tokens
    noise = jax.random.normal(key, clean[:, c:].shape, jnp.float32)
    x_init = jnp.concatenate([clean[:, :c], noise], axis=1)
    is_target = jnp.asarray(layout.target_mask())[None]

    instruction = inp["instruction"]
    if instruction is None:
        instruction = jnp.full((B,), cfg.num_instructions, jnp.int32)
    guided = guidance_scale != 1.0
    if guided:
        null = jnp.full((B,), cfg.num_instructions, jnp.int32)
        instr2 = jnp.concatenate([instruction, null])
        dup = lambda a: None if a is None else jnp.concatenate([a, a])
        control2, valid2 = dup(inp["control"]), dup(inp["key_valid"])

    def velocity(x, t):
        t_tok = jnp.broadcast_to(jnp.where(is_target, t, 0.0), (B, L))
        if not guided:
            return model(
                x,
                t_tok,
                layout,
                control=inp["control"],
                instruction=instruction,
                key_valid=inp["key_valid"],
            )
        v = model(
            jnp.concatenate([x, x]),
            jnp.concatenate([t_tok, t_tok]),
            layout,
            control=control2,
            instruction=instr2,
            key_valid=valid2,
        )
        v_cond, v_null = v[:B], v[B:]
        return v_null + guidance_scale * (v_cond - v_null)

    def clamp(x):
        return jnp.where(is_target[..., None], x, clean)

    x = integrate(velocity, x_init, time_grid(num_steps, shift), method, clamp)
    _, N, H, W, C = inp["shape"]
    pt = cfg.patch_size[0]
    frames = unpatchify_video(x[:, c:], cfg.patch_size, (N // pt, *layout.grid), C)
    return {"frames": decode(frames), "sequence": x}
