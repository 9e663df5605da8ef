"""The one place every layer of `common.nn` builds its dense projections.

`dense(...)` is `nnx.Linear` with the library's defaults: float32 params, LeCun-normal
kernel unless `kernel_init` is given (e.g. `jax.nn.initializers.variance_scaling(0.1,
"fan_in", "truncated_normal")` for internal RL), zero bias.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

__all__ = ["dense", "default_kernel_init"]

default_kernel_init = nnx.initializers.lecun_normal()


def dense(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    kernel_init=None,
    bias_init=None,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear(in_features, out_features)`; `kernel [in, out]`, `bias [out]`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=kernel_init if kernel_init is not None else default_kernel_init,
        bias_init=bias_init if bias_init is not None else nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
