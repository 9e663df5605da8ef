"""Contracts that several packages' tests check the same way.

* `assert_resume_bit_exact`: a run stopped part-way and resumed from its checkpoint ends
  bitwise equal to the same run taken to the end in one go.
* `assert_decode_matches_forward`: step-by-step cached decoding gives, at every position,
  the outputs of one full (causal) forward pass over the whole sequence.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["assert_decode_matches_forward", "assert_resume_bit_exact", "assert_trees_equal"]


def _host(leaf: Any) -> np.ndarray:
    """A pytree leaf as a NumPy array (typed PRNG keys as their raw key data)."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(jax.device_get(leaf))


def _leaves(tree: Any) -> tuple[Any, list[tuple[str, np.ndarray]]]:
    """(tree structure, [(path string, leaf as NumPy)])."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return treedef, [(jax.tree_util.keystr(path), _host(leaf)) for path, leaf in flat]


def assert_trees_equal(expected: Any, actual: Any, what: str = "tree") -> None:
    """Same tree structure and bitwise-equal leaves (shape, dtype and every value); a
    failure names the leaf's path."""
    t_exp, exp = _leaves(expected)
    t_act, act = _leaves(actual)
    assert t_exp == t_act, f"{what}: tree structures differ:\n{t_exp}\n!=\n{t_act}"
    for (path, a), (_, b) in zip(exp, act, strict=True):
        assert a.dtype == b.dtype, f"{what}{path}: dtype {a.dtype} != {b.dtype}"
        np.testing.assert_array_equal(b, a, err_msg=f"{what}{path}", strict=True)


def _trees_differ(a: Any, b: Any) -> bool:
    t_a, la = _leaves(a)
    t_b, lb = _leaves(b)
    return t_a != t_b or any(
        x.shape != y.shape or not np.array_equal(x, y)
        for (_, x), (_, y) in zip(la, lb, strict=True)
    )


def assert_resume_bit_exact(
    run: Callable[[pathlib.Path, int], Any],
    tmp_path: pathlib.Path,
    *,
    kill_after: int,
    total: int,
    compare: Callable[[Any], Any] = lambda result: result,
    uninterrupted: Any = None,
    interrupt: Callable[[pathlib.Path, int], Any] | None = None,
    resume: Callable[[pathlib.Path, int], Any] | None = None,
) -> tuple[Any, Any]:
    """Resume == uninterrupted, bit for bit.

    Runs `run(tmp_path / "uninterrupted", total)` (skipped when the caller passes the
    result of that run as `uninterrupted`, e.g. a module fixture shared with other tests);
    then, in `tmp_path / "interrupted"`, `interrupt(dir, kill_after)` (default `run`: stop
    after `kill_after` steps with a checkpoint) followed by `resume(dir, total)` (default
    `run`), which must pick up from the checkpoint. Asserts that `compare` of the two final
    results (the parameter pytree, optionally with optimizer state, metrics histories, ...)
    have the same tree structure and bitwise-equal leaves.

    When the interrupted leg returns a result (not None), its `compare` must differ from the
    final one, so the equality is not inherited from a run that had already finished. A
    "resume" that silently starts over would also end equal: callers check that the second
    leg did resume (its log line, `resumed_from`, the checkpoint it found).

    Args:
      run: (directory, steps) -> result of a stage trained (or resumed) to `steps` there.
      kill_after: where the interrupted leg stops (its last checkpoint may be earlier if
        `interrupt` crashes or kills the run).
      total: the step count both runs end at.
      compare: result -> the pytree compared (default: the result itself).
      interrupt: replaces the first leg, e.g. a crash or a SIGKILLed subprocess; may
        return None.
      resume: replaces the resumed leg, e.g. one rebuilt from a fresh init.

    Returns: (uninterrupted result, resumed result) for run-specific extra checks.
    """
    if not 0 < kill_after <= total:
        raise ValueError(f"kill_after must be in (0, total={total}]; got {kill_after}")
    tmp_path = pathlib.Path(tmp_path)
    full = run(tmp_path / "uninterrupted", total) if uninterrupted is None else uninterrupted
    split = tmp_path / "interrupted"
    first = (interrupt or run)(split, kill_after)
    if first is not None:
        assert _trees_differ(compare(first), compare(full)), (
            f"the run stopped after {kill_after} steps already equals the one at {total}: "
            "the resume comparison would prove nothing"
        )
    resumed = (resume or run)(split, total)
    assert_trees_equal(compare(full), compare(resumed), "resumed")
    return full, resumed


def assert_decode_matches_forward(
    forward_logits: Any,
    decode_logits: Any,
    *,
    atol: float,
    rtol: float,
    forward_time_axis: int = 1,
    decode_time_axis: int = 0,
) -> None:
    """Cached step-by-step decoding == the full forward pass, position by position.

    `forward_logits`: pytree of the full forward's outputs over T positions, time on
    `forward_time_axis` (default 1: batch-major [B, T, ...]). `decode_logits`: the same
    pytree from decoding one position (or chunk) at a time with the cache, time on
    `decode_time_axis` (default 0: time-major, as `jax.lax.scan` stacks per-step outputs).
    Asserts equal structure and shapes, |decode - forward| <= atol + rtol * |forward| at
    every position, and that some output varies along time (T > 1 and not constant), so a
    decoder that ignores its position could not pass.
    """
    t_f, fwd = _leaves(forward_logits)
    t_d, dec = _leaves(decode_logits)
    assert t_f == t_d, f"decode and forward outputs differ in structure:\n{t_d}\n!=\n{t_f}"
    varies = False
    for (path, f), (_, d) in zip(fwd, dec, strict=True):
        d = np.moveaxis(d, decode_time_axis, forward_time_axis)
        assert d.shape == f.shape, f"{path}: decode shape {d.shape} != forward {f.shape}"
        np.testing.assert_allclose(d, f, atol=atol, rtol=rtol, err_msg=f"decode vs forward{path}")
        first = np.take(f, [0], axis=forward_time_axis)
        varies |= f.shape[forward_time_axis] > 1 and not np.allclose(f, first, atol=atol)
    assert varies, "the outputs do not change along time: the comparison proves nothing"
