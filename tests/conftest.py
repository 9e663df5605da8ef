"""Test-session setup shared by every package's tests.

JAX compiles are the dominant cost on a 2-core CPU, so the persistent compilation
cache is on for every test process (and xdist worker), keyed in `.jax_cache/`.
"""

import os

import jax

from common.runtime import enable_compilation_cache

enable_compilation_cache()
# Tests compare against float64-free numpy references; highest precision keeps
# matmuls exact enough for tight tolerances on any backend.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("MPLBACKEND", "Agg")
