"""The benchmarks' one timing helper: warm-up apart, repeats, median and spread, background load.

`time_call(fn, repeats=...)` runs ``fn`` once as a warm-up (trace + compile + first run, reported
as ``compile_s``), then ``repeats`` timed calls, each followed by ``jax.block_until_ready`` on the
result (non-JAX leaves pass through, so numpy, MuJoCo and Open3D peers are timed the same way).

Around every timed call it reads the aggregate ``cpu`` line of ``/proc/stat`` twice and computes
the *background load*: the fraction of the machine's CPU time (all cores) that went to other
processes, i.e. busy time minus this process's own CPU time, over the wall time of all cores.
A call whose background load exceeds ``max_load`` is contended: it is repeated (at most
``retries`` more times) and the least contended attempt is kept, so a burst from another process
does not land in the median. The loads of the kept calls are recorded with the numbers. (Under
load that lasts, every attempt is contended: the retries then cost time without changing much,
and ``contended_retries`` and ``background_load`` in the record say so.)

Calls shorter than a few scheduler ticks (``/proc/stat`` counts in 1/CLK_TCK s, usually 10 ms)
cannot be measured one by one; their per-call load is ``None`` (such a call is never retried)
and the record's load falls back to the whole timed block. On a system without ``/proc/stat`` every load is ``None``.

Imported by the scripts as ``from timing import time_call`` when they are run as files
(``python benchmarks/x.py`` puts this folder first on ``sys.path``) and as
``from .timing import time_call`` under ``python -m benchmarks.x``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

PROC_STAT = "/proc/stat"
# Fewer ticks than this (summed over all cores) in an interval: the load of that interval is
# dominated by tick rounding, so it is reported as None rather than as a number.
MIN_TICKS = 8


def _ticks_per_s() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


def read_cpu_ticks(path: str = PROC_STAT) -> tuple[int, int] | None:
    """(busy, total) ticks of all cores from the aggregate ``cpu`` line of ``/proc/stat``.

    Busy counts user, nice, system, irq, softirq and steal (steal is CPU another guest of the
    host took: background load too); idle and iowait are idle. ``guest`` is already inside
    ``user`` and is not added again. Returns None where the file is missing or unreadable.
    """
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("cpu "):
                    v = [int(x) for x in line.split()[1:]]
                    break
            else:
                return None
    except (OSError, ValueError):
        return None
    v += [0] * (8 - len(v))
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def background_load(
    before: tuple[int, int] | None,
    after: tuple[int, int] | None,
    own_cpu_s: float,
    ticks_per_s: int | None = None,
) -> float | None:
    """Fraction in [0, 1] of the machine's CPU time taken by other processes between two
    `read_cpu_ticks` samples, given this process's CPU seconds over the same interval.

    None when either sample is missing or the interval spans fewer than `MIN_TICKS` ticks.
    """
    if before is None or after is None:
        return None
    busy, total = after[0] - before[0], after[1] - before[1]
    if total < MIN_TICKS:
        return None
    hz = ticks_per_s or _ticks_per_s()
    other = busy - own_cpu_s * hz
    return min(1.0, max(0.0, other / total))


def time_call(
    fn: Callable[..., Any],
    *,
    repeats: int = 3,
    warmup: Callable[[], Any] | bool = True,
    vary: Callable[[int], tuple] | None = None,
    max_load: float = 0.25,
    retries: int = 2,
    stat_path: str = PROC_STAT,
) -> dict:
    """Time ``fn`` and return a JSON-ready record.

    fn: the callable; called as ``fn()``, or as ``fn(*vary(n))`` with ``n`` the call number
        (0 for the warm-up, then 1, 2, ... for every timed attempt, retries included), e.g. to
        fold a fresh PRNG key into each call.
    repeats: timed calls kept (>= 1).
    warmup: True: one call of ``fn`` first (compile + first run), timed as ``compile_s``;
        a callable: run that instead (e.g. one step where ``fn`` runs many); False: none
        (``compile_s`` is None; for code with nothing to compile, such as a numpy peer).
    max_load: a timed call with a background load above this is contended and is retried.
    retries: extra attempts per contended call; the least contended attempt is kept.
    stat_path: the ``/proc/stat`` to read (a fake file in tests).

    Returns {"compile_s": float | None, "median_s", "min_s", "max_s", "spread_s" (max - min),
    "times_s": [float] * repeats, "cpu_s": median process CPU seconds of the kept calls,
    "load": [float | None] * repeats (background load of each kept call),
    "background_load": median of the measurable per-call loads, else the load of the whole
    timed block, else None, "load_max": the largest measurable per-call load or None,
    "contended_retries": attempts discarded as contended, "repeats"}.
    """
    if repeats < 1:
        raise ValueError(f"time_call: repeats must be >= 1, got {repeats}")
    if not 0.0 <= max_load <= 1.0:
        raise ValueError(f"time_call: max_load must be a fraction in [0, 1], got {max_load}")
    if retries < 0:
        raise ValueError(f"time_call: retries must be >= 0, got {retries}")
    hz = _ticks_per_s()
    calls = 0

    def call():
        nonlocal calls
        out = fn(*vary(calls)) if vary is not None else fn()
        calls += 1
        return jax.block_until_ready(out)

    compile_s = None
    if warmup is not False:
        t0 = time.perf_counter()
        if callable(warmup):
            jax.block_until_ready(warmup())
            calls += 1
        else:
            call()
        compile_s = time.perf_counter() - t0

    kept: list[tuple[float, float, float | None]] = []  # (wall, cpu, load)
    attempts = 0
    block_start, block_cpu0 = read_cpu_ticks(stat_path), time.process_time()
    for _ in range(repeats):
        best = None
        for _attempt in range(retries + 1):
            s0, c0, t0 = read_cpu_ticks(stat_path), time.process_time(), time.perf_counter()
            call()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            load = background_load(s0, read_cpu_ticks(stat_path), cpu, hz)
            attempts += 1
            # A retry only follows a measured, contended attempt; a retry too short to measure
            # is not known to be contended, so it replaces that attempt.
            if best is None or load is None or load < best[2]:
                best = (wall, cpu, load)
            if load is None or load <= max_load:
                break
        kept.append(best)
    block_load = background_load(
        block_start, read_cpu_ticks(stat_path), time.process_time() - block_cpu0, hz
    )

    times = [k[0] for k in kept]
    loads = [k[2] for k in kept]
    measured = [x for x in loads if x is not None]
    return {
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "spread_s": max(times) - min(times),
        "times_s": times,
        "cpu_s": statistics.median(k[1] for k in kept),
        "load": loads,
        "background_load": statistics.median(measured) if measured else block_load,
        "load_max": max(measured) if measured else None,
        "contended_retries": attempts - repeats,
        "repeats": repeats,
    }


def fresh_keys(key: jax.Array, *leading) -> Callable[[int], tuple]:
    """A `time_call` ``vary``: call n gets ``(*leading, fold_in(key, n))``, the warm-up (n = 0)
    ``key`` itself, so no two timed calls of a jitted fn draw the same random numbers."""
    return lambda n: (*leading, key if n == 0 else jax.random.fold_in(key, n))


def scale(record: dict, factor: float) -> dict:
    """The record with every time (seconds) multiplied by ``factor``, e.g. 1 / clips for a
    per-clip figure; loads and counts unchanged."""
    out = dict(record)
    for k in ("compile_s", "median_s", "min_s", "max_s", "spread_s", "cpu_s"):
        if out[k] is not None:
            out[k] = out[k] * factor
    out["times_s"] = [t * factor for t in record["times_s"]]
    return out


if __name__ == "__main__":
    # `make bench` runs every file in this folder: here, report the current background load.
    rec = time_call(lambda: time.sleep(0.5), repeats=1, warmup=False, retries=0)
    print(f"background load over 0.5 s: {rec['background_load']}")
