"""Feed-forward blocks: two-layer MLP (ReLU / GELU) and gated SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.linear import dense

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu")


class MLP(nnx.Module):
    """Position-wise feed-forward network, `[..., dim] -> [..., out_dim or dim]`.

    activation:
      "relu" / "gelu" (exact erf) / "gelu_tanh" (tanh approximation) / "silu":
          `down_proj(act(up_proj(x)))`
      "swiglu": `down_proj(silu(gate_proj(x)) * up_proj(x))` (Llama / Qwen style).

    Submodule names follow Hugging Face (`gate_proj`, `up_proj`, `down_proj`) so LoRA
    target lists and weight-porting maps read the same as for Qwen.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        *,
        out_dim: int | None = None,
        kernel_init=None,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        kw = dict(
            use_bias=use_bias,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.gate_proj = dense(dim, hidden, **kw) if activation == "swiglu" else None
        self.up_proj = dense(dim, hidden, **kw)
        self.down_proj = dense(hidden, out_dim or dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.activation
        if a == "swiglu":
            h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.up_proj(x)
            if a == "relu":
                h = jax.nn.relu(h)
            elif a == "gelu":
                h = jax.nn.gelu(h, approximate=False)
            elif a == "gelu_tanh":
                h = jax.nn.gelu(h, approximate=True)
            else:  # silu
                h = jax.nn.silu(h)
        return self.down_proj(h)
