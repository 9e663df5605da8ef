"""Test-session setup shared by every package's tests.

JAX compiles are the dominant cost on a 2-core CPU, so the persistent compilation
cache is on for every test process (and xdist worker), keyed in `.jax_cache/`.
"""

import os
import pathlib

import jax

_CACHE_DIR = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Tests compare against float64-free numpy references; highest precision keeps
# matmuls exact enough for tight tolerances on any backend.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("MPLBACKEND", "Agg")
