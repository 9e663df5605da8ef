"""Run metrics: a `metrics.jsonl` writer, a steps/s + ETA progress line, curve plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from common.report import figure, savefig


def _to_float(value: Any) -> float | int | str | None:
    if isinstance(value, (str, bool)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, float) and not math.isfinite(item):
        return str(item)  # JSON has no NaN/inf; keep them readable rather than dropping them
    return item


class MetricsWriter:
    """Appends one JSON object per call to `path`: `{"step": int, <name>: scalar, ...}`.

    Lines are flushed immediately so a killed run keeps everything written so far;
    reopening the same path appends (a resumed run continues the same file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        record = {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl` file, in order; a torn last line is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a run killed mid-write leaves at most one partial line
    return records


def metric_series(records: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric across records that have it."""
    pairs = [(r["step"], r[name]) for r in records if name in r and r[name] is not None]
    if not pairs:
        return np.zeros((0,), np.int64), np.zeros((0,), np.float64)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """A progress line: step, steps/s and ETA, with compilation excluded from the rate.

    The clock starts at the first `update` (which follows the first, compiling, step),
    so the rate and ETA reflect steady-state speed. `compile_seconds` records the time
    from construction to that first update.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        name: str = "train",
        every_seconds: float = 10.0,
        stream: TextIO | None = None,
        start_step: int = 0,
    ):
        self.total_steps = int(total_steps)
        self.name = name
        self.every_seconds = every_seconds
        self.stream = stream if stream is not None else sys.stderr
        self._created = time.perf_counter()
        self._t0: float | None = None
        self._step0 = int(start_step)
        self._last_print = -math.inf
        self.compile_seconds: float | None = None

    def rate(self, step: int) -> float:
        if self._t0 is None:
            return float("nan")
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    def line(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        rate = self.rate(step)
        eta = (self.total_steps - step) / rate if rate == rate and rate > 0 else float("nan")
        text = f"[{self.name}] step {step}/{self.total_steps}"
        text += f" | {rate:.2f} steps/s | ETA {_format_seconds(eta)}" if rate == rate else ""
        if metrics:
            shown = []
            for key, value in metrics.items():
                v = _to_float(value)
                shown.append(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
            text += " | " + " ".join(shown)
        return text

    def update(
        self, step: int, metrics: Mapping[str, Any] | None = None, force: bool = False
    ) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, int(step)
            self.compile_seconds = now - self._created
        if force or now - self._last_print >= self.every_seconds:
            self._last_print = now
            print(self.line(step, metrics), file=self.stream, flush=True)


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> str:
    """Plots named (x, y) curves to a PNG (Agg backend) and returns its path.

    `hlines` draws labelled horizontal reference lines (e.g. a paper's number, chance).
    """
    fig, ax = figure()
    for label, (x, y) in series.items():
        ax.plot(np.asarray(x), np.asarray(y), label=label, linewidth=1.5)
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1.0, color="gray")
        ax.annotate(label, (ax.get_xlim()[0], value), fontsize=7, va="bottom", color="gray")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return savefig(fig, path)
