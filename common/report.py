"""Reproduction reports: `report.md` (our numbers beside the paper's) + `results.json`.

    report = Report("internal RL: base model", command=command_line())
    report.paragraph("What was run ...")
    report.compare("Probe accuracy", {"layer 3": 0.48}, paper={"layer 3": 0.5}, fmt="{:.2f}")
    report.image("probe.png", "probe accuracy per layer")
    report.write(run_dir, results={"probe": {...}})

Both files carry the same provenance: command, git revision, date, hardware, wall time.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, as a shell-quoted string."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith("__main__.py"):
        package = os.path.basename(os.path.dirname(argv[0]))
        argv = ["python", "-m", package, *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def git_revision(cwd: str | os.PathLike | None = None) -> str:
    """`<sha>` of HEAD, with `+dirty` when tracked files differ from it; `unknown` outside git."""
    cwd = os.fspath(cwd) if cwd is not None else os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def hardware() -> dict[str, Any]:
    """A description of the machine: CPU, core count, memory, JAX backend and devices."""
    import jax

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        with open("/proc/meminfo", encoding="utf-8") as f:
            total_kb = int(f.readline().split()[1])
        info["memory_gib"] = round(total_kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return str(float(value))
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "{:.3g}"
) -> str:
    """A GitHub-flavoured Markdown table; numbers formatted with `fmt`, None as an em dash."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(_fmt(v, fmt) for v in row) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or type(value).__module__.startswith("jax"):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data: Any) -> str:
    """Writes `data` (numpy/jax values converted) as indented JSON, atomically; returns the path.

    Readers never see a half-written file: the text goes to a temporary file that replaces
    the target in one rename.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _write_text_atomic(path, json.dumps(_jsonable(data), indent=2))
    return path


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class Report:
    """Collects Markdown sections and writes `report.md` + `results.json` into a run dir."""

    def __init__(self, title: str, *, command: str | None = None):
        self.title = title
        self.command = command if command is not None else command_line()
        self.started = time.time()
        self._sections: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self._sections.append("#" * level + " " + text)

    def paragraph(self, text: str) -> None:
        self._sections.append(text.strip())

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "{:.3g}"
    ) -> None:
        self._sections.append(markdown_table(headers, rows, fmt))

    def compare(
        self,
        title: str | None,
        ours: Mapping[str, Any],
        paper: Mapping[str, Any] | None = None,
        *,
        fmt: str = "{:.3g}",
        key_header: str = "quantity",
        note: str | None = None,
    ) -> None:
        """A table of `quantity | ours | paper` rows; a quantity the paper lacks shows —."""
        if title:
            self.heading(title, 3)
        paper = paper or {}
        keys = list(ours) + [k for k in paper if k not in ours]
        self.table(
            [key_header, "ours", "paper"], [[k, ours.get(k), paper.get(k)] for k in keys], fmt
        )
        if note:
            self.paragraph(note)

    def image(self, path: str | os.PathLike, caption: str = "") -> None:
        """Embeds an image; `path` should be relative to the report's directory."""
        self._sections.append(
            f"![{caption}]({os.fspath(path)})" + (f"\n\n*{caption}*" if caption else "")
        )

    def rows(
        self,
        title: str | None,
        rows: Sequence[Row],
        *,
        fmt: str = "{:.3g}",
        note: str | None = None,
    ) -> None:
        """A paper-vs-ours table declared as `Row`s (see `render_rows`)."""
        if title:
            self.heading(title, 3)
        self._sections.append(render_rows(rows, fmt))
        if note:
            self.paragraph(note)

    def provenance(
        self, wall_seconds: float | None = None, clock: StageClock | None = None
    ) -> dict[str, Any]:
        """Command, revision, date, hardware, this invocation's wall time and, with a
        `StageClock`, the compute seconds of every stage (cached ones included)."""
        wall = time.time() - self.started if wall_seconds is None else wall_seconds
        prov = {
            "command": self.command,
            "git_revision": git_revision(),
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "hardware": hardware(),
            "wall_time_seconds": round(wall, 1),
        }
        if clock is not None:
            prov["compute"] = clock.to_json()
        return prov

    def render(self, provenance: Mapping[str, Any]) -> str:
        hw = provenance["hardware"]
        machine = f"{hw.get('cpu_model', hw.get('processor'))}, {hw.get('cpu_count')} cores"
        if "memory_gib" in hw:
            machine += f", {hw['memory_gib']} GiB"
        machine += (
            f"; JAX {hw.get('jax')} on {hw.get('backend')} ({len(hw.get('devices', []))} device(s))"
        )
        header = [
            f"# {self.title}",
            "",
            f"- command: `{provenance['command']}`",
            f"- revision: `{provenance['git_revision']}`",
            f"- date: {provenance['date']}",
            f"- hardware: {machine}",
            f"- wall time: {provenance['wall_time_seconds']:.0f} s (this invocation)",
        ]
        compute = provenance.get("compute")
        if compute:
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in compute["stages"].items())
            header.append(f"- compute time: {compute['total_seconds']:.0f} s in all ({stages})")
            if compute["stages_from_cache"]:
                header.append(
                    "- stages loaded from cache (their recorded compute time is counted): "
                    + ", ".join(compute["stages_from_cache"])
                )
        return "\n".join(header) + "\n\n" + "\n\n".join(self._sections) + "\n"

    def write(
        self,
        run_dir: str | os.PathLike,
        results: Mapping[str, Any],
        *,
        wall_seconds: float | None = None,
        clock: StageClock | None = None,
    ) -> tuple[str, str]:
        """Writes `report.md` and `results.json` (results + provenance); returns both paths."""
        run_dir = os.fspath(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        prov = self.provenance(wall_seconds, clock)
        md_path = os.path.join(run_dir, "report.md")
        json_path = os.path.join(run_dir, "results.json")
        _write_text_atomic(md_path, self.render(prov))
        write_json(json_path, {"title": self.title, "provenance": prov, "results": results})
        return md_path, json_path


# --------------------------------------------------------------------------------------------
# Stage clock and result cache
# --------------------------------------------------------------------------------------------

#: The key under which `StageClock.cached` stores a result's compute seconds in its cache file.
COMPUTE_KEY = "_compute_seconds"


class StageClock:
    """Compute seconds per reproduction stage, including stages whose results come from cache.

    A report rebuilt from cached results must still state what the experiment cost, so each
    cached result file keeps the seconds its computation took (`COMPUTE_KEY`), and loading it
    adds those seconds to the clock. `Report.write(..., clock=clock)` puts the per-stage and
    total compute seconds into the provenance.

        clock = StageClock()
        probe = clock.cached("probe", run_dir / "probe.json", lambda: run_probe(cfg, run_dir))
        with clock.stage("plots"):
            make_plots(...)
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.from_cache: dict[str, bool] = {}

    def add(self, stage: str, seconds: float, *, cached: bool = False) -> None:
        """Adds `seconds` to `stage` (stages repeated under one name are summed)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)
        self.from_cache[stage] = self.from_cache.get(stage, True) and cached

    def stage(self, name: str):
        """A context manager timing its block as compute of stage `name`."""
        clock = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                clock.add(name, time.perf_counter() - self.t0)

        return _Timer()

    def cached(self, stage: str, path: str | os.PathLike, compute) -> Any:
        """The JSON result at `path`, or `compute()` written there (atomically) when absent.

        The result must be a JSON object; its compute seconds are stored in it under
        `COMPUTE_KEY` and removed again from what is returned. Loading a result written before
        the key existed counts 0 s and marks the stage `from_cache` (so the report can say the
        time is unknown rather than small).
        """
        path = os.fspath(path)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            self.add(stage, float(result.pop(COMPUTE_KEY, 0.0)), cached=True)
            return result
        t0 = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - t0
        if not isinstance(result, Mapping):
            raise TypeError(
                f"StageClock.cached({stage!r}): compute() must return a dict, got "
                f"{type(result).__name__}"
            )
        write_json(path, {**result, COMPUTE_KEY: seconds})
        self.add(stage, seconds)
        return dict(result)

    def total(self) -> float:
        return float(sum(self.seconds.values()))

    def to_json(self) -> dict[str, Any]:
        return {
            "total_seconds": round(self.total(), 1),
            "stages": {k: round(v, 1) for k, v in self.seconds.items()},
            "stages_from_cache": sorted(k for k, v in self.from_cache.items() if v),
        }


# --------------------------------------------------------------------------------------------
# Paper-vs-ours tables as data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a paper-vs-ours table: `metric`, our value, the paper's (None if absent).

    `ci` is an optional (low, high) interval of our value; `note` a short remark.
    """

    metric: str
    ours: Any
    paper: Any = None
    ci: tuple[float, float] | None = None
    note: str = ""


def render_rows(rows: Sequence[Row], fmt: str = "{:.3g}") -> str:
    """The Markdown table of `rows`: metric | ours | (95% CI) | paper | (note)."""
    with_ci = any(r.ci is not None for r in rows)
    with_note = any(r.note for r in rows)
    headers = ["metric", "ours"] + (["95% CI"] if with_ci else []) + ["paper"]
    headers += ["note"] if with_note else []
    body = []
    for r in rows:
        line = [r.metric, r.ours]
        if with_ci:
            line.append("—" if r.ci is None else f"[{_fmt(r.ci[0], fmt)}, {_fmt(r.ci[1], fmt)}]")
        line.append(r.paper)
        if with_note:
            line.append(r.note)
        body.append(line)
    return markdown_table(headers, body, fmt)


def rows_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """`rows` as JSON-ready dicts (for `results.json`)."""
    return [_jsonable(dataclasses.asdict(r)) for r in rows]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def figure(nrows: int = 1, ncols: int = 1, *, figsize=(5.5, 3.6), dpi: int = 120, **kwargs):
    """`(fig, axes)` from `matplotlib.pyplot.subplots` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, dpi=dpi, **kwargs)


def savefig(fig, path: str | os.PathLike) -> str:
    """Lays out, writes (creating the directory) and closes `fig`; returns the path."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
