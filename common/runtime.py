"""Process start-up shared by every command line: the XLA compile cache and the run dir."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from common.config import to_json
from common.report import command_line

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".jax_cache"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache (default: `<repo>/.jax_cache`).

    On a 2-core CPU compiles dominate short runs; tests, demos and reproductions share one
    cache so a repeated command skips most of them. `JAX_COMPILATION_CACHE_DIR` overrides.
    """
    import jax

    path = pathlib.Path(
        directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE_DIR
    )
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def start_process(*, compilation_cache: bool = True) -> bool:
    """What every command line does first: join a multi-process run when its launcher set the
    coordinator variables (`common.distributed.maybe_initialize_distributed`), then turn on
    the persistent compilation cache. Returns True when this process joined a distributed run.

    The distributed runtime must start before any JAX backend, so call this before the first
    array is made.
    """
    from common.distributed import maybe_initialize_distributed

    joined = maybe_initialize_distributed()
    if compilation_cache:
        enable_compilation_cache()
    return joined


def start_run_dir(run_dir: str | os.PathLike, config: Any) -> pathlib.Path:
    """Creates `run_dir`, writes the resolved `config.json` and appends the command line to
    `commands.txt` (a resumed run adds a line, so the history of invocations is kept)."""
    path = pathlib.Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "config.json.tmp"
    tmp.write_text(to_json(config))
    os.replace(tmp, path / "config.json")
    with open(path / "commands.txt", "a", encoding="utf-8") as f:
        f.write(command_line() + "\n")
    return path
