"""FSDP-style placement of the frozen weights over every device of a mesh (docs/lir.md
D20): each weight is split along its largest axis that the device count divides,
so a 7B model's bf16 weights (~16.6 GB) spread over the GPUs a user has; XLA all-gathers a
layer's weights where the jitted step uses them. Small or indivisible tensors, and the
trainable LoRA / latent parameters, stay replicated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common.distributed import DATA_AXIS, MODEL_AXIS, make_mesh

# Tensors below this many elements are replicated: splitting them saves nothing.
MIN_SHARDED_SIZE = 1 << 14


def fsdp_spec(
    shape: tuple[int, ...], n_devices: int, axes: tuple[str, ...] = (DATA_AXIS, MODEL_AXIS)
) -> PartitionSpec:
    """PartitionSpec that splits the largest axis of ``shape`` divisible by ``n_devices``
    over all mesh ``axes`` (replicated when none divides, or the tensor is small)."""
    size = 1
    for d in shape:
        size *= d
    if n_devices <= 1 or size < MIN_SHARDED_SIZE:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n_devices == 0:
            spec = [None] * len(shape)
            spec[axis] = axes
            return PartitionSpec(*spec)
    return PartitionSpec()


def fsdp_sharding(mesh: Mesh | None = None) -> Callable[[tuple, tuple], NamedSharding]:
    """``(param path, shape) -> NamedSharding`` for ``weights.load_checkpoint(sharding=...)``
    over ``mesh`` (default: every device, ``common.distributed.make_mesh()``)."""
    mesh = mesh or make_mesh()
    n = mesh.devices.size

    def place(path: tuple, shape: tuple) -> NamedSharding:
        del path
        return NamedSharding(mesh, fsdp_spec(shape, n, tuple(mesh.axis_names)))

    return place


def shard_state(state, mesh: Mesh):
    """Place every array of an ``nnx.State`` (or any pytree) with :func:`fsdp_spec`."""
    n = mesh.devices.size
    names = tuple(mesh.axis_names)
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x.shape, n, names))), state
    )
