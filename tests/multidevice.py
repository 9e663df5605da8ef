"""Runs a snippet of Python in a fresh process with N simulated CPU devices.

The device count of JAX's CPU backend is fixed when the backend starts, so a test that needs 8
devices (while the test session has 1) runs its work in a subprocess. The snippet defines
`result`, a flat dict of arrays (e.g. flattened parameters), which comes back as numpy arrays.

    got = run_with_devices(8, "from mypkg import stage; result = stage.tiny_params(tmp)",
                           tmp=str(tmp_path / "a"))
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PRELUDE = """
import os, sys
import jax
jax.config.update("jax_num_cpu_devices", {devices})
jax.config.update("jax_default_matmul_precision", "highest")
from common.runtime import enable_compilation_cache
enable_compilation_cache()
assert jax.device_count() == {devices}, jax.devices()
"""

_EPILOGUE = """
import numpy as _np
_np.savez({out!r}, **{{k: _np.asarray(v) for k, v in result.items()}})
"""


def run_with_devices(devices: int, code: str, timeout: float = 600, **variables) -> dict:
    """Executes `code` with `devices` CPU devices; returns its `result` dict as numpy arrays.

    `variables` are bound as Python globals (their repr is inlined) before `code` runs.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.npz")
        binds = "".join(f"{k} = {v!r}\n" for k, v in variables.items())
        script = (
            _PRELUDE.format(devices=devices)
            + binds
            + textwrap.dedent(code)
            + _EPILOGUE.format(out=out)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode:
            raise AssertionError(
                f"subprocess with {devices} devices failed:\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        with np.load(out) as data:
            return {k: data[k] for k in data.files}


def flat_params(state) -> dict:
    """`{"a/b/kernel": array}` of an `nnx.State` or TrainState's params (host numpy)."""
    from flax import nnx

    params = getattr(state, "params", state)
    return {"/".join(str(p) for p in path): np.asarray(v) for path, v in nnx.to_flat_state(params)}


def assert_params_close(got: dict, want: dict, *, rtol: float, atol: float) -> None:
    """Same keys and shapes, values allclose at the stated tolerance."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
