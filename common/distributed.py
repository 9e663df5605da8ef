"""Device meshes and shardings: one code path for 1 CPU, 8 GPUs, a TPU slice or many hosts.

Data parallelism is `jax.jit` over a mesh with a `data` axis: the global batch is split
along its leading dimension across the `data` axis and parameters are replicated (or
sharded along `model` later). The legacy per-device map API is never used.

Multi-host: every process runs the same program. Call `maybe_initialize_distributed()`
first (it is a no-op on one machine), build the mesh over `jax.devices()` (all hosts'
devices), and feed each process's share of the global batch with `host_local_batch` +
`place_batch(..., process_local=True)`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Environment variables that, when present, mean the launcher expects a multi-process run.
_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when a coordinator is configured.

    Reads `JAX_COORDINATOR_ADDRESS` (host:port), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
    On clusters that JAX auto-detects (SLURM, TPU pods, Cloud TPU VMs) set
    `JAX_DISTRIBUTED_AUTO=1` to call `initialize()` without arguments. On a CPU-only
    multi-process run, CPU collectives are switched to gloo so cross-process reductions
    work.

    Returns True if the distributed runtime was initialised by this call.
    """
    address = next((os.environ[k] for k in _COORDINATOR_ENV if os.environ.get(k)), None)
    auto = os.environ.get("JAX_DISTRIBUTED_AUTO", "") not in ("", "0")
    if address is None and not auto:
        return False
    # Only the CPU backend reads this; without it, cross-process CPU reductions fail.
    # It must be set before any backend starts, so it is not made conditional on probing.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address is None:
        jax.distributed.initialize()
        return True
    try:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
        process_id = int(os.environ["JAX_PROCESS_ID"])
    except KeyError as err:
        raise RuntimeError(
            f"JAX_COORDINATOR_ADDRESS={address!r} is set but {err.args[0]} is not; "
            "set JAX_NUM_PROCESSES and JAX_PROCESS_ID for every process"
        ) from err
    except ValueError as err:
        raise RuntimeError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {err}") from err
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    return True


def make_mesh(
    data: int | None = None,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A 2-D mesh (`data`, `model`) over all (or the given) devices.

    Args:
      data: size of the data axis; default = number of devices // model.
      model: size of the model axis (1 = pure data parallelism).
      devices: devices to use (default: `jax.devices()`, i.e. every host's devices).
    """
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model axis size {model} must divide the {n} available devices")
    data = n // model if data is None else data
    if data * model != n:
        raise ValueError(f"mesh data={data} x model={model} does not match {n} devices")
    # Auto axes: XLA propagates the shardings of a data-parallel step from its inputs; with
    # explicit axes (jax.make_mesh's default) every op would have to state its output's.
    axis_types = (AxisType.Auto, AxisType.Auto)
    if devices == jax.devices():
        return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), axis_types=axis_types)
    return Mesh(
        np.asarray(devices).reshape(data, model), (DATA_AXIS, MODEL_AXIS), axis_types=axis_types
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated on every device of the mesh (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Places a value that every process holds in full onto a (possibly multi-host) sharding.

    `jax.device_put` cannot target devices of other processes, so across hosts each process
    fills its own shards from its full copy. Typed PRNG keys travel as their raw key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put_global(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` replicated on the mesh (on every host's devices)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put_global(x, sharding), tree)


def host_local_batch(global_batch: Any) -> Any:
    """This process's contiguous slice of a global batch given as host arrays.

    Every leaf's leading dimension must be divisible by `jax.process_count()`.
    """
    count, index = jax.process_count(), jax.process_index()

    def take(x):
        x = np.asarray(x)
        if x.shape[0] % count:
            raise ValueError(
                f"global batch dimension {x.shape[0]} is not divisible by {count} processes"
            )
        size = x.shape[0] // count
        return x[index * size : (index + 1) * size]

    return jax.tree.map(take, global_batch)


def place_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Shards a batch over the mesh's `data` axis.

    Args:
      batch: pytree of arrays with a common leading batch dimension. With
        `process_local=False` it is the global batch (the same on every process);
        with `process_local=True` it is this process's share (see `host_local_batch`)
        and the global array is assembled across processes.
      mesh: the mesh from `make_mesh`.
    Raises:
      ValueError: if the batch dimension is not divisible by the data axis size.
    """
    sharding = batch_sharding(mesh)
    n_data = mesh.shape[DATA_AXIS]

    def put(x):
        x = np.asarray(x)
        global_rows = x.shape[0] * (jax.process_count() if process_local else 1)
        if global_rows % n_data:
            raise ValueError(
                f"global batch dimension {global_rows} is not divisible by the mesh's "
                f"data axis ({n_data} devices)"
            )
        if process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        return _put_global(x, sharding)

    return jax.tree.map(put, batch)
