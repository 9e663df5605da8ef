"""Named random streams derived from one config seed.

Every random draw of a run (model init, data order, evaluation episodes, each seed of a
sweep) comes from its own stream, named rather than numbered, so adding a stream never shifts
another one and no two stages share one by accident of arithmetic:

    rngs = nnx.Rngs(stream_seed(cfg.seed, "model"))
    data = ArrayIterator(arrays, 32, seed=stream_seed(cfg.seed, "data", task, replicate))
    key = stream_key(cfg.seed, "eval")
"""

from __future__ import annotations

import hashlib

import jax

__all__ = ["stream_key", "stream_seed"]


def stream_seed(seed: int, *names: str | int) -> int:
    """An int in [0, 2**31) for the stream `names` of `seed`; stable across processes and runs.

    Args:
      seed: the run's seed (from its config).
      names: the stream's path, e.g. ("data",), ("finetune", "latents", 3); strings and ints.
    Raises:
      TypeError: a name that is neither a str nor an int (floats and tuples would hash by
        their repr, which is too easy to change by accident).
    """
    for n in names:
        if isinstance(n, bool) or not isinstance(n, (str, int)):
            raise TypeError(f"stream_seed: stream names must be str or int, got {n!r}")
    text = "/".join([str(int(seed)), *(f"{type(n).__name__}:{n}" for n in names)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def stream_key(seed: int, *names: str | int) -> jax.Array:
    """`jax.random.key(stream_seed(seed, *names))`: a typed PRNG key of that stream."""
    return jax.random.key(stream_seed(seed, *names))
