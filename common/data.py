"""Host-side data iterators whose position is checkpointed with the model.

A `DataIterator` yields batches and can report and restore its position, so a resumed run
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

__all__ = ["ArrayIterator", "DataIterator", "SequenceIterator"]


class DataIterator(Protocol):
    """What `train` reads batches from; its state is checkpointed with the model."""

    def next(self) -> Any:
        """The next batch (a pytree of host numpy or jax arrays)."""
        ...

    def get_state(self) -> dict:
        """JSON-serialisable position, such that `set_state` makes `next()` continue from here."""
        ...

    def set_state(self, state: dict) -> None: ...


class ArrayIterator:
    """Endless minibatches over in-memory arrays, one seeded permutation per epoch.

    Args:
      arrays: name -> array, all with the same leading length N.
      batch_size: rows per batch, 1 <= batch_size <= N. The last N % batch_size rows of each
        epoch's order are skipped (every batch has the same shape, so one compile).
      seed: epoch e is shuffled by `np.random.default_rng([seed, e])`, so any (epoch, position)
        can be resumed without replaying earlier epochs.
      shuffle: False keeps the original order every epoch.

    State: {"epoch": int, "position": int} (position = rows of this epoch's order consumed).
    """

    def __init__(
        self, arrays: Mapping[str, Any], batch_size: int, seed: int = 0, shuffle: bool = True
    ):
        if not arrays:
            raise ValueError("ArrayIterator: `arrays` is empty")
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: v.shape[0] if v.ndim else None for k, v in self._arrays.items()}
        n = next(iter(lengths.values()))
        if n is None or any(length != n for length in lengths.values()):
            raise ValueError(f"ArrayIterator: arrays need one common leading length, got {lengths}")
        if not 1 <= batch_size <= n:
            raise ValueError(
                f"ArrayIterator: batch_size must be in [1, {n}] (the data length), got {batch_size}"
            )
        self.num_rows, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def next(self) -> dict[str, np.ndarray]:
        if self._position + self.batch_size > self.num_rows:
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        idx = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return {k: v[idx] for k, v in self._arrays.items()}

    __next__ = next

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"ArrayIterator.set_state: expected {{'epoch': int, 'position': int}}, got {state!r}"
            ) from None
        if epoch < 0 or not 0 <= position <= self.num_rows:
            raise ValueError(
                f"ArrayIterator.set_state: out of range: {state!r} (num_rows={self.num_rows})"
            )
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)


class SequenceIterator:
    """Endless iteration over a sequence of ready-made batches, one seeded order per epoch.

    For data that comes as whole batches (e.g. built on access from a feature cache) rather
    than as rows: `next()` returns `items[order[position]]`. Epoch e's order is
    `np.random.default_rng([seed, e]).permutation(len(items))` (identity with
    `shuffle=False`), so any (epoch, position) resumes without replaying earlier epochs.

    State: {"epoch": int, "position": int} (position = items of this epoch consumed).
    """

    def __init__(self, items, seed: int = 0, shuffle: bool = True):
        if len(items) < 1:
            raise ValueError("SequenceIterator: `items` is empty")
        self._items, self.seed, self.shuffle = items, seed, shuffle
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self._items)
        return (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )

    def next(self) -> Any:
        if self._position >= len(self._items):
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        item = self._items[int(self._order[self._position])]
        self._position += 1
        return item

    __next__ = next

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"SequenceIterator.set_state: expected {{'epoch': int, "
                f"'position': int}}, got {state!r}"
            ) from None
        if epoch < 0 or not 0 <= position <= len(self._items):
            raise ValueError(
                f"SequenceIterator.set_state: out of range: {state!r} ({len(self._items)} items)"
            )
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)
