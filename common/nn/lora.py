"""LoRA adapters for `nnx.Linear` layers, selectable with the `nnx.LoRAParam` filter.

```
apply_lora(model.lm, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"), rank=16, alpha=32, dropout=0.05, rngs=nnx.Rngs(1))
optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)  # LoRA A/B only
```
`nnx.LoRAParam` subclasses `nnx.Param`, so a `wrt=nnx.Param` filter would select the LoRA
matrices too; freeze base weights by training with the `nnx.LoRAParam` filter.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.linear import dense

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_a_default_init"]

# PEFT's default for A: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
lora_a_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRALinear(nnx.Module):
    """`base(x) + dropout(x) @ lora_a @ lora_b * (alpha / rank)`.

    base: the wrapped `nnx.Linear` (its params stay `nnx.Param`).
    lora_a [in, rank] (`nnx.LoRAParam`, PEFT init), lora_b [rank, out] (`nnx.LoRAParam`,
    zeros), so the layer equals `base` at init. dropout > 0 adds an `nnx.Dropout` on the
    LoRA branch input (active until `model.eval()`; needs a "dropout" rng stream).
    """

    def __init__(
        self,
        base: nnx.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        a_init=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(base, nnx.Linear):
            raise TypeError(f"LoRALinear wraps an nnx.Linear, got {type(base).__name__}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        a_init = a_init or lora_a_default_init
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (base.in_features, rank), param_dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), param_dtype))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x if self.dropout is None else self.dropout(x)
        a = self.lora_a[...].astype(y.dtype)
        b = self.lora_b[...].astype(y.dtype)
        return y + (h.astype(y.dtype) @ a @ b) * jnp.asarray(self.scaling, y.dtype)

    def merged(self) -> nnx.Linear:
        """A plain `nnx.Linear` with kernel `base.kernel + lora_a @ lora_b * scaling`."""
        base = self.base
        kernel = base.kernel[...]
        delta = (self.lora_a[...] @ self.lora_b[...]) * self.scaling
        out = dense(
            base.in_features,
            base.out_features,
            use_bias=base.use_bias,
            dtype=base.dtype,
            param_dtype=kernel.dtype,
            rngs=nnx.Rngs(0),
        )
        out.kernel[...] = kernel + delta.astype(kernel.dtype)
        if base.use_bias:
            out.bias[...] = base.bias[...]
        return out


def _set_child(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _get_child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def apply_lora(
    module: nnx.Module,
    target_names: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    a_init=None,
    rngs: nnx.Rngs,
) -> list[tuple]:
    """Replace, in place, every `nnx.Linear` attribute of `module` (at any depth) whose
    attribute name is in `target_names` with a `LoRALinear` wrapping it.

    Returns the paths replaced (tuples of attribute names / list indices). Raises
    ValueError when nothing matched. Apply it to the part of the model that should get
    LoRA only (e.g. the language model, not the vision tower).
    """
    names = set(target_names)
    paths = [
        path
        for path, m in nnx.iter_modules(module)
        if path and isinstance(m, nnx.Linear) and path[-1] in names
    ]
    if not paths:
        raise ValueError(f"apply_lora: no nnx.Linear named any of {sorted(names)} in the module")
    for path in paths:
        parent = module
        for key in path[:-1]:
            parent = _get_child(parent, key)
        base = _get_child(parent, path[-1])
        _set_child(
            parent,
            path[-1],
            LoRALinear(
                base,
                rank,
                alpha,
                dropout,
                a_init=a_init,
                param_dtype=base.kernel[...].dtype,
                rngs=rngs,
            ),
        )
    return paths


def merge_lora(module: nnx.Module) -> list[tuple]:
    """Replace, in place, every `LoRALinear` in `module` by its merged `nnx.Linear`.

    Returns the paths merged. (Spatia merges its LoRA into the DiT for later rounds.)
    """
    paths = [path for path, m in nnx.iter_modules(module) if path and isinstance(m, LoRALinear)]
    for path in paths:
        parent = module
        for key in path[:-1]:
            parent = _get_child(parent, key)
        _set_child(parent, path[-1], _get_child(parent, path[-1]).merged())
    return paths
