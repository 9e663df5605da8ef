"""Atomic orbax checkpoints of a training state, its data-iterator state and run metadata.

One checkpoint step is a directory `<directory>/<step>/` with three items:

- `state`: the training-state pytree (any pytree of arrays: `common.train.TrainState`,
  an `nnx.State`, a dict), written with `StandardSave` and restored into an abstract target
  so the caller decides shapes, dtypes and shardings (a restore onto a mesh lands sharded);
- `data`: the data iterator's JSON state (`{"data_state": dict | None}`);
- `meta`: JSON with the run's `config` dict and a fingerprint of the state tree
  (path -> shape, dtype), compared against the restore target *before* orbax reads
  any array, so a checkpoint from a different model config fails with a message that
  names the differing parameters instead of an opaque tensorstore error.

Atomicity comes from orbax: a step is written under `<step>.orbax-checkpoint-tmp-<ts>/`
and renamed to `<step>/` only once every item is on disk, so a process killed mid-save
leaves at most a temporary directory, which `latest_step()` ignores (and which is
removed the next time a `Checkpointer` opens the directory). Saves are synchronous:
when `save` returns, the checkpoint is committed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "abstract_like",
    "tree_fingerprint",
]

# How many differences a mismatch error lists before summarising the rest.
_MAX_LISTED_DIFFS = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the state or config it is being restored into.

    Attributes:
      differences: one line per difference, e.g.
        "params/l1/kernel: checkpoint (1, 16) vs model (1, 32)".
    """

    def __init__(self, directory: str, step: int, differences: list[str]):
        self.differences = differences
        listed = differences[:_MAX_LISTED_DIFFS]
        more = len(differences) - len(listed)
        lines = "\n  ".join(listed + ([f"... and {more} more"] if more > 0 else []))
        super().__init__(
            f"checkpoint {directory}/{step} was made with a different model or config "
            f"({len(differences)} difference(s)):\n  {lines}"
        )


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path: Sequence[Any]) -> str:
    names = [_key_name(k) for k in path]
    # nnx.Variable nodes add a trailing `.value` attribute that is noise for a reader.
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def tree_fingerprint(tree: Any) -> dict[str, dict[str, Any]]:
    """Path -> {"shape": [...], "dtype": str} for every array-like leaf of `tree`.

    Paths join pytree keys with "/" (e.g. "params/blocks/0/mlp/kernel"). Works on live
    arrays and on `jax.ShapeDtypeStruct` leaves alike, so a checkpoint's fingerprint can be
    compared with an abstract restore target.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        out[_path_str(path)] = {
            "shape": list(shape),
            "dtype": str(dtype) if dtype is not None else type(leaf).__name__,
        }
    return out


def abstract_like(tree: Any) -> Any:
    """Replaces array leaves by `jax.ShapeDtypeStruct`s that keep shape, dtype and sharding.

    Leaves that already are `ShapeDtypeStruct`s pass through, so the result of
    `jax.eval_shape` (with shardings attached by the caller) is a valid input too.
    """

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        raise TypeError(
            f"abstract_like: expected jax.Array or jax.ShapeDtypeStruct leaves, got {type(x).__name__}"
        )

    return jax.tree.map(leaf, tree)


def _jsonable_config(config: Any) -> dict | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"Checkpointer: config must be a dict or a dataclass instance, got {type(config).__name__}"
        )
    try:
        # Round-trip so tuples become lists exactly as they will after a JSON restore.
        return json.loads(json.dumps(dict(config)))
    except TypeError as e:
        raise TypeError(f"Checkpointer: config must be JSON-serialisable: {e}") from None


def _config_diffs(saved: Any, current: Any, prefix: str, ignore: set[str]) -> list[str]:
    if prefix in ignore:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        diffs = []
        for k in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{k}"
            if k not in current:
                if name not in ignore:
                    diffs.append(f"{name}: only in checkpoint ({saved[k]!r})")
            elif k not in saved:
                if name not in ignore:
                    diffs.append(f"{name}: only in run config ({current[k]!r})")
            else:
                diffs.extend(_config_diffs(saved[k], current[k], name, ignore))
        return diffs
    if saved != current:
        return [f"{prefix}: checkpoint {saved!r} vs run {current!r}"]
    return []


def _fingerprint_diffs(saved: dict, target: dict) -> list[str]:
    diffs = []
    for path in sorted(set(saved) | set(target)):
        if path not in target:
            diffs.append(f"{path}: in checkpoint {tuple(saved[path]['shape'])}, missing in model")
        elif path not in saved:
            diffs.append(f"{path}: in model {tuple(target[path]['shape'])}, missing in checkpoint")
        else:
            s, t = saved[path], target[path]
            if s["shape"] != t["shape"]:
                diffs.append(f"{path}: checkpoint {tuple(s['shape'])} vs model {tuple(t['shape'])}")
            elif s["dtype"] != t["dtype"]:
                diffs.append(f"{path}: checkpoint dtype {s['dtype']} vs model dtype {t['dtype']}")
    return diffs


class Checkpointer:
    """Saves and restores (state pytree, data-iterator state) at integer steps.

    Args:
      directory: where step directories live; created if missing.
      max_to_keep: how many most recent checkpoints to keep (None keeps all).
      config: the run's config (JSON-serialisable dict or dataclass instance). Stored with
        every checkpoint; `restore` fails if the stored config differs.
      ignore_config_keys: dotted keys (e.g. "train.num_steps") whose values may differ
        between the checkpoint and this run without failing a restore.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int | None = 3,
        config: Any = None,
        ignore_config_keys: Sequence[str] = (),
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"Checkpointer: max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = pathlib.Path(directory).resolve()
        self.config = _jsonable_config(config)
        self._ignore = {k if k.startswith("config.") else f"config.{k}" for k in ignore_config_keys}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Synchronous: a returned save is committed, and the train loop may donate the
            # state's buffers to the next step right after.
            enable_async_checkpointing=False,
            # Leftovers of a killed save are garbage; removing them keeps the directory clean.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    # -- queries ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none (temporary dirs are ignored)."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def metadata(self, step: int | None = None) -> dict:
        """The stored `{"config", "fingerprint", "step"}` JSON of a step (default: latest)."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    # -- save / restore --------------------------------------------------------------------

    def save(
        self, step: int, state: Any, data_state: dict | None = None, force: bool = False
    ) -> bool:
        """Writes `state` (pytree of arrays) and `data_state` (JSON dict) as checkpoint `step`.

        Blocks until the checkpoint is committed. Returns False, writing nothing, if `step`
        is not newer than the latest checkpoint (orbax never overwrites a step); `force` is
        passed to orbax to bypass its save-interval policy.
        """
        step = int(step)
        if data_state is not None:
            try:
                json.dumps(data_state)
            except TypeError as e:
                raise TypeError(
                    f"Checkpointer.save: data_state must be JSON-serialisable: {e}"
                ) from None
        meta = {"step": step, "config": self.config, "fingerprint": tree_fingerprint(state)}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"data_state": data_state}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        self._manager.wait_until_finished()
        return bool(saved)

    def check_compatible(self, abstract_state: Any, step: int | None = None) -> None:
        """Raises CheckpointMismatchError if checkpoint `step` does not fit the target/config."""
        step = self._resolve_step(step)
        meta = self.metadata(step)
        diffs = _fingerprint_diffs(meta["fingerprint"], tree_fingerprint(abstract_state))
        if self.config is not None and meta.get("config") is not None:
            diffs += _config_diffs(meta["config"], self.config, "config", self._ignore)
        if diffs:
            raise CheckpointMismatchError(str(self.directory), step, diffs)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None]:
        """Restores checkpoint `step` (default: latest) into the structure of `abstract_state`.

        Args:
          abstract_state: pytree with the target's structure whose leaves are live
            `jax.Array`s or `jax.ShapeDtypeStruct`s. Each restored array takes the leaf's
            shape, dtype and sharding (a `ShapeDtypeStruct` without a sharding is placed on
            the default device).
          step: which checkpoint; None means the latest.

        Returns:
          (state, data_state): the restored pytree and the data-iterator dict (or None).

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          CheckpointMismatchError: tree paths, shapes, dtypes or config differ.
        """
        step = self._resolve_step(step)
        self.check_compatible(abstract_state, step)
        target = abstract_like(abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = jax.tree.map(_match_commitment, restored["state"], abstract_state)
        return state, restored["data"]["data_state"]

    def wait(self) -> None:
        """Blocks until pending writes are committed (saves are synchronous already)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        return int(step)


def _match_commitment(restored: Any, target: Any) -> Any:
    """Orbax returns arrays committed to their sharding; a freshly initialised state is
    uncommitted, and ``jax.jit`` keys its cache on that, so a resumed run would compile every
    step function a second time. Where the target leaf is an uncommitted array, so is the
    restored one."""
    if not isinstance(target, jax.Array) or target.committed:
        return restored
    if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
        data = jnp.asarray(np.asarray(jax.random.key_data(restored)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(target))
    return jnp.asarray(np.asarray(restored))
