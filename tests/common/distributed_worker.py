"""Runs a few data-parallel train steps of a toy model and saves the final parameters.

Launched as a subprocess by tests/common/test_distributed.py in two modes that must
agree: `single` (one device) and `multihost` (one of several processes joined by jax.distributed, each feeding its share
of the global batch). Usage: python distributed_worker.py MODE OUT.npz
"""

import os
import sys

MODE, OUT = sys.argv[1], sys.argv[2]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from common import distributed, train  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
GLOBAL_BATCH, STEPS = 16, 3


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model, batch, key):
    del key
    pred = model(batch["x"])[:, 0]
    return ((pred - batch["y"]) ** 2).mean(), {}


def main():
    initialized = distributed.maybe_initialize_distributed() if MODE == "multihost" else False
    mesh = distributed.make_mesh()
    if MODE == "multihost":
        assert initialized and jax.process_count() == int(os.environ["JAX_NUM_PROCESSES"])

    model = Toy(nnx.Rngs(0))
    tx = optax.sgd(0.1)
    graphdef, state = train.create_train_state(model, tx, jax.random.key(0))
    state = distributed.replicate(state, mesh)
    step = train.make_train_step(graphdef, loss_fn, tx)

    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        x = rng.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)
        batch = {"x": x, "y": np.sin(x.sum(-1)).astype(np.float32)}
        if MODE == "multihost":
            batch = distributed.place_batch(
                distributed.host_local_batch(batch), mesh, process_local=True
            )
        else:
            batch = distributed.place_batch(batch, mesh)
        state, metrics = step(state, batch)

    # Parameters are replicated, so every process holds a full copy of each leaf.
    leaves = [
        np.asarray(jax.device_get(x.addressable_data(0))) for x in jax.tree.leaves(state.params)
    ]
    if jax.process_index() == 0:
        np.savez(OUT, *leaves, loss=np.asarray(jax.device_get(metrics["loss"].addressable_data(0))))
    if MODE == "multihost":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
